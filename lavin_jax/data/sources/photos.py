"""``photos``: real photographs that ship inside pip packages, as a TFDS builder (ArrayRecord).

Two configs:

- ``photos/crops`` (restoration tasks): colour photographs found on disk in the installed
  scikit-image (``skimage/data``), scikit-learn (``sklearn/datasets/images``) and matplotlib
  (``mpl-data/sample_data``) packages. Each photo gives ``crops_per_photo`` random square crops
  resized to ``resolution`` (Lanczos). Provides ``image``. Files that are absent (scikit-image
  fetches some images with pooch on demand; an uninstalled package) are skipped, so the
  content follows the pinned requirements. Held-out photos (``TEST_PHOTOS``) form ``test``.
- ``photos/stereo`` (a real depth example): the left view of scikit-image's Middlebury 2014
  "motorcycle" stereo pair (4x down-sampled) with its ground-truth disparity turned into metric
  depth with the calibration that skimage documents for those down-sampled images,
      depth [m] = f * B / (disparity + doffs),  f = 994.978 px, B = 0.193001 m, doffs = 31.086 px
  (Middlebury's Z = baseline * f / (d + doffs)); ``valid`` = 1 where the disparity is known
  (finite). Provides ``image``, ``depth``, ``valid``. There is a single scene: ``test`` holds
  other crops of the same scene (not held out), for smoke evaluation only.

Crops are deterministic per (config seed, photo name, crop index); the side of a crop is
drawn in [max(min_scale * short, min(short, resolution)), short] so a photo is never
up-sampled unless it is smaller than ``resolution``. Depth and ``valid`` are resized with
nearest-neighbour sampling (no mixing across depth edges; ``valid`` stays exact).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import zlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# (name, package, path inside the package). Colour photographs only: grey ones would teach
# nothing for colorization and are few.
CATALOGUE: tuple[tuple[str, str, str], ...] = (
    ("astronaut", "skimage", "data/astronaut.png"),
    ("chelsea", "skimage", "data/chelsea.png"),
    ("coffee", "skimage", "data/coffee.png"),
    ("rocket", "skimage", "data/rocket.jpg"),
    ("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg"),
    ("retina", "skimage", "data/retina.jpg"),
    ("immunohistochemistry", "skimage", "data/ihc.png"),
    ("motorcycle_left", "skimage", "data/motorcycle_left.png"),
    ("china", "sklearn", "datasets/images/china.jpg"),
    ("flower", "sklearn", "datasets/images/flower.jpg"),
    ("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
TEST_PHOTOS = ("coffee", "flower")
# Middlebury 2014 "motorcycle", calibration for skimage's 4x down-sampled copy (its docstring).
STEREO_FOCAL_PX = 994.978
STEREO_BASELINE_M = 0.193001
STEREO_DOFFS_PX = 31.086


def package_file(package: str, rel: str) -> Path | None:
    """Path of ``rel`` inside an installed top-level package (not imported), or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / rel
        if path.is_file():
            return path
    return None


def available_photos() -> list[tuple[str, Path]]:
    """(name, path) of every catalogue photo present on disk, in catalogue order."""
    found = []
    for name, package, rel in CATALOGUE:
        path = package_file(package, rel)
        if path is None:
            logging.info("photos: %s (%s/%s) not on disk; skipped", name, package, rel)
        else:
            found.append((name, path))
    return found


def load_rgb(path: Path) -> np.ndarray:
    """uint8 [H,W,3] (alpha dropped, grey replicated)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def stereo_depth() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], depth float32 [H,W] metres, valid uint8 [H,W]) of the stereo pair."""
    left = package_file("skimage", "data/motorcycle_left.png")
    disp_file = package_file("skimage", "data/motorcycle_disp.npz")
    if left is None or disp_file is None:
        raise FileNotFoundError(
            "photos/stereo: skimage/data/motorcycle_left.png or motorcycle_disp.npz missing; "
            "reinstall scikit-image from requirements.txt"
        )
    with np.load(disp_file) as npz:
        disp = npz["arr_0"].astype(np.float64)
    valid = np.isfinite(disp) & (disp + STEREO_DOFFS_PX > 0)
    depth = np.zeros(disp.shape, np.float32)
    depth[valid] = STEREO_FOCAL_PX * STEREO_BASELINE_M / (disp[valid] + STEREO_DOFFS_PX)
    return load_rgb(left), depth, valid.astype(np.uint8)


def crop_boxes(
    h: int, w: int, n: int, resolution: int, min_scale: float, rng: np.random.Generator
) -> np.ndarray:
    """int64 [n, 4] square crops (y0, x0, y1, x1) inside an [h, w] image."""
    short = min(h, w)
    lo = max(int(round(min_scale * short)), min(short, resolution))
    sides = rng.integers(lo, short + 1, size=n)
    y0 = (rng.random(n) * (h - sides + 1)).astype(np.int64)
    x0 = (rng.random(n) * (w - sides + 1)).astype(np.int64)
    return np.stack([y0, x0, y0 + sides, x0 + sides], axis=1)


