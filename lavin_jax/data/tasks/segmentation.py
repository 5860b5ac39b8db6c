"""Panoptic, foreground and video segmentation.

Panoptic: every segment -- a distinct (semantic, instance) pair; semantic-only ("stuff") pixels
with instance 0 form one segment per class -- gets a random colour (drawn from the rendering's
rng, in [40, 255]^3, pairwise L-inf distance >= 48); background (class 0, instance 0) is black.
Colours carry no class, so decoding gives class-agnostic segments. A prediction with at most
256 distinct integer colours is read as clean: each colour is a segment, however small (exact
on clean targets). Otherwise ``decode`` clusters colours (coarse 8-level histogram bins,
largest first, a new centre only if > 40 RGB units from every centre, bins smaller than
``min_frac`` of the pixels ignored, every pixel to its nearest centre, near-black =
background). Either way the result is int32 ids 1..K by decreasing area.
Foreground: one class (option mode="class", Pascal-5i style) or one instance (mode="instance")
white on black; which one is a choice (``{"cls": c}`` / ``{"inst": i}``) so context pairs can
share it. Decoding thresholds the gray level at 127.5 (exact on clean targets).
Video segmentation: panoptic drawing of the clip's instance tracks, one colour per track for
the whole window; decoding clusters all frames jointly so ids stay consistent over time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lavin_jax.data.tasks import Task, register
from lavin_jax.data.tasks.drawing import (
    gray_rgb,
    image_of,
    per_frame,
    pred_frames,
    random_colors,
    single,
)
from lavin_jax.data.tasks.video import ClipWindow

MERGE_DIST = 40.0  # RGB distance under which two histogram peaks are one segment


def segment_ids(example: Mapping[str, Any]) -> np.ndarray:
    """int32 [T,H,W] segment ids 1..K of (semantic, instance) pairs, 0 = background."""
    inst = per_frame(example, "instance").astype(np.int64)
    sem = per_frame(example, "semantic").astype(np.int64) if "semantic" in example else 0 * inst
    key = sem * (int(inst.max()) + 1) + inst  # unique per pair; 0 iff both are 0
    uniq, inv = np.unique(key, return_inverse=True)
    ids = inv.reshape(key.shape) + (0 if uniq[0] == 0 else 1)
    return ids.astype(np.int32)


def _by_area(labels: np.ndarray, n: int) -> np.ndarray:
    """Relabel 0..n-1 labels to 1..K by decreasing area; label 0 stays background."""
    area = np.bincount(labels, minlength=n)
    order = [c for c in np.argsort(-area[1:], kind="stable") + 1 if area[c] > 0]
    remap = np.zeros(n, np.int32)
    remap[order] = np.arange(1, len(order) + 1)
    return remap[labels]


def cluster_colors(pix: np.ndarray, min_frac: float = 1e-3, max_exact: int = 256) -> np.ndarray:
    """Pixels float [..., 3] in [0, 255] -> int32 [...] segment ids, 0 = near-black."""
    flat = pix.reshape(-1, 3)
    exact, exact_inv = np.unique(np.rint(flat).astype(np.int64) @ [65536, 256, 1],
                                 return_inverse=True)
    if len(exact) <= max_exact and np.allclose(flat, np.rint(flat)):
        # a clean rendering: every colour is a segment, however small
        rgb = np.stack([exact // 65536, exact // 256 % 256, exact % 256], -1)
        dark = np.linalg.norm(rgb, axis=-1) <= MERGE_DIST
        lab = np.where(dark, 0, np.cumsum(~dark))
        return _by_area(lab[exact_inv.ravel()], int(lab.max()) + 1).reshape(pix.shape[:-1])
    q = np.clip(flat // 8, 0, 31).astype(np.int64)
    key = (q[:, 0] * 32 + q[:, 1]) * 32 + q[:, 2]
    uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    means = np.stack([np.bincount(inv, flat[:, c], len(uniq)) for c in range(3)], -1)
    means /= counts[:, None]
    centers = [np.zeros(3)]
    min_count = max(1, int(min_frac * len(flat)))
    for i in np.argsort(-counts, kind="stable"):
        if counts[i] < min_count:
            break
        if np.linalg.norm(np.array(centers) - means[i], axis=1).min() > MERGE_DIST:
            centers.append(means[i])
    cen = np.array(centers)
    bin_label = np.linalg.norm(means[:, None] - cen[None], axis=-1).argmin(1)
    return _by_area(bin_label[inv.ravel()], len(cen)).reshape(pix.shape[:-1])


def paint_segments(ids: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """ids int [...] (0 = background) -> uint8 [..., 3] with colour ids-1, black for 0."""
    lut = np.concatenate([np.zeros((1, 3), np.uint8), colors.astype(np.uint8)])
    return lut[ids]


@register
class PanopticTask(Task):
    name = "panoptic"
    requires = ("image", "instance")  # + "semantic" when the source has it
    metrics = ("pq", "sq", "rq")

    @classmethod
    def default_options(cls):
        return {"min_frac": 1e-3}  # decode ignores colours covering less than this fraction

    def choose(self, example, rng):
        return {"colors": random_colors(int(segment_ids(example).max()), rng)}

    def draw(self, example, choice):
        ids = segment_ids(example)
        colors = np.asarray(choice["colors"])
        if len(colors) < ids.max():
            raise ValueError(f"choice has {len(colors)} colours for {ids.max()} segments")
        return image_of(example), paint_segments(ids, colors)

    def truth(self, example, choice=None):
        """int32 [(T,)H,W] segment ids, 0 = background."""
        return single(segment_ids(example), self.is_video)

    def decode(self, pred, ctx=None):
        """int32 [(T,)H,W] segment ids 1..K by area, 0 = background."""
        return single(cluster_colors(pred_frames(pred), self.options["min_frac"]), self.is_video)

    def baseline(self, example, choice=None):
        """All background."""
        return np.zeros_like(self.truth(example))


@register
class ForegroundTask(Task):
    name = "foreground"
    metrics = ("miou",)

    @classmethod
    def default_options(cls):
        return {"mode": "class"}  # "class": one semantic class; "instance": one instance

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["mode"] not in ("class", "instance"):
            raise ValueError(f"foreground mode must be 'class' or 'instance', got {self.options}")
        key = "semantic" if self.options["mode"] == "class" else "instance"
        self.requires, self._key, self._pick = ("image", key), key, (
            "cls" if key == "semantic" else "inst"
        )

    def choose(self, example, rng):
        present = np.unique(np.asarray(example[self._key]))
        present = present[present != 0]
        return {self._pick: int(rng.choice(present)) if len(present) else -1}

    def _mask(self, example, choice):
        return per_frame(example, self._key) == choice[self._pick]

    def draw(self, example, choice):
        return image_of(example), gray_rgb(self._mask(example, choice) * 255.0)

    def truth(self, example, choice=None):
        """bool [H,W] foreground mask."""
        return single(self._mask(example, self.default_choice(example, choice)), self.is_video)

    def decode(self, pred, ctx=None):
        """bool [H,W]: gray level > 127.5."""
        return single(pred_frames(pred).mean(-1) > 127.5, self.is_video)

    def baseline(self, example, choice=None):
        """All background."""
        return np.zeros(np.asarray(example[self._key]).shape, bool)


@register
class VideoSegmentationTask(ClipWindow, PanopticTask):
    name = "video_segmentation"
    requires = ("frames", "instance")
    metrics = ("j_and_f", "j", "f")
