"""The ``photos`` TFDS builder: photographs shipped in pip packages, crops, stereo depth."""

from __future__ import annotations

import numpy as np
import pytest

from lavin_jax.data.sources import adapters, photos

SMALL_CROPS = photos.make_config("crops", 32, crops_per_photo=2, test_crops_per_photo=1)
SMALL_STEREO = photos.make_config("stereo", 48, crops_per_photo=3, test_crops_per_photo=2)


def test_catalogue_is_on_disk():
    # requirements.txt pins scikit-image, scikit-learn and matplotlib: every photo is there.
    found = [name for name, _ in photos.available_photos()]
    assert found == [name for name, _, _ in photos.CATALOGUE]
    for _, path in photos.available_photos():
        img = photos.load_rgb(path)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert min(img.shape[:2]) >= 256 and img.std() > 10  # real content, not a blank


def test_crop_boxes_bounds_and_determinism():
    boxes = photos.crop_boxes(300, 451, 200, 256, 0.35, photos.photo_rng(0, "chelsea", "train"))
    side_y, side_x = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    np.testing.assert_array_equal(side_y, side_x)
    assert side_y.min() >= 256 and side_y.max() <= 300  # never up-sampled
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 300 and boxes[:, 3].max() <= 451
    again = photos.crop_boxes(300, 451, 200, 256, 0.35, photos.photo_rng(0, "chelsea", "train"))
    np.testing.assert_array_equal(boxes, again)
    other = photos.crop_boxes(300, 451, 200, 256, 0.35, photos.photo_rng(1, "chelsea", "train"))
    assert not np.array_equal(boxes, other)
    small = photos.crop_boxes(1000, 1000, 500, 64, 0.35, photos.photo_rng(0, "x", "train"))
    assert (small[:, 2] - small[:, 0]).min() >= 350  # min_scale of the short side


def test_resize_nearest_identity_and_subsampling():
    a = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    np.testing.assert_array_equal(photos.resize_nearest(a, np.array([0, 0, 64, 64]), 64), a)
    half = photos.resize_nearest(a, np.array([8, 16, 40, 48]), 16)
    np.testing.assert_array_equal(half, a[8:40:2, 16:48:2] + 64 + 1)  # pixel-centre sampling


def test_stereo_depth_from_disparity():
    image, depth, valid = photos.stereo_depth()
    assert image.shape == (500, 741, 3) and depth.shape == valid.shape == (500, 741)
    assert 0.85 < valid.mean() < 0.99  # Middlebury leaves occlusions without ground truth
    d = depth[valid == 1]
    assert np.all(depth[valid == 0] == 0)
    assert d.min() > 0.3 and d.max() < 10.0  # metres: a motorcycle in a lab
    with np.load(photos.package_file("skimage", "data/motorcycle_disp.npz")) as npz:
        disp = npz["arr_0"][valid == 1]
    fb = photos.STEREO_FOCAL_PX * photos.STEREO_BASELINE_M
    np.testing.assert_allclose(d * (disp + photos.STEREO_DOFFS_PX), fb, rtol=1e-5)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("photos")
    return data_dir, photos.prepare(data_dir, SMALL_CROPS), photos.prepare(data_dir, SMALL_STEREO)


def test_crops_array_record_splits(built):
    data_dir, b, _ = built
    files = sorted(p.name for p in b.data_path.iterdir() if "array_record" in p.name)
    assert files and all("array_record" in f for f in files)
    train, test = b.as_data_source("train"), b.as_data_source("test")
    n_train = len(photos.CATALOGUE) - len(photos.TEST_PHOTOS)
    assert len(train) == 2 * n_train and len(test) == len(photos.TEST_PHOTOS)
    test_names = {test[i]["photo"].decode() for i in range(len(test))}
    train_names = {train[i]["photo"].decode() for i in range(len(train))}
    assert test_names == set(photos.TEST_PHOTOS) and not test_names & train_names
    ex = adapters.image_only(train[0])
    assert set(ex) == {"image"} and ex["image"].shape == (32, 32, 3)
    assert ex["image"].dtype == np.uint8


def test_crops_are_deterministic(built, tmp_path):
    _, b, _ = built
    again = photos.prepare(tmp_path, SMALL_CROPS).as_data_source("test")
    first = b.as_data_source("test")
    by_name = {first[i]["photo"]: first[i]["image"] for i in range(len(first))}
    for i in range(len(again)):
        np.testing.assert_array_equal(again[i]["image"], by_name[again[i]["photo"]])


def test_stereo_crops_keep_depth_values(built):
    _, _, b = built
    _, depth, _ = photos.stereo_depth()
    full = np.unique(depth)
    ds = b.as_data_source("train")
    assert len(ds) == 3
    for i in range(len(ds)):
        ex = adapters.photos_stereo(ds[i])
        assert set(ex) == {"image", "depth", "valid"}
        assert ex["depth"].shape == ex["valid"].shape == (48, 48)
        assert ex["depth"].dtype == np.float32
        assert ex["valid"].dtype == np.uint8 and 0.5 < ex["valid"].mean() <= 1
        # Nearest-neighbour resampling: every value is one of the full-resolution depths.
        assert np.isin(ex["depth"], full).all()
        assert np.all((ex["depth"] > 0) == (ex["valid"] == 1))


def test_make_config_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        photos.make_config("video")