def resize_image(img: np.ndarray, box: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [r, r, 3]: the box of ``img`` resized with Lanczos (antialiased)."""
    y0, x0, y1, x1 = (int(v) for v in box)
    out = Image.fromarray(img).resize(
        (resolution, resolution), Image.Resampling.LANCZOS, box=(x0, y0, x1, y1)
    )
    return np.asarray(out)


def resize_nearest(a: np.ndarray, box: np.ndarray, resolution: int) -> np.ndarray:
    """[r, r] nearest-neighbour resample of ``a`` [H, W] inside box (pixel-centre sampling)."""
    y0, x0, y1, x1 = (int(v) for v in box)
    ys = y0 + ((np.arange(resolution) + 0.5) * (y1 - y0) / resolution).astype(np.int64)
    xs = x0 + ((np.arange(resolution) + 0.5) * (x1 - x0) / resolution).astype(np.int64)
    return a[np.minimum(ys, y1 - 1)[:, None], np.minimum(xs, x1 - 1)[None, :]]


def photo_rng(seed: int, name: str, split: str) -> np.random.Generator:
    """Stable per-photo stream: adding a photo to the catalogue leaves the others' crops alone."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(split.encode())])


@dataclasses.dataclass(eq=False)
class PhotosConfig(tfds.core.BuilderConfig):
    """kind: "crops" or "stereo"; resolution: output side in px; crops_per_photo per split."""

    kind: str = "crops"
    resolution: int = 256
    crops_per_photo: int = 16
    test_crops_per_photo: int = 4
    min_scale: float = 0.35
    seed: int = 0


def make_config(
    kind: str = "crops",
    resolution: int = 256,
    crops_per_photo: int = 16,
    test_crops_per_photo: int = 4,
    min_scale: float = 0.35,
    seed: int = 0,
) -> PhotosConfig:
    """A config named by its parameters, so differently built copies live in separate dirs."""
    if kind not in ("crops", "stereo"):
        raise ValueError(f"photos: kind={kind!r}; use 'crops' or 'stereo'")
    name = f"{kind}_{resolution}px_n{crops_per_photo}_t{test_crops_per_photo}_m{min_scale}_s{seed}"
    return PhotosConfig(
        name=name.replace(".", "p"),
        kind=kind,
        resolution=resolution,
        crops_per_photo=crops_per_photo,
        test_crops_per_photo=test_crops_per_photo,
        min_scale=min_scale,
        seed=seed,
        description=f"photos {kind} at {resolution}px",
    )


class Photos(tfds.core.GeneratorBasedBuilder):
    """Random crops of the photographs shipped in installed pip packages (see module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        PhotosConfig(name="crops", kind="crops", description="colour photos, 256px crops"),
        PhotosConfig(
            name="stereo",
            kind="stereo",
            crops_per_photo=64,
            test_crops_per_photo=8,
            description="Middlebury motorcycle left view + metric depth, 256px crops",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        r = cfg.resolution
        features = {"image": tfds.features.Image(shape=(r, r, 3)), "photo": tfds.features.Text()}
        if cfg.kind == "stereo":
            zlib_enc = tfds.features.Encoding.ZLIB
            features["depth"] = tfds.features.Tensor(
                shape=(r, r), dtype=np.float32, encoding=zlib_enc
            )
            features["valid"] = tfds.features.Tensor(
                shape=(r, r), dtype=np.uint8, encoding=zlib_enc
            )
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is on disk already.
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.crops_per_photo),
            "test": self._generate_examples("test", cfg.test_crops_per_photo),
        }

    def _generate_examples(self, split: str, n: int):
        cfg = self.builder_config
        r = cfg.resolution
        if cfg.kind == "stereo":
            image, depth, valid = stereo_depth()
            rng = photo_rng(cfg.seed, "motorcycle", split)
            for i, box in enumerate(crop_boxes(*depth.shape, n, r, cfg.min_scale, rng)):
                yield (
                    f"motorcycle_{i}",
                    {
                        "image": resize_image(image, box, r),
                        "photo": "motorcycle",
                        "depth": resize_nearest(depth, box, r),
                        "valid": resize_nearest(valid, box, r),
                    },
                )
            return
        want_test = split == "test"
        in_split = [(nm, p) for nm, p in available_photos() if (nm in TEST_PHOTOS) == want_test]
        if not in_split:
            raise FileNotFoundError(
                f"photos: no {split} photograph found in skimage/sklearn/matplotlib; install "
                "requirements.txt (scikit-image, scikit-learn, matplotlib)"
            )
        for name, path in in_split:
            image = load_rgb(path)
            rng = photo_rng(cfg.seed, name, split)
            for i, box in enumerate(crop_boxes(*image.shape[:2], n, r, cfg.min_scale, rng)):
                yield f"{name}_{i}", {"image": resize_image(image, box, r), "photo": name}


def builder(data_dir: str | Path, config: str | PhotosConfig = "crops") -> Photos:
    """The builder over an explicit ``data_dir`` (``config``: "crops", "stereo" or a config)."""
    return Photos(config=config, data_dir=str(data_dir))


def prepare(data_dir: str | Path, config: str | PhotosConfig = "crops") -> Photos:
    """Writes the ArrayRecord files (no download: the photos are in installed packages)."""
    b = builder(data_dir, config)
    b.download_and_prepare(file_format="array_record")
    return b
