"""Shared drawing and reading helpers for task renderings (numpy; scipy where handy).

Pixel convention: pixel (r, c) covers [r, r+1) x [c, c+1) in pixel units, its centre is
(r + 0.5, c + 0.5); a normalised coordinate y in [0, 1] is y * H in pixel units.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float values in [0, 255] -> rounded, clipped uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gray_rgb(v: np.ndarray) -> np.ndarray:
    """[...] values in [0, 255] -> uint8 [..., 3] with R = G = B."""
    g = to_uint8(v)
    return np.repeat(g[..., None], 3, axis=-1)


def pred_frames(pred: np.ndarray) -> np.ndarray:
    """A prediction [T,H,W,3] or [H,W,3] -> float32 [T,H,W,3] in [0, 255].

    uint8 is read as [0, 255]; any float dtype as [0, 1].
    """
    p = np.asarray(pred)
    if p.ndim == 3:
        p = p[None]
    if p.ndim != 4 or p.shape[-1] != 3:
        raise ValueError(f"prediction must be [T,H,W,3] or [H,W,3] RGB, got shape {p.shape}")
    if p.dtype == np.uint8:
        return p.astype(np.float32)
    if np.issubdtype(p.dtype, np.floating):
        return np.clip(p.astype(np.float32), 0.0, 1.0) * 255.0
    raise ValueError(f"prediction dtype must be uint8 or float, got {p.dtype}")


def single(x: np.ndarray, is_video: bool) -> np.ndarray:
    """Drop the frame axis of a one-frame result for image tasks."""
    return x if is_video else x[0]


def image_of(example: Mapping[str, Any]) -> np.ndarray:
    """The example's RGB frames as uint8 [T,H,W,3] ("image" -> T = 1, else "frames")."""
    x = example["image"][None] if "image" in example else example["frames"]
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"example image/frames must be uint8 [..,H,W,3], got {x.dtype} {x.shape}")
    return x


def unit_image(pred: np.ndarray, is_video: bool) -> np.ndarray:
    """Identity decode of an image prediction: float32 [(T,)H,W,3] in [0, 1]."""
    return single(pred_frames(pred) / 255.0, is_video)


# ---- colours ---------------------------------------------------------------------------
def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """float [..., 3] HSV in [0, 1] -> float32 [..., 3] RGB in [0, 1] (the usual hexcone)."""
    hsv = np.asarray(hsv, np.float32)
    h6, s, v = hsv[..., :1] * 6.0, hsv[..., 1:2], hsv[..., 2:3]
    # pure-hue ramps for R, G, B at full saturation and value
    centre = np.array([0.0, 2.0, 4.0], np.float32)  # where R, G, B peak, in sixths of a turn
    ramp = np.clip(2.0 - np.abs(np.mod(h6 - centre + 3.0, 6.0) - 3.0), 0.0, 1.0)
    return v * (1.0 - s + s * ramp)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float [..., 3] RGB in [0, 1] -> float32 [..., 3] HSV in [0, 1]."""
    rgb = np.asarray(rgb, np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, c = rgb.max(-1), rgb.max(-1) - rgb.min(-1)
    safe = np.maximum(c, 1e-12)
    h = np.where(v == r, np.mod((g - b) / safe, 6.0),
                 np.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(c > 0, h / 6.0, 0.0)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    return np.stack([h, s, v], -1).astype(np.float32)


def hue_colors(n: int, value: float = 1.0) -> np.ndarray:
    """n fully saturated colours with evenly spaced hues, uint8 [n, 3]."""
    hsv = np.stack([np.arange(n) / max(n, 1), np.ones(n), np.full(n, value)], -1)
    return to_uint8(hsv_to_rgb(hsv[None])[0] * 255)


# Fixed class palette: white, then 15 fully bright hues 24 degrees apart (pairwise RGB L-inf
# distance >= 102). One brightness level only, so a class is read from the hue of a dimmed or
# blurred line (see full_brightness).
CLASS_PALETTE = np.concatenate([np.array([[255, 255, 255]], np.uint8), hue_colors(15)])


def full_brightness(pixels: np.ndarray) -> np.ndarray:
    """float [..., 3] colours scaled so their largest channel is 255 (keeps hue/saturation)."""
    p = np.asarray(pixels, np.float32)
    return p * (255.0 / np.maximum(p.max(-1, keepdims=True), 1.0))


def random_colors(n: int, rng: np.random.Generator, min_dist: float = 48.0) -> np.ndarray:
    """n random colours in [40, 255]^3, pairwise L-inf distance >= min_dist when possible.

    Far from black (so a segment never reads as background); rejection sampling, with the
    distance requirement relaxed when n is too large to satisfy it. uint8 [n, 3].
    """
    out: list[np.ndarray] = []
    d = min_dist
    while len(out) < n:
        cand = rng.integers(40, 256, size=(64, 3))
        for c in cand:
            if all(np.abs(c - o).max() >= d for o in out):
                out.append(c)
                if len(out) == n:
                    break
        d *= 0.9  # too crowded: relax so large n always terminates
    return np.array(out, np.uint8).reshape(n, 3)


def nearest_color(pixels: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour [...] and its Euclidean distance [...]."""
    d = np.linalg.norm(pixels[..., None, :] - palette.astype(np.float32), axis=-1)
    idx = d.argmin(-1)
    return idx, np.take_along_axis(d, idx[..., None], -1)[..., 0]


