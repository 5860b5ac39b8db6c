"""``voc_segmentation``: PASCAL VOC 2012 segmentation masks as a TFDS builder (ArrayRecord).

TFDS's own ``voc`` builder keeps only boxes and labels, so this builder reads the same
``VOCtrainval_11-May-2012.tar`` (same mirror, checksum checked against TFDS's recorded one)
and stores, for the images of ``ImageSets/Segmentation/{train,val}.txt`` (1464 / 1449):
the image, the XML objects (as in TFDS ``voc``) and the two palette PNGs as index maps,
``segmentation_class`` (0 background, 1..20 classes, 255 void/border) and
``segmentation_object`` (0 background, k = k-th object of the XML annotation, 255 void).
The adapter (``adapters.voc_segmentation``) maps void to 0 in both maps.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.object_detection import voc as tfds_voc

_TRAINVAL = "VOCtrainval_11-May-2012.tar"
_ROOT = "VOCdevkit/VOC2012"


def read_index_png(path: str) -> np.ndarray:
    """uint8 [H,W,1] palette indices of a VOC mask PNG (not its RGB colours)."""
    with Image.open(path) as im:
        if im.mode != "P":
            raise ValueError(f"{path}: expected a palette ('P') PNG, got mode {im.mode}")
        return np.asarray(im, np.uint8)[..., None]


class VocSegmentation(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 images with class and object segmentation masks (see module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    @tfds.core.utils.classproperty
    @classmethod
    def _checksums_path(cls):
        # Same tarball as TFDS's voc/2012: reuse its recorded size and sha256.
        return tfds.core.utils.tfds_path() / "url_checksums" / "voc.txt"

    def _info(self) -> tfds.core.DatasetInfo:
        mask = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image/filename": tfds.features.Text(),
            "objects": tfds.features.Sequence({
                "label": tfds.features.ClassLabel(names=tfds_voc._VOC_LABELS),
                "bbox": tfds.features.BBoxFeature(),
                "pose": tfds.features.ClassLabel(names=tfds_voc._VOC_POSES),
                "is_truncated": np.bool_,
                "is_difficult": np.bool_,
            }),
            "segmentation_class": mask,
            "segmentation_object": mask,
        })  # fmt: skip
        return self.dataset_info_from_configs(
            features=features, homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
        )

    def _split_generators(self, dl_manager):
        root = dl_manager.download_and_extract(os.path.join(tfds_voc._VOC_DATA_URL, _TRAINVAL))
        return {
            "train": self._generate_examples(root, "train"),
            "validation": self._generate_examples(root, "val"),
        }

    def _generate_examples(self, data_path, set_name: str):
        base = os.path.join(str(data_path), _ROOT)
        with open(os.path.join(base, "ImageSets", "Segmentation", f"{set_name}.txt")) as f:
            ids = [line.strip() for line in f if line.strip()]
        for image_id in ids:
            objects = list(
                tfds_voc._get_example_objects(os.path.join(base, "Annotations", f"{image_id}.xml"))
            )
            yield (
                image_id,
                {
                    "image": os.path.join(base, "JPEGImages", f"{image_id}.jpg"),
                    "image/filename": f"{image_id}.jpg",
                    "objects": objects,
                    "segmentation_class": read_index_png(
                        os.path.join(base, "SegmentationClass", f"{image_id}.png")
                    ),
                    "segmentation_object": read_index_png(
                        os.path.join(base, "SegmentationObject", f"{image_id}.png")
                    ),
                },
            )
