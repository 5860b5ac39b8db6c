"""Surface normals: RGB = (n + 1) / 2 * 255 (the paper's convention), camera frame as given.

The axes and their signs are the source's camera-frame convention (we do not flip any).
Pixels without a normal (zero or non-finite vector) are drawn (128, 128, 128), i.e. n = 0.
Decoding maps back with n = rgb / 255 * 2 - 1 and renormalises. Quantisation moves each
component by at most 1/255, so the round trip angle error is below
``ANGLE_BOUND_DEG`` = 0.5 degrees (sqrt(3)/255 rad = 0.39 deg), which the tests check.
"""

from __future__ import annotations

import numpy as np

from lavin_jax.data.tasks import Task, register
from lavin_jax.data.tasks.drawing import image_of, per_frame, pred_frames, single, to_uint8

ANGLE_BOUND_DEG = 0.5


def _norm(n: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("...i,...i->...", n, n))


def normal_valid(n: np.ndarray) -> np.ndarray:
    """bool [...]: finite, non-zero normal vectors of n [..., 3]."""
    return np.isfinite(n).all(-1) & (_norm(np.nan_to_num(n)) > 1e-6)


def encode_normals(n: np.ndarray) -> np.ndarray:
    """Unit normals [..., 3] -> uint8 RGB [..., 3]; invalid -> 128 gray."""
    n = np.nan_to_num(np.asarray(n, np.float32))
    norm = _norm(n)[..., None]
    rgb = (n / np.maximum(norm, 1e-12) + 1.0) * 127.5
    return to_uint8(np.where(norm > 1e-6, rgb, 127.5))


def decode_normals(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 255] [..., 3] -> unit normals float32 [..., 3] (renormalised)."""
    n = np.asarray(rgb, np.float32) / 127.5 - 1.0
    norm = _norm(n)[..., None]
    up = np.array([0.0, 0.0, 1.0], np.float32)
    return np.where(norm > 1e-6, n / np.maximum(norm, 1e-12), up).astype(np.float32)


@register
class NormalsTask(Task):
    name = "normals"
    requires = ("image", "normals")
    metrics = ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30")
    higher_is_better = False

    def draw(self, example, choice):
        return image_of(example), encode_normals(per_frame(example, "normals"))

    def truth(self, example, choice=None):
        """Unit normals float32 [(T,)H,W,3], NaN where the source has none."""
        n = per_frame(example, "normals").astype(np.float32)
        return single(np.where(normal_valid(n)[..., None], n, np.nan), self.is_video)

    def decode(self, pred, ctx=None):
        """Unit normals float32 [(T,)H,W,3]."""
        return single(decode_normals(pred_frames(pred)), self.is_video)

    def baseline(self, example, choice=None):
        """The example's mean valid normal (renormalised) everywhere."""
        n = per_frame(example, "normals").astype(np.float64)
        ok = normal_valid(n)
        m = n[ok].mean(0) if ok.any() else np.array([0.0, 0.0, 1.0])
        m = m / max(np.linalg.norm(m), 1e-12)
        return single(np.broadcast_to(m, n.shape).astype(np.float32), self.is_video)
