"""Adapters over the real TFDS builders, fed through ``tfds.testing.mock_data``.

Feature specs are the installed builders' own (tfds 4.9.10): either mock_data's random examples
(shapes/dtypes from the spec) or hand-made coherent examples that are serialized and
deserialized with the real ``FeaturesDict`` -- exactly what the ArrayRecord reader returns.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing.mocking import RandomFakeGenerator

from lavin_jax.data.sources import adapters

DTYPES = {
    "image": np.uint8,
    "depth": np.float32,
    "valid": np.uint8,
    "semantic": np.uint8,
    "instance": np.int32,
    "boxes": np.float32,
    "box_classes": np.int32,
}
USE_CODE = tfds.testing.MockPolicy.USE_CODE


def assert_canonical(ex: dict, provides: tuple[str, ...]) -> None:
    """Exactly the declared keys, canonical dtypes, consistent shapes and values."""
    assert set(ex) == set(provides)
    for k, v in ex.items():
        assert v.dtype == DTYPES[k], (k, v.dtype)
    h, w, c = ex["image"].shape
    assert c == 3
    for k in ("depth", "valid", "semantic", "instance"):
        if k in ex:
            assert ex[k].shape == (h, w), k
    if "boxes" in ex:
        n = len(ex["box_classes"])
        assert ex["boxes"].shape == (n, 4) and ex["box_classes"].shape == (n,)
        assert np.all((ex["boxes"] >= 0) & (ex["boxes"] <= 1))
        assert np.all(ex["boxes"][:, 2] >= ex["boxes"][:, 0])
        assert np.all(ex["boxes"][:, 3] >= ex["boxes"][:, 1])
        assert np.all(ex["box_classes"] >= 1)
    if "instance" in ex:
        assert ex["instance"].min() >= 0 and ex["instance"].max() <= n
    if "valid" in ex:
        assert set(np.unique(ex["valid"])) <= {0, 1}
        assert np.all(ex["depth"][ex["valid"] == 0] == 0)
        assert np.all(ex["depth"][ex["valid"] == 1] > 0)


def spec_roundtrip(tfds_name: str, data_dir, fill) -> list[dict]:
    """Examples from the real builder's spec, edited by ``fill``, through serialize/deserialize."""
    features = tfds.builder(tfds_name, data_dir=str(data_dir)).info.features
    gen = RandomFakeGenerator(features, 2, constant_dynamic_shape=True)
    out = []
    for i in range(2):
        ex = fill(gen[i], i)
        out.append(features.deserialize_example_np(features.serialize_example(ex)))
    return out


def mocked_source(name: str, data_dir, raw: list[dict]):
    """SOURCES[name].open(...) with the builder's data source replaced by ``raw``."""
    with tfds.testing.mock_data(policy=USE_CODE, as_data_source_fn=lambda *a, **k: raw):
        return adapters.SOURCES[name].open(data_dir, "train")


@pytest.mark.parametrize("name", ["nyu_depth_v2", "imagenet2012"])
def test_random_mock_examples_through_sources(name, tmp_path):
    with tfds.testing.mock_data(num_examples=3, policy=USE_CODE):
        src = adapters.SOURCES[name].open(tmp_path, "train")
        assert len(src) == 3
        for i in range(3):
            ex = src[i]
            assert_canonical(ex, adapters.SOURCES[name].provides)
    if name == "nyu_depth_v2":
        assert ex["image"].shape == (480, 640, 3)


def test_nyu_invalid_depth_masked():
    depth = np.ones((480, 640), np.float16)
    depth[:10] = 0
    depth[10, 0] = np.nan
    ex = adapters.nyu_depth({"image": np.zeros((480, 640, 3), np.uint8), "depth": depth})
    assert_canonical(ex, adapters.SOURCES["nyu_depth_v2"].provides)
    assert ex["valid"][:10].sum() == 0 and ex["valid"][10, 0] == 0
    assert ex["valid"].sum() == 480 * 640 - 10 * 640 - 1