# ---- rasterisation ---------------------------------------------------------------------
def draw_segment(
    canvas: np.ndarray, p0: np.ndarray, p1: np.ndarray, color, radius: float
) -> None:
    """Paint pixels whose centre is within ``radius`` of segment p0-p1 (pixel units, (y, x))."""
    h, w = canvas.shape[:2]
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    lo = np.floor(np.minimum(p0, p1) - radius - 1).astype(int)
    hi = np.ceil(np.maximum(p0, p1) + radius + 1).astype(int)
    r0, c0 = max(lo[0], 0), max(lo[1], 0)
    r1, c1 = min(hi[0], h), min(hi[1], w)
    if r0 >= r1 or c0 >= c1:
        return
    yy, xx = np.mgrid[r0:r1, c0:c1] + 0.5
    d = p1 - p0
    t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-12)
    t = np.clip(t, 0.0, 1.0)
    dist2 = (yy - p0[0] - t * d[0]) ** 2 + (xx - p0[1] - t * d[1]) ** 2
    canvas[r0:r1, c0:c1][dist2 <= radius * radius] = color


def box_pixels(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """Normalised (ymin,xmin,ymax,xmax) [N,4] -> inclusive pixel rows/cols (r0,c0,r1,c1) int.

    r0 = round(ymin*H), r1 = round(ymax*H) - 1, at least 2 px per side, clipped to the image.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4) * np.array([h, w, h, w])
    px = np.rint(b).astype(int) - np.array([0, 0, 1, 1])
    px[:, 0] = np.clip(px[:, 0], 0, h - 2)
    px[:, 1] = np.clip(px[:, 1], 0, w - 2)
    px[:, 2] = np.clip(np.maximum(px[:, 2], px[:, 0] + 1), 0, h - 1)
    px[:, 3] = np.clip(np.maximum(px[:, 3], px[:, 1] + 1), 0, w - 1)
    return px


def pixels_box(px: np.ndarray, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`box_pixels`: float32 [N, 4] normalised boxes."""
    px = np.asarray(px, np.float64).reshape(-1, 4) + np.array([0, 0, 1, 1])
    return (px / np.array([h, w, h, w])).astype(np.float32)


def draw_box(canvas: np.ndarray, px, color, thickness: int) -> None:
    """Outline of the inclusive pixel box (r0,c0,r1,c1), ``thickness`` px inwards."""
    r0, c0, r1, c1 = (int(v) for v in px)
    t = max(1, min(thickness, (r1 - r0 + 1) // 2, (c1 - c0 + 1) // 2))
    canvas[r0:r0 + t, c0:c1 + 1] = color
    canvas[r1 - t + 1:r1 + 1, c0:c1 + 1] = color
    canvas[r0:r1 + 1, c0:c0 + t] = color
    canvas[r0:r1 + 1, c1 - t + 1:c1 + 1] = color


def stroke(h: int, w: int) -> int:
    """Default line width scale for a canvas: 1 px up to 191 px, +1 per 128 px after."""
    return max(1, int(round(min(h, w) / 128)))


def line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Normalised linear motion-blur kernel [k, k] (odd k) along ``angle_deg``."""
    k = int(np.ceil(length)) | 1
    ker = np.zeros((k, k), np.float64)
    a = np.deg2rad(angle_deg)
    s = np.linspace(-(length - 1) / 2, (length - 1) / 2, 8 * k)
    rr = np.rint(k // 2 - s * np.sin(a)).astype(int)
    cc = np.rint(k // 2 + s * np.cos(a)).astype(int)
    np.add.at(ker, (np.clip(rr, 0, k - 1), np.clip(cc, 0, k - 1)), 1.0)
    return ker / ker.sum()


def per_frame(example: Mapping[str, Any], key: str) -> np.ndarray:
    """``example[key]`` with a leading frame axis: image examples gain T = 1, clips keep T."""
    x = np.asarray(example[key])
    return x if "frames" in example else x[None]


# ---- clips -----------------------------------------------------------------------------
def clip_start(example: Mapping[str, Any], n: int, rng: np.random.Generator, name: str) -> int:
    """A random start frame for an n-frame window of the clip (error if it is too short)."""
    t = np.asarray(example["frames"]).shape[0]
    if t < n:
        raise ValueError(
            f"task {name!r} needs clips of >= {n} frames, got {t}; lower the task's "
            f"frame-count option or use longer clips"
        )
    return int(rng.integers(0, t - n + 1))


def crop_clip(example: Mapping[str, Any], start: int, n: int) -> dict[str, Any]:
    """The clip example with every per-frame array cut to frames [start, start + n)."""
    t = np.asarray(example["frames"]).shape[0]
    out = {}
    for k, v in example.items():
        a = np.asarray(v) if isinstance(v, np.ndarray) else None
        out[k] = a[start:start + n] if a is not None and a.ndim >= 1 and a.shape[0] == t else v
    return out
