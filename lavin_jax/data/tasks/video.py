"""Video tasks: frame prediction, video depth/normals, optical flow, depth->video, normal->video.

Every video task renders a window of the clip whose start frame is a random choice
(``{"start": s}``). Per-frame tasks are the image tasks applied to the window (``ClipWindow``
mixin; video segmentation lives in segmentation.py): video depth uses one log-depth range for
the whole window, video normals encode each frame as the image task does.
Defaults: windows of ``num_frames`` = 5 (= 1 + 4k, what the causal ST-VAE compresses without
padding); frame prediction shows ``num_in`` = 4 frames and asks for the next ``num_out`` = 5
(a 1 + 4k target, and it fits the synthetic source's 9-frame clips; set the options otherwise).

Optical flow (frame t -> t+1, (dy, dx) pixels) is drawn in HSV: hue = direction
atan2(dy, dx) / 2pi (0 = +x, i.e. rightwards, red; 1/4 = +y, i.e. downwards), saturation = 1,
value = |flow| / max_mag with max_mag the largest magnitude in the window (per-clip
normalisation, so zero flow is black). ``context`` carries max_mag; without it decode returns
flow in units of max_mag. Round trip end-point error <= ``FLOW_EPE_BOUND`` * max_mag
(1 % of the window's largest motion, checked in the tests).
"""

from __future__ import annotations

import numpy as np

from lavin_jax.data.tasks import Task, register
from lavin_jax.data.tasks.depth import DepthTask
from lavin_jax.data.tasks.drawing import (
    clip_start,
    crop_clip,
    hsv_to_rgb,
    image_of,
    pred_frames,
    rgb_to_hsv,
    to_uint8,
    unit_image,
)
from lavin_jax.data.tasks.generation import Swapped
from lavin_jax.data.tasks.normals import NormalsTask

FLOW_EPE_BOUND = 0.01


class ClipWindow:
    """Mixin (list it before a per-frame Task): the task on a ``num_frames`` window of a clip."""

    is_video = True

    @classmethod
    def default_options(cls):
        return {**super().default_options(), "num_frames": 5}

    def __init__(self, **options):
        super().__init__(**options)
        n = int(self.options["num_frames"])
        self.frames = (n, n)

    def _crop(self, example, choice):
        return crop_clip(example, int(choice["start"]), self.frames[0])

    def choose(self, example, rng):
        start = clip_start(example, self.frames[0], rng, self.name)
        return {**super().choose(crop_clip(example, start, self.frames[0]), rng), "start": start}

    def draw(self, example, choice):
        return super().draw(self._crop(example, choice), choice)

    def context(self, example, choice=None):
        c = self.default_choice(example, choice)
        return {**super().context(self._crop(example, c), c), "start": c["start"]}

    def truth(self, example, choice=None):
        c = self.default_choice(example, choice)
        return super().truth(self._crop(example, c), c)

    def baseline(self, example, choice=None):
        c = self.default_choice(example, choice)
        return super().baseline(self._crop(example, c), c)

    def decode(self, pred, ctx=None):
        if ctx is not None and "frames" in ctx:  # a raw clip: read it as the window at frame 0
            ctx = super().context(crop_clip(ctx, 0, self.frames[0]), None)
        return super().decode(pred, ctx)


@register
class FramePredictionTask(Task):
    name = "frame_prediction"
    requires = ("frames",)
    is_video = True
    metrics = ("fvd", "psnr")
    higher_is_better = False

    @classmethod
    def default_options(cls):
        return {"num_in": 4, "num_out": 5}

    def __init__(self, **options):
        super().__init__(**options)
        self.frames = (int(self.options["num_in"]), int(self.options["num_out"]))

    def choose(self, example, rng):
        return {"start": clip_start(example, sum(self.frames), rng, self.name)}

    def _split(self, example, choice):
        clip = image_of(crop_clip(example, int(choice["start"]), sum(self.frames)))
        return clip[: self.frames[0]], clip[self.frames[0]:]

    def draw(self, example, choice):
        return self._split(example, choice)

    def truth(self, example, choice=None):
        """The future frames, float32 [Tout,H,W,3] in [0, 1]."""
        return self._split(example, self.default_choice(example, choice))[1] / np.float32(255)

    def decode(self, pred, ctx=None):
        return unit_image(pred, True)

    def baseline(self, example, choice=None):
        """The last input frame, repeated."""
        inputs = self._split(example, self.default_choice(example, choice))[0]
        return np.repeat(inputs[-1:], self.frames[1], 0) / np.float32(255)


