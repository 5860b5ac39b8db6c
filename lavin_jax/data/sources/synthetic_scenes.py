"""`synthetic_scenes`: the embedded default dataset, rendered procedurally (no download).

A TFDS builder writing ArrayRecord, read back as a random-access data source
(`lavin_jax.data.prepare.load_source`). Each config is one resolution and one example kind:

  "64", "128", "256", "512"          still images with every annotation
  "clips5_64", ..., "clips9_256"     clips of 1 + 4k frames (5 or 9)
  any other "<R>", "clips<T>_<R>"    a custom config (R in 16..1024, T = 1 + 4k), and a
  "_n<N>" suffix                     caps every split at N examples (small runs)

Example schema: see lavin_jax/data/render.py (same keys, plus "seed", the int64 the example
was rendered from). boxes / box_classes / keypoints have a variable first dimension
N = num_objects (TFDS Tensor with shape (None, ...)); batch them by padding downstream.
Record i of a split is `render_example(SPLIT_SEEDS[split] + i, R)` (shuffling disabled), so
any example can be re-rendered from its seed without the files.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from lavin_jax.data import render, scenes

SPLIT_SEEDS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
_IMAGE_SIZES = {64: (2000, 100, 100), 128: (5000, 200, 200), 256: (5000, 200, 200),
                512: (1000, 100, 100)}  # fmt: skip
_CLIP_SIZES = {64: (200, 20, 20), 128: (1000, 50, 50), 256: (1000, 50, 50), 512: (200, 20, 20)}
_NAME = re.compile(r"^(?:clips(\d+)_)?(\d+)(?:_n(\d+))?$")


@dataclasses.dataclass(eq=False)
class SyntheticScenesConfig(tfds.core.BuilderConfig):
    """kind "image" or "clip"; square resolution; frames per clip; examples per split."""

    kind: str = "image"
    resolution: int = 64
    frames: int = 1
    splits: tuple[tuple[str, int], ...] = ()


def _config(kind: str, res: int, frames: int, sizes: tuple[int, int, int], cap: int | None):
    name = (f"clips{frames}_" if kind == "clip" else "") + str(res)
    if cap is not None:
        name += f"_n{cap}"
        sizes = tuple(min(s, cap) for s in sizes)
    what = f"{frames}-frame clips" if kind == "clip" else "images"
    return SyntheticScenesConfig(
        name=name, version="1.0.0", kind=kind, resolution=res, frames=frames,
        splits=tuple(zip(SPLIT_SEEDS, sizes)),
        description=f"{res}x{res} {what}; examples per split: {dict(zip(SPLIT_SEEDS, sizes))}",
    )  # fmt: skip


_CONFIGS = (
    [_config("image", r, 1, s, None) for r, s in _IMAGE_SIZES.items()]
    + [_config("clip", r, 5, s, None) for r, s in _CLIP_SIZES.items()]
    + [_config("clip", r, 9, _CLIP_SIZES[r], None) for r in (64, 128, 256)]
)


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
    """Procedural 3D scenes (ray cast): RGB, depth, normals, segmentation, boxes, poses, flow."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = _CONFIGS
    DEFAULT_CONFIG_NAME = "64"

    def __init__(self, *, workers: int | None = None, file_format=None, **kwargs):
        """workers: render processes while preparing (default: the CPU count, at most 8)."""
        self._workers = workers or min(8, os.cpu_count() or 1)
        super().__init__(file_format=file_format or "array_record", **kwargs)

    @classmethod
    def make_config(
        cls,
        config: str | None = None,
        *,
        resolution: int | None = None,
        frames: int | None = None,
        num_examples: int | None = None,
    ):
        """The config for a name ("64", "clips5_128", "96_n20", ...) with optional overrides.

        Returns the registered config when the result is one, else a custom config.
        """
        m = _NAME.match(config or cls.DEFAULT_CONFIG_NAME)
        if m is None:
            raise ValueError(
                f"--config {config!r}: expected '<R>' or 'clips<T>_<R>' (optional '_n<N>'), "
                f"e.g. 64, clips5_64, 128_n100"
            )
        t, r, n = (int(g) if g else None for g in m.groups())
        frames = frames or t
        res = resolution or r
        cap = num_examples if num_examples is not None else n
        kind = "clip" if frames and frames > 1 else "image"
        render.check_args(res, frames or 1)
        table = _CLIP_SIZES if kind == "clip" else _IMAGE_SIZES
        sizes = table.get(res, table[64])
        want = _config(kind, res, frames or 1, sizes, cap)
        known = {c.name: c for c in cls.BUILDER_CONFIGS}
        return known.get(want.name, want)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        r = cfg.resolution
        zlib = tfds.features.Encoding.ZLIB
        t = (cfg.frames,) if cfg.kind == "clip" else ()

        def dense(shape, dtype):
            return tfds.features.Tensor(shape=t + shape, dtype=dtype, encoding=zlib)

        feats = {
            "depth": dense((r, r), np.float32),
            "normals": dense((r, r, 3), np.float32),
            "semantic": dense((r, r), np.uint8),
            "instance": dense((r, r), np.int32),
            "camera": tfds.features.Tensor(shape=(3, 3), dtype=np.float32),
            "seed": tfds.features.Scalar(dtype=np.int64),
        }
        if cfg.kind == "clip":
            feats["frames"] = dense((r, r, 3), np.uint8)
            feats["flow"] = dense((r, r, 2), np.float32)
        else:
            k = scenes.NUM_KEYPOINTS
            feats.update(
                image=tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                edges=dense((r, r), np.uint8),
                num_objects=tfds.features.Scalar(dtype=np.int32),
                boxes=tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                box_classes=tfds.features.Tensor(shape=(None,), dtype=np.int32),
                keypoints=tfds.features.Tensor(shape=(None, k, 3), dtype=np.float32),
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n")[0],
            features=tfds.features.FeaturesDict(feats),
            disable_shuffling=True,  # record i <-> seed SPLIT_SEEDS[split] + i
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {s: self._generate_examples(s, n) for s, n in self.builder_config.splits if n > 0}

    def _generate_examples(self, split: str, n: int):
        cfg = self.builder_config
        # render.render_seeded lives in a numpy-only module: spawned workers never import TFDS.
        fn = functools.partial(render.render_seeded, cfg.kind, cfg.resolution, cfg.frames)
        seeds = range(SPLIT_SEEDS[split], SPLIT_SEEDS[split] + n)
        workers = min(self._workers, max(1, n // 16))
        if workers <= 1:
            for i, s in enumerate(seeds):
                yield i, fn(s)
            return
        # "spawn": never fork a process that may hold TensorFlow / JAX threads.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            yield from enumerate(pool.imap(fn, seeds, chunksize=4))