# Panoptic layout: (segment id, label, is_crowd, (y0, x0, y1, x1) in px); 24x32 image.
COCO_SEGS = [
    (1001, 0, False, (2, 3, 10, 12)),  # person: thing -> instance 1
    (2002, 5, True, (12, 0, 20, 8)),  # bus, crowd -> semantic only
    (3003, 100, False, (0, 20, 24, 32)),  # stuff -> semantic only
    (4004, 17, False, (14, 10, 22, 18)),  # horse: thing -> instance 2
]


def coco_fill(ex: dict, i: int) -> dict:
    h, w = 24, 32
    pan = np.zeros((h, w, 3), np.uint8)
    for sid, _, _, (y0, x0, y1, x1) in COCO_SEGS:
        pan[y0:y1, x0:x1] = [sid % 256, (sid // 256) % 256, sid // 65536]
    n = len(COCO_SEGS)
    objs = {k: v[:n] for k, v in ex["panoptic_objects"].items()}
    objs["id"] = np.array([s[0] for s in COCO_SEGS], np.int64)
    objs["label"] = np.array([s[1] for s in COCO_SEGS], np.int64)
    objs["is_crowd"] = np.array([s[2] for s in COCO_SEGS])
    boxes = [[y0 / h, x0 / w, y1 / h, x1 / w] for *_, (y0, x0, y1, x1) in COCO_SEGS]
    objs["bbox"] = np.array(boxes, np.float32)
    image = np.full((h, w, 3), 50 + i, np.uint8)
    return {**ex, "image": image, "panoptic_image": pan, "panoptic_objects": objs}


def test_coco_panoptic_adapter(tmp_path):
    raw = spec_roundtrip("coco/2017_panoptic", tmp_path, coco_fill)
    src = mocked_source("coco_panoptic", tmp_path, raw)
    ex = src[1]
    assert_canonical(ex, adapters.SOURCES["coco_panoptic"].provides)
    assert ex["image"][0, 0, 0] == 51
    expect_sem = np.zeros((24, 32), np.uint8)
    for _, lab, _, (y0, x0, y1, x1) in COCO_SEGS:
        expect_sem[y0:y1, x0:x1] = lab + 1
    np.testing.assert_array_equal(ex["semantic"], expect_sem)
    np.testing.assert_array_equal(ex["box_classes"], [1, 18])
    assert set(np.unique(ex["instance"])) == {0, 1, 2}
    # Each instance's mask extent matches its box row.
    for k in (1, 2):
        ys, xs = np.nonzero(ex["instance"] == k)
        mask_box = [ys.min() / 24, xs.min() / 32, (ys.max() + 1) / 24, (xs.max() + 1) / 32]
        np.testing.assert_allclose(ex["boxes"][k - 1], mask_box, atol=1e-6)


def test_coco_panoptic_rejects_incoherent_records(tmp_path):
    # mock_data's random records give image and panoptic PNG different sizes and objects'
    # fields different lengths; the adapter must refuse rather than guess.
    with tfds.testing.mock_data(num_examples=1, policy=USE_CODE):
        src = adapters.SOURCES["coco_panoptic"].open(tmp_path, "train")
        with pytest.raises(ValueError, match="panoptic"):
            src[0]


VOC_BOXES = np.array(
    [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.31, 0.9]], np.float32
)


def voc_fill(ex: dict, i: int) -> dict:
    n = len(VOC_BOXES)
    objs = {k: v[:n] for k, v in ex["objects"].items()}
    objs["bbox"] = VOC_BOXES
    objs["label"] = np.array([14, 0, 19], np.int64)  # person, aeroplane, tvmonitor
    return {**ex, "objects": objs}


def test_voc_adapter(tmp_path):
    raw = spec_roundtrip("voc/2012", tmp_path, voc_fill)
    ex = mocked_source("voc", tmp_path, raw)[0]
    assert_canonical(ex, adapters.SOURCES["voc"].provides)
    np.testing.assert_allclose(ex["boxes"], VOC_BOXES)
    np.testing.assert_array_equal(ex["box_classes"], [15, 1, 20])


@pytest.mark.parametrize("name", ["nyu_depth_v2", "imagenet2012", "voc", "photos"])
def test_unprepared_source_names_the_fix(name, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        adapters.SOURCES[name].open(tmp_path, "train")
    msg = str(err.value)
    assert f"python -m lavin_jax.data.prepare --dataset {name} --data_dir {tmp_path}" in msg
    assert "\n" not in msg
    assert ("--manual_dir" in msg) == (name == "imagenet2012")


def test_manual_dataset_prepare_needs_manual_dir(tmp_path):
    with pytest.raises(ValueError, match="--manual_dir"):
        adapters.SOURCES["imagenet2012"].prepare(tmp_path)


def write_fake_voc(root, ids_by_set: dict[str, list[str]]) -> None:
    """A VOCdevkit/VOC2012 tree: JPEGs, XML annotations, palette masks (2 objects each)."""
    from PIL import Image

    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    h, w = 20, 30
    # (label name, class index, (ymin, xmin, ymax, xmax) 1-based inclusive VOC pixels)
    objs = [("person", 15, (3, 4, 10, 12)), ("dog", 12, (12, 15, 18, 28))]
    palette = list(np.random.default_rng(0).integers(0, 256, 768))
    for set_name, ids in ids_by_set.items():
        (base / "ImageSets" / "Segmentation" / f"{set_name}.txt").write_text("\n".join(ids))
        for image_id in ids:
            Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(
                base / "JPEGImages" / f"{image_id}.jpg"
            )
            cls = np.zeros((h, w), np.uint8)
            obj = np.zeros((h, w), np.uint8)
            xml = [f"<annotation><size><width>{w}</width><height>{h}</height></size>"]
            for k, (name, c, (y0, x0, y1, x1)) in enumerate(objs, start=1):
                cls[y0 - 1 : y1, x0 - 1 : x1] = c
                obj[y0 - 1 : y1, x0 - 1 : x1] = k
                xml.append(
                    f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0"
                    f"</truncated><difficult>0</difficult><bndbox><xmin>{x0 - 1}</xmin>"
                    f"<ymin>{y0 - 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                )
            cls[0, :] = obj[0, :] = 255  # void border
            xml.append("</annotation>")
            (base / "Annotations" / f"{image_id}.xml").write_text("".join(xml))
            for sub, m in (("SegmentationClass", cls), ("SegmentationObject", obj)):
                im = Image.fromarray(m, mode="P")
                im.putpalette(palette)
                im.save(base / sub / f"{image_id}.png")


def test_voc_segmentation_builder_end_to_end(tmp_path, monkeypatch):
    raw_dir = tmp_path / "raw"
    write_fake_voc(raw_dir, {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]})
    monkeypatch.setattr(
        tfds.download.DownloadManager, "download_and_extract", lambda self, url: raw_dir
    )
    src = adapters.SOURCES["voc_segmentation"]
    src.prepare(tmp_path / "data")
    train, val = src.open(tmp_path / "data", "train"), src.open(tmp_path / "data", "validation")
    assert len(train) == 2 and len(val) == 1
    ex = val[0]
    assert_canonical(ex, src.provides)
    assert ex["semantic"][0].max() == 0 and ex["instance"][0].max() == 0  # void -> 0
    np.testing.assert_array_equal(ex["box_classes"], [15, 12])
    for k in (1, 2):  # object index k <-> k-th XML box
        ys, xs = np.nonzero(ex["instance"] == k)
        mask_box = [ys.min() / 20, xs.min() / 30, (ys.max() + 1) / 20, (xs.max() + 1) / 30]
        np.testing.assert_allclose(ex["boxes"][k - 1], mask_box, atol=1e-6)
        assert np.all(ex["semantic"][ex["instance"] == k] == ex["box_classes"][k - 1])


def test_every_source_is_registered():
    from lavin_jax.data.sources import get_source

    for name, src in adapters.SOURCES.items():
        assert get_source(name) is src
