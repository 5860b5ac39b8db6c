"""Image-quality metrics: PSNR / SSIM / MSE (dm-pix), LPIPS and Fréchet distances.

psnr / ssim / mse: images float [(T,)H,W,3] in [0, 1] (uint8 is read as [0, 255]); every frame
is scored as an image, then the mean over frames and examples. SSIM is dm-pix's (Gaussian
11 x 11, sigma 1.5, on RGB, averaged over channels); PSNR is dm-pix's with peak 1, capped at
``PSNR_CAP`` dB so identical images give a finite number; MSE is on [0, 1] pixel values.
lpips: LPIPS from ``Nets.lpips`` (an objectives.perceptual.FeatureNet with LPIPS heads, read from
a user-given file), per frame, averaged.
fid / fvd: the Fréchet distance between Gaussians fitted to embeddings of the predictions and of
the truths over the whole data set, with the embedding ``Nets.features`` (images in [0, 1] ->
[N, D]); a clip is embedded as the mean of its frames' embeddings (so "fvd" here is a per-frame
network's distance, not I3D's). The numbers equal the standard FID only with the standard
Inception features; :func:`pooled_features` turns a FeatureNet (VGG-style) into an embedding.
"""

from __future__ import annotations

import functools

import numpy as np

from lavin_jax.metrics import Family, Nets

PSNR_CAP = 100.0


def unit_frames(x) -> np.ndarray:
    """[(T,)H,W,3] uint8 or float in [0, 1] -> float32 [T,H,W,3] in [0, 1]."""
    a = np.asarray(x)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"image metrics need [(T,)H,W,3] RGB, got shape {a.shape}")
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


@functools.cache
def _quality_fn():
    import dm_pix
    import jax
    import jax.numpy as jnp

    @jax.jit
    def fn(a, b):
        psnr = jnp.minimum(dm_pix.psnr(a, b), PSNR_CAP)
        return psnr, dm_pix.ssim(a, b), dm_pix.mse(a, b)

    return fn


def quality(pred, truth) -> dict[str, np.ndarray]:
    """Per-frame {"psnr", "ssim", "mse"} arrays [T] of two [(T,)H,W,3] images."""
    p, t = unit_frames(pred), unit_frames(truth)
    if p.shape != t.shape:
        raise ValueError(f"image prediction {p.shape} and truth {t.shape} differ in shape")
    psnr, ssim, mse = (np.asarray(v, np.float64) for v in _quality_fn()(p, t))
    return {"psnr": psnr, "ssim": ssim, "mse": mse}


class ImageQuality(Family):
    names = ("psnr", "ssim", "mse")
    higher = {"psnr": True, "ssim": True, "mse": False}

    def stats(self, pred, truth, ctx):
        return {k: list(v) for k, v in quality(pred, truth).items()}

    def reduce(self, s):
        return {k: np.mean(v) if v else np.nan for k, v in s.items()}


class LPIPS(Family):
    names = ("lpips",)
    higher = {"lpips": False}

    def missing(self):
        if self.nets.lpips is None:
            return "needs LPIPS weights (--lpips_weights FILE; nothing is downloaded)"
        return None

    def stats(self, pred, truth, ctx):
        p, t = unit_frames(pred) * 2 - 1, unit_frames(truth) * 2 - 1
        return {"d": [float(v) for v in np.asarray(self.nets.lpips.distance(p, t))]}

    def reduce(self, s):
        return {"lpips": np.mean(s["d"]) if s["d"] else np.nan}


def gaussian_stats(emb: np.ndarray) -> dict[str, np.ndarray]:
    """Additive sufficient statistics (sum, sum of outer products, count) of [N, D]."""
    e = np.asarray(emb, np.float64).reshape(len(emb), -1)
    return {"sum": e.sum(0), "outer": e.T @ e, "n": np.int64(len(e))}


def frechet_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) from :func:`gaussian_stats` totals."""
    from scipy import linalg

    if min(int(a["n"]), int(b["n"])) < 2:
        return np.nan
    mus, covs = [], []
    for s in (a, b):
        n = int(s["n"])
        mu = s["sum"] / n
        mus.append(mu)
        covs.append((s["outer"] - n * np.outer(mu, mu)) / (n - 1))
    root = linalg.sqrtm(covs[0] @ covs[1])
    if not np.isfinite(root).all():  # near-singular product: regularise as pytorch-fid does
        eps = 1e-6 * np.eye(len(mus[0]))
        root = linalg.sqrtm((covs[0] + eps) @ (covs[1] + eps))
    d = mus[0] - mus[1]
    return float(d @ d + np.trace(covs[0]) + np.trace(covs[1]) - 2 * np.trace(root.real))


class Frechet(Family):
    names = ("fid", "fvd")
    higher = {"fid": False, "fvd": False}

    def missing(self):
        if self.nets.features is None:
            return "needs feature-network weights (--fid_weights FILE; nothing is downloaded)"
        return None

    def _embed(self, x) -> np.ndarray:
        return np.asarray(self.nets.features(unit_frames(x)), np.float64).mean(0, keepdims=True)

    def stats(self, pred, truth, ctx):
        return {"pred": gaussian_stats(self._embed(pred)),
                "truth": gaussian_stats(self._embed(truth))}

    def reduce(self, s):
        d = frechet_distance(s["pred"], s["truth"])
        return {"fid": d, "fvd": d}


def pooled_features(net) -> callable:
    """Images float [N,H,W,3] in [0, 1] -> [N, C] global-average-pooled last-stage features of
    a FeatureNet (lavin_jax/objectives/perceptual.py)."""
    import jax

    fn = jax.jit(lambda x: net.features(x * 2 - 1)[-1].mean((1, 2)))
    return lambda x: np.asarray(fn(np.asarray(x, np.float32)))


def load_nets(lpips_weights: str = "", fid_weights: str = "") -> Nets:
    """Nets from user-given weight files (.npz / .safetensors, see objectives/perceptual.py)."""
    from lavin_jax.objectives.perceptual import FeatureNet

    nets = Nets()
    if lpips_weights:
        nets.lpips = FeatureNet.from_file(lpips_weights, "--lpips_weights")
        nets.describe["lpips"] = lpips_weights
    if fid_weights:
        nets.features = pooled_features(FeatureNet.from_file(fid_weights, "--fid_weights"))
        nets.describe["fid"] = f"{fid_weights} (global-average-pooled last stage)"
    return nets


FAMILIES = [ImageQuality, LPIPS, Frechet]
