"""Sources over TFDS builders: real datasets (and ``photos``) mapped to the canonical schema.

Each ``TfdsSource`` reads its builder's ArrayRecord files through ``as_data_source`` (random
access) and maps every example with its adapter to canonical keys (see
lavin_jax/data/sources/__init__.py): "image" uint8 [H,W,3], "depth" float32 [H,W] metres,
"valid" uint8 [H,W], "semantic" uint8 [H,W] (0 = background), "instance" int32 [H,W]
(0 = background, i = row i-1 of "boxes"), "boxes" float32 [N,4] (ymin, xmin, ymax, xmax in
[0,1]), "box_classes" int32 [N] (same 1-based ids as "semantic").

What each real builder gives (tfds 4.9.10 feature specs):
- ``nyu_depth_v2``: image [480,640,3] + float16 depth (metres) -> image, depth, valid (d > 0).
- ``coco/2017_panoptic``: image + panoptic PNG (segment id = R + 256 G + 256^2 B) +
  panoptic_objects (id, bbox, label in 133 classes, is_crowd) -> image, semantic (label + 1 for
  every segment, things and stuff), instance (non-crowd *thing* segments, 1..N), boxes /
  box_classes of those N. No keypoints: no TFDS coco config (2014, 2017, 2017_panoptic) stores
  person keypoints, so keypoint tasks need another source.
- ``voc/2012``: image + objects (bbox, label in 20 classes) -> image, boxes, box_classes. The
  TFDS voc builder stores no segmentation masks, hence our ``voc_segmentation`` builder
  (VOC 2012 segmentation sets): semantic (palette index = class 1..20), instance (object
  index k = k-th XML object, VOC devkit convention) with the XML boxes; void (255) -> 0.
- ``imagenet2012`` (manual download): image (colorization, inpainting).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lavin_jax.data.sources import photos as photos_lib

Example = dict[str, np.ndarray]

# COCO's 80 thing classes, in category-id order: the first 80 of the 133 panoptic labels.
COCO_THINGS = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def _image(ex: Mapping[str, Any], key: str = "image") -> np.ndarray:
    img = np.asarray(ex[key])
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{key}: expected uint8 [H,W,3], got {img.dtype} {img.shape}")
    return img


def _objects(objs: Mapping[str, Any], keys: Sequence[str], where: str) -> dict[str, np.ndarray]:
    """The per-object arrays of a TFDS Sequence feature, checked to have one length."""
    out = {k: np.asarray(objs[k]) for k in keys}
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{where}: per-object fields differ in length {lengths}")
    return out


def _boxes(bbox: np.ndarray, where: str) -> np.ndarray:
    """float32 [N,4] (ymin, xmin, ymax, xmax), clipped into [0,1] (annotation round-off)."""
    bbox = np.asarray(bbox, np.float32).reshape(-1, 4)
    if np.any(bbox[:, 2] < bbox[:, 0]) or np.any(bbox[:, 3] < bbox[:, 1]):
        raise ValueError(f"{where}: a box has ymax < ymin or xmax < xmin")
    return np.clip(bbox, 0.0, 1.0)


def nyu_depth(ex: Mapping[str, Any]) -> Example:
    """nyu_depth_v2 -> image, depth (metres, float16 upcast), valid (finite, > 0)."""
    image = _image(ex)
    depth = np.asarray(ex["depth"], np.float32)
    if depth.shape != image.shape[:2]:
        raise ValueError(f"depth: shape {depth.shape} != image {image.shape[:2]}")
    valid = np.isfinite(depth) & (depth > 0)
    return {
        "image": image,
        "depth": np.where(valid, depth, 0.0).astype(np.float32),
        "valid": valid.astype(np.uint8),
    }


def coco_panoptic(ex: Mapping[str, Any], num_things: int = len(COCO_THINGS)) -> Example:
    """coco/2017_panoptic -> image, semantic, instance, boxes, box_classes (see module doc)."""
    image = _image(ex)
    pan = _image(ex, "panoptic_image").astype(np.int64)
    if pan.shape != image.shape:
        raise ValueError(f"panoptic_image: shape {pan.shape} != image {image.shape}")
    objs = _objects(ex["panoptic_objects"], ("id", "bbox", "label", "is_crowd"), "panoptic_objects")
    seg_id = pan[..., 0] + 256 * pan[..., 1] + 65536 * pan[..., 2]
    labels = objs["label"].astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= 255):
        raise ValueError("panoptic_objects/label: outside [0, 254], cannot be a uint8 class id")
    is_inst = (labels < num_things) & ~objs["is_crowd"].astype(bool)
    # Per-pixel lookups through the unique segment ids (one pass over the image).
    uniq, inv = np.unique(seg_id, return_inverse=True)
    sem_of = np.zeros(len(uniq), np.uint8)
    inst_of = np.zeros(len(uniq), np.int32)
    pos = {int(u): i for i, u in enumerate(uniq)}
    inst_rows = np.flatnonzero(is_inst)
    inst_index = {int(r): k + 1 for k, r in enumerate(inst_rows)}
    for row, (sid, lab) in enumerate(zip(objs["id"], labels)):
        p = pos.get(int(sid))
        if p is None or sid == 0:  # id 0 = unlabeled in COCO panoptic
            continue
        sem_of[p] = lab + 1
        inst_of[p] = inst_index.get(row, 0)
    inv = inv.reshape(seg_id.shape)
    return {
        "image": image,
        "semantic": sem_of[inv],
        "instance": inst_of[inv],
        "boxes": _boxes(objs["bbox"][inst_rows], "panoptic_objects/bbox"),
        "box_classes": (labels[inst_rows] + 1).astype(np.int32),
    }


def voc_detection(ex: Mapping[str, Any]) -> Example:
    """voc -> image, boxes, box_classes (label + 1 in 1..20; difficult objects kept)."""
    objs = _objects(ex["objects"], ("bbox", "label"), "objects")
    return {
        "image": _image(ex),
        "boxes": _boxes(objs["bbox"], "objects/bbox"),
        "box_classes": (objs["label"].astype(np.int64) + 1).astype(np.int32),
    }


def voc_segmentation(ex: Mapping[str, Any]) -> Example:
    """voc_segmentation -> image, semantic, instance, boxes, box_classes (void 255 -> 0)."""
    image = _image(ex)
    objs = _objects(ex["objects"], ("bbox", "label"), "objects")
    maps = {}
    for key in ("segmentation_class", "segmentation_object"):
        m = np.asarray(ex[key])
        m = m[..., 0] if m.ndim == 3 else m
        if m.shape != image.shape[:2]:
            raise ValueError(f"{key}: shape {m.shape} != image {image.shape[:2]}")
        maps[key] = np.where(m == 255, 0, m)
    n = len(objs["label"])
    if maps["segmentation_object"].max(initial=0) > n or maps["segmentation_class"].max() > 20:
        raise ValueError(f"segmentation masks: index above {n} objects / 20 classes")
    return {
        "image": image,
        "semantic": maps["segmentation_class"].astype(np.uint8),
        "instance": maps["segmentation_object"].astype(np.int32),
        "boxes": _boxes(objs["bbox"], "objects/bbox"),
        "box_classes": (objs["label"].astype(np.int64) + 1).astype(np.int32),
    }


def image_only(ex: Mapping[str, Any]) -> Example:
    """Any builder with an RGB "image" -> image."""
    return {"image": _image(ex)}


def photos_stereo(ex: Mapping[str, Any]) -> Example:
    """photos/stereo -> image, depth, valid (already canonical; drops the photo name)."""
    return {
        "image": _image(ex),
        "depth": np.asarray(ex["depth"], np.float32),
        "valid": np.asarray(ex["valid"], np.uint8),
    }


class AdaptedSource(Sequence):
    """Random-access view: ``raw[i]`` mapped by ``adapt``. Picklable when ``raw`` is (Grain)."""

    def __init__(self, raw: Sequence[Any], adapt: Callable[[Mapping[str, Any]], Example]):
        self.raw, self.adapt = raw, adapt

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        return self.adapt(self.raw[i])


def _check_coco_names(builder: tfds.core.DatasetBuilder) -> None:
    """The thing/stuff split by label index holds for the real category order; check it."""
    names = builder.info.features["panoptic_objects"]["label"].names
    if names and names[0] == "person" and tuple(names[: len(COCO_THINGS)]) != COCO_THINGS:
        raise ValueError(
            f"coco/2017_panoptic in {builder.data_dir}: label names do not start with COCO's 80 "
            "thing classes in id order; re-prepare it with tfds 4.9.10"
        )


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A named source over one TFDS builder config.

    name: our registry name (``--dataset NAME``); builder: (data_dir) -> DatasetBuilder;
    provides: canonical keys of every example; adapt: raw example -> canonical example;
    manual: how to get manually downloaded files (None = TFDS downloads them itself).
    """

    name: str
    builder: Callable[[str], tfds.core.DatasetBuilder]
    provides: tuple[str, ...]
    adapt: Callable[[Mapping[str, Any]], Example]
    splits: tuple[str, ...] = ("train", "validation")
    manual: str | None = None
    check: Callable[[tfds.core.DatasetBuilder], None] | None = None

    def missing_message(self, data_dir: str | Path) -> str:
        msg = (
            f"dataset {self.name!r} is not prepared (as ArrayRecord) in {data_dir}: run "
            f"`python -m lavin_jax.data.prepare --dataset {self.name} --data_dir {data_dir}`"
        )
        if self.manual:
            msg += f" with --manual_dir holding {self.manual}"
        return msg

    def open(self, data_dir: str | Path, split: str) -> AdaptedSource:
        """The split as a random-access sequence of canonical examples."""
        b = self.builder(str(data_dir))
        try:
            raw = b.as_data_source(split=split)
        except Exception as e:  # tfds raises assorted errors for missing/TFRecord-only data
            if b.is_prepared() and "array_record" in str(b.info.file_format).lower():
                raise
            raise FileNotFoundError(self.missing_message(data_dir)) from e
        if self.check is not None:
            self.check(b)
        return AdaptedSource(raw, self.adapt)

    def prepare(self, data_dir: str | Path, manual_dir: str | Path | None = None) -> None:
        """download_and_prepare as ArrayRecord (TFDS downloads, or reads ``manual_dir``)."""
        b = self.builder(str(data_dir))
        if self.manual and manual_dir is None:
            raise ValueError(f"dataset {self.name!r} needs --manual_dir holding {self.manual}")
        config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
        b.download_and_prepare(file_format="array_record", download_config=config)