@register
class VideoDepthTask(ClipWindow, DepthTask):
    name = "video_depth"
    requires = ("frames", "depth")


@register
class VideoNormalsTask(ClipWindow, NormalsTask):
    name = "video_normals"
    requires = ("frames", "normals")


def flow_max_mag(flow: np.ndarray) -> float:
    """Largest finite flow magnitude in pixels (1.0 when there is no motion)."""
    mag = np.hypot(flow[..., 0], flow[..., 1])
    mag = mag[np.isfinite(mag)]
    m = float(mag.max()) if mag.size else 0.0
    return m if m > 1e-6 else 1.0


def encode_flow(flow: np.ndarray, max_mag: float) -> np.ndarray:
    """Flow float [..., 2] (dy, dx) -> uint8 [..., 3] HSV colour wheel (see module doc)."""
    f = np.nan_to_num(np.asarray(flow, np.float32))
    hue = np.mod(np.arctan2(f[..., 0], f[..., 1]) / (2 * np.pi), 1.0)
    val = np.clip(np.hypot(f[..., 0], f[..., 1]) / max_mag, 0.0, 1.0)
    hsv = np.stack([hue, np.ones_like(hue), val], -1)
    return to_uint8(hsv_to_rgb(hsv) * 255.0)


def decode_flow(rgb: np.ndarray, max_mag: float) -> np.ndarray:
    """RGB float [..., 3] in [0, 255] -> flow float32 [..., 2] (dy, dx)."""
    hsv = rgb_to_hsv(np.clip(rgb / 255.0, 0.0, 1.0))
    ang, mag = hsv[..., 0] * 2 * np.pi, hsv[..., 2] * max_mag
    return np.stack([mag * np.sin(ang), mag * np.cos(ang)], -1).astype(np.float32)


class FlowFrames(Task):
    """Optical flow of all the frames it is given (``OpticalFlowTask`` windows a clip)."""

    requires = ("frames", "flow")
    metrics = ("epe",)
    higher_is_better = False

    def draw(self, example, choice):
        flow = np.asarray(example["flow"])
        return image_of(example), encode_flow(flow, flow_max_mag(flow))

    def context(self, example, choice=None):
        return {**(choice or {}), "max_mag": flow_max_mag(np.asarray(example["flow"]))}

    def truth(self, example, choice=None):
        """Flow float32 [T,H,W,2] (dy, dx) pixels."""
        return np.asarray(example["flow"], np.float32)

    def decode(self, pred, ctx=None):
        """Flow float32 [T,H,W,2]: pixels given ctx's max_mag, else units of max_mag."""
        max_mag = float(ctx["max_mag"]) if ctx is not None and "max_mag" in ctx else 1.0
        return decode_flow(pred_frames(pred), max_mag)

    def baseline(self, example, choice=None):
        """No motion."""
        return np.zeros(np.asarray(example["flow"]).shape, np.float32)


@register
class OpticalFlowTask(ClipWindow, FlowFrames):
    name = "optical_flow"


@register
class DepthToVideoTask(Swapped):
    name = "depth_to_video"
    metrics = ("fvd", "psnr")
    base = VideoDepthTask


@register
class NormalToVideoTask(Swapped):
    name = "normal_to_video"
    metrics = ("fvd", "psnr")
    base = VideoNormalsTask
