"""Monocular depth: gray target, near = bright.

Encoding (our choice; the paper only says "grayscale, near = bright"): log depth, min-max
normalised per rendering over the valid pixels,
    v = 255 * (log far - log d) / (log far - log near),   near/far = min/max valid depth,
so the nearest pixel is white and the farthest black. Invalid pixels (``valid`` == 0, d <= 0
or non-finite) are drawn black. Log depth spreads the 8 bits evenly in *relative* depth: the
round trip error is at most half a gray step,
    |d_hat / d - 1| <= exp(log(far / near) / 510) - 1     (0.45 % for far/near = 10),
which is the bound the tests check. Decoding needs (near, far): ``context`` carries them (or
``ctx`` may be the example itself). They come from the ground truth, so "metric" scores of a
decoded prediction are range-aligned to the truth, much like the scale-and-shift alignment of
affine-invariant depth evaluations (the image alone fixes depth only up to that range).
Without them decode returns *relative* depth assuming far/near = ``default_ratio`` and
near = 1, for scale-(and-shift-)aligned metrics.
For clips (video depth) one range covers the whole clip so brightness is comparable over time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lavin_jax.data.tasks import Task, register
from lavin_jax.data.tasks.drawing import gray_rgb, image_of, per_frame, pred_frames, single


def valid_mask(example: Mapping[str, Any]) -> np.ndarray:
    """bool [T,H,W]: finite, positive depth (and the source's "valid" mask when given)."""
    d = per_frame(example, "depth").astype(np.float64)
    ok = np.isfinite(d) & (d > 0)
    if "valid" in example:
        ok &= per_frame(example, "valid").astype(bool)
    return ok


def depth_range(depth: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """(near, far) over valid pixels; far > near always (a flat scene gets a tiny spread)."""
    if not valid.any():
        return 1.0, 2.0
    near, far = float(depth[valid].min()), float(depth[valid].max())
    return near, max(far, near * (1 + 1e-4))


def encode_depth(depth: np.ndarray, valid: np.ndarray, near: float, far: float) -> np.ndarray:
    """Depth [...] -> gray level float [...] in [0, 255] (log, near = 255, invalid = 0)."""
    d = np.where(valid, depth, far).astype(np.float64)
    v = (np.log(far) - np.log(np.clip(d, near, far))) / (np.log(far) - np.log(near))
    return np.where(valid, 255.0 * v, 0.0)


def decode_depth(gray: np.ndarray, near: float, far: float) -> np.ndarray:
    """Inverse of :func:`encode_depth`: gray [...] in [0, 255] -> depth float32 [...]."""
    v = np.clip(gray / 255.0, 0.0, 1.0)
    return np.exp(np.log(far) - v * (np.log(far) - np.log(near))).astype(np.float32)


def relative_error_bound(near: float, far: float) -> float:
    """Max |d_hat/d - 1| of an exact uint8 round trip (half a gray step in log depth)."""
    return float(np.expm1(np.log(far / near) / 510.0))


@register
class DepthTask(Task):
    name = "depth"
    requires = ("image", "depth")
    metrics = ("abs_rel", "delta1", "rmse")
    higher_is_better = False

    @classmethod
    def default_options(cls):
        return {"default_ratio": 10.0}  # far/near assumed when decoding without a range

    def _range(self, example: Mapping[str, Any]) -> tuple[float, float]:
        return depth_range(per_frame(example, "depth"), valid_mask(example))

    def draw(self, example, choice):
        depth, valid = per_frame(example, "depth"), valid_mask(example)
        target = gray_rgb(encode_depth(depth, valid, *self._range(example)))
        return image_of(example), target

    def context(self, example, choice=None):
        return {**(choice or {}), "depth_range": self._range(example)}

    def truth(self, example, choice=None):
        """Metric depth float32 [(T,)H,W], NaN where invalid."""
        d = np.where(valid_mask(example), per_frame(example, "depth"), np.nan)
        return single(d.astype(np.float32), self.is_video)

    def decode(self, pred, ctx=None):
        """Depth float32 [(T,)H,W]: metres given ctx's range, else relative (near = 1)."""
        if ctx is not None and "depth_range" in ctx:
            near, far = ctx["depth_range"]
        elif ctx is not None and "depth" in ctx:
            near, far = self._range(ctx)
        else:
            near, far = 1.0, float(self.options["default_ratio"])
        gray = pred_frames(pred).mean(-1)
        return single(decode_depth(gray, near, far), self.is_video)

    def baseline(self, example, choice=None):
        """The example's median valid depth everywhere."""
        d, ok = per_frame(example, "depth"), valid_mask(example)
        med = float(np.median(d[ok])) if ok.any() else 1.0
        return single(np.full(d.shape, med, np.float32), self.is_video)
