"""Restoration: a degraded photo in, the clean photo out.

The degradation is synthesised from the clean image; its strength is a random choice drawn per
rendering (plus an integer "seed" for the noise/streak pattern), so ``draw`` is deterministic.
Sizes scale with s = min(H, W) / 256 (the paper trains at 256 and 512 px):
  colorization   ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) as gray RGB (no randomness).
  inpainting     a gray (128) square, side U(0.2, 0.3) * min(H, W) (~1/4), uniform position.
  deraining      rain streaks: Bernoulli(U(0.002, 0.01)) drops smeared by a line kernel of
                 length U(0.05, 0.15) * min(H, W) at U(-20, 20) deg from vertical, screen-blended
                 with strength U(0.5, 0.9).
  motion_deblur  line-kernel blur, length max(3, U(5, 25) * s) px, angle U(0, 180) deg.
  gaussian_deblur Gaussian blur, sigma max(0.5, U(1, 4) * s) px.
  denoising      Gaussian noise sigma U(5, 50)/255, or (half the time) Poisson noise with peak
                 U(10, 100) photons for white.
  low_light      scale * x ** gamma + N(0, sigma): gamma U(1.5, 3), scale U(0.1, 0.4),
                 sigma U(0, 0.02).
Borders are handled by reflection. Decode is the identity: float32 [H,W,3] in [0, 1]. The
baseline copies the (degraded) input, the usual "do nothing" reference.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lavin_jax.data.tasks import Task, register
from lavin_jax.data.tasks.drawing import image_of, line_kernel, to_uint8, unit_image

LUMA = np.array([0.299, 0.587, 0.114])


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.convolve(x[..., c], kernel, mode="reflect") for c in range(3)], -1)


class RestorationTask(Task):
    """Subclasses implement ``params`` (random strengths) and ``degrade`` (x float [H,W,3])."""

    requires = ("image",)
    metrics = ("psnr", "ssim", "mse")

    def params(self, h: int, w: int, rng: np.random.Generator) -> dict:
        return {}

    def degrade(self, x: np.ndarray, choice: dict) -> np.ndarray:
        raise NotImplementedError

    def choose(self, example, rng):
        h, w = image_of(example).shape[1:3]
        return {**self.params(h, w, rng), "seed": int(rng.integers(2**31))}

    def draw(self, example, choice):
        img = image_of(example)
        x = img[0].astype(np.float64) / 255.0
        return to_uint8(np.clip(self.degrade(x, choice), 0, 1) * 255.0)[None], img

    def truth(self, example, choice=None):
        """The clean image, float32 [H,W,3] in [0, 1]."""
        return image_of(example)[0] / np.float32(255)

    def decode(self, pred, ctx=None):
        return unit_image(pred, False)

    def baseline(self, example, choice=None):
        """The degraded input itself, float32 [H,W,3] in [0, 1]."""
        return self.draw(example, self.default_choice(example, choice))[0][0] / np.float32(255)


@register
class ColorizationTask(RestorationTask):
    name = "colorization"
    metrics = ("mse", "lpips", "psnr", "ssim")
    higher_is_better = False

    def degrade(self, x, choice):
        return np.repeat((x @ LUMA)[..., None], 3, -1)


@register
class InpaintingTask(RestorationTask):
    name = "inpainting"
    metrics = ("fid", "psnr", "ssim", "mse")
    higher_is_better = False

    def params(self, h, w, rng):
        side = max(1, int(round(rng.uniform(0.2, 0.3) * min(h, w))))
        return {"square": (int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1)), side)}

    def degrade(self, x, choice):
        r, c, s = choice["square"]
        out = x.copy()
        out[r:r + s, c:c + s] = 128 / 255.0
        return out


@register
class DerainingTask(RestorationTask):
    name = "deraining"

    def params(self, h, w, rng):
        return {"density": rng.uniform(0.002, 0.01), "length": rng.uniform(0.05, 0.15) * min(h, w),
                "angle": rng.uniform(-20, 20), "strength": rng.uniform(0.5, 0.9)}

    def degrade(self, x, choice):
        h, w = x.shape[:2]
        drops = np.random.default_rng(choice["seed"]).random((h, w)) < choice["density"]
        length = max(2.0, choice["length"])
        ker = line_kernel(length, 90.0 + choice["angle"])
        rain = np.clip(ndimage.convolve(drops * 1.0, ker, mode="wrap") * length, 0, 1)
        rain = ndimage.gaussian_filter(rain, 0.5)[..., None] * choice["strength"]
        return 1.0 - (1.0 - x) * (1.0 - rain)


@register
class MotionDeblurTask(RestorationTask):
    name = "motion_deblur"

    def params(self, h, w, rng):
        s = min(h, w) / 256
        return {"length": max(3.0, rng.uniform(5, 25) * s), "angle": rng.uniform(0, 180)}

    def degrade(self, x, choice):
        return _blur(x, line_kernel(choice["length"], choice["angle"]))


@register
class GaussianDeblurTask(RestorationTask):
    name = "gaussian_deblur"

    def params(self, h, w, rng):
        return {"sigma": max(0.5, rng.uniform(1, 4) * min(h, w) / 256)}

    def degrade(self, x, choice):
        s = choice["sigma"]
        return ndimage.gaussian_filter(x, (s, s, 0), mode="reflect")


@register
class DenoisingTask(RestorationTask):
    name = "denoising"

    def params(self, h, w, rng):
        if rng.random() < 0.5:
            return {"kind": "gaussian", "sigma": rng.uniform(5, 50) / 255}
        return {"kind": "poisson", "peak": rng.uniform(10, 100)}

    def degrade(self, x, choice):
        noise = np.random.default_rng(choice["seed"])
        if choice["kind"] == "gaussian":
            return x + noise.normal(0, choice["sigma"], x.shape)
        return noise.poisson(x * choice["peak"]) / choice["peak"]


@register
class LowLightTask(RestorationTask):
    name = "low_light"

    def params(self, h, w, rng):
        return {"gamma": rng.uniform(1.5, 3), "scale": rng.uniform(0.1, 0.4),
                "sigma": rng.uniform(0, 0.02)}

    def degrade(self, x, choice):
        noise = np.random.default_rng(choice["seed"]).normal(0, choice["sigma"], x.shape)
        return choice["scale"] * x ** choice["gamma"] + noise