def _tfds(name: str) -> Callable[[str], tfds.core.DatasetBuilder]:
    return lambda data_dir: tfds.builder(name, data_dir=data_dir)


def _voc_segmentation(data_dir: str) -> tfds.core.DatasetBuilder:
    # Imported on use: it pulls in TFDS's voc module.
    from lavin_jax.data.sources.voc_segmentation import VocSegmentation

    return VocSegmentation(data_dir=data_dir)


def _photos(config: str) -> Callable[[str], tfds.core.DatasetBuilder]:
    return lambda data_dir: photos_lib.builder(data_dir, config)


SOURCES: dict[str, TfdsSource] = {
    s.name: s
    for s in (
        TfdsSource("photos", _photos("crops"), ("image",), image_only, ("train", "test")),
        TfdsSource(
            "photos_stereo",
            _photos("stereo"),
            ("image", "depth", "valid"),
            photos_stereo,
            ("train", "test"),
        ),
        TfdsSource("nyu_depth_v2", _tfds("nyu_depth_v2"), ("image", "depth", "valid"), nyu_depth),
        TfdsSource(
            "coco_panoptic",
            _tfds("coco/2017_panoptic"),
            ("image", "semantic", "instance", "boxes", "box_classes"),
            coco_panoptic,
            check=_check_coco_names,
        ),
        TfdsSource("voc", _tfds("voc/2012"), ("image", "boxes", "box_classes"), voc_detection),
        TfdsSource(
            "voc_segmentation",
            _voc_segmentation,
            ("image", "semantic", "instance", "boxes", "box_classes"),
            voc_segmentation,
        ),
        TfdsSource(
            "imagenet2012",
            _tfds("imagenet2012"),
            ("image",),
            image_only,
            manual="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org)",
        ),
    )
}
