"""Dense regression metrics: depth, surface normals, optical flow.

Depth (per image; a clip's frames each count as an image, as in per-frame video depth): over the
pixels with finite, positive truth (the depth task marks invalid ones NaN),
  abs_rel = mean |p - t| / t,  delta1 = mean[max(p/t, t/p) < 1.25],  rmse = sqrt(mean (p - t)^2),
then the mean over images. ``depth_align``: "none" (default; the depth task's decode already
uses the truth's near/far range), "scale" or "scale_shift": per-image least-squares fit of
s * p (+ b) to t in depth space, as in affine-invariant protocols; aligned depths are floored at
1e-6 so the ratios stay defined.
Normals (pooled over every valid pixel of the data set, as NYUv2 evaluations do): the angle
between the renormalised prediction and the truth in degrees; mean, median (from a 0.01-degree
histogram, linearly interpolated) and the fraction of pixels with angle < 11.25 / 22.5 / 30.
Flow: end-point error ||p - t|| averaged over every finite pixel of the data set (pooled).
"""

from __future__ import annotations

import numpy as np

from lavin_jax.metrics import Family

_BIN = 0.01  # degrees per histogram bin of the normal angle
_NBINS = int(round(180 / _BIN))
WITHIN = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}


def align_depth(pred: np.ndarray, truth: np.ndarray, mode: str) -> np.ndarray:
    """Least-squares fit of pred to truth (1-D arrays of valid pixels): s p or s p + b."""
    if mode == "none":
        return pred
    p, t = pred.astype(np.float64), truth.astype(np.float64)
    if mode == "scale":
        den = float(p @ p)
        return p * (float(p @ t) / den if den > 0 else 1.0)
    if mode == "scale_shift":
        a = np.stack([p, np.ones_like(p)], 1)
        (s, b), *_ = np.linalg.lstsq(a, t, rcond=None)
        return s * p + b
    raise ValueError(f"depth_align={mode!r}; use 'none', 'scale' or 'scale_shift'")


def depth_errors(pred: np.ndarray, truth: np.ndarray, align: str = "none") -> dict | None:
    """abs_rel, delta1, rmse of one image [H,W] (truth NaN/<=0 = invalid); None if no pixel."""
    p, t = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if p.shape != t.shape:
        raise ValueError(f"depth prediction {p.shape} and truth {t.shape} differ in shape")
    ok = np.isfinite(t) & (t > 0) & np.isfinite(p)
    if not ok.any():
        return None
    t = t[ok]
    p = np.maximum(align_depth(p[ok], t, align), 1e-6)
    return {
        "abs_rel": float(np.mean(np.abs(p - t) / t)),
        "delta1": float(np.mean(np.maximum(p / t, t / p) < 1.25)),
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
    }


class DepthMetrics(Family):
    names = ("abs_rel", "delta1", "rmse")
    higher = {"abs_rel": False, "delta1": True, "rmse": False}
    options = {"depth_align": "none"}

    def stats(self, pred, truth, ctx):
        p, t = np.asarray(pred), np.asarray(truth)
        if t.ndim == 2:
            p, t = p[None], t[None]
        per = [depth_errors(a, b, self.opts["depth_align"]) for a, b in zip(p, t)]
        per = [e for e in per if e is not None]
        return {n: [e[n] for e in per] for n in self.names}

    def reduce(self, stats):
        return {n: np.mean(v) if v else np.nan for n, v in stats.items()}


def normal_angles(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Angles in degrees [M] between pred and truth [..., 3] where the truth is finite, non-0."""
    p, t = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if p.shape != t.shape or p.shape[-1] != 3:
        raise ValueError(f"normals prediction {p.shape} and truth {t.shape}: want equal [...,3]")
    tn = np.linalg.norm(np.nan_to_num(t), axis=-1)
    ok = np.isfinite(t).all(-1) & (tn > 1e-6) & np.isfinite(p).all(-1)
    p, t = p[ok], t[ok] / tn[ok, None]
    pn = np.linalg.norm(p, axis=-1, keepdims=True)
    p = np.where(pn > 1e-12, p / np.maximum(pn, 1e-12), 0.0)  # a zero prediction: 90 degrees
    return np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", p, t), -1.0, 1.0)))


def hist_median(hist: np.ndarray, width: float) -> float:
    """Median of values binned in ``hist`` (bins [i w, (i+1) w)), interpolated in the bin."""
    n = hist.sum()
    if n == 0:
        return np.nan
    cum = np.cumsum(hist)
    i = int(np.searchsorted(cum, n / 2))
    before = cum[i - 1] if i else 0
    return (i + (n / 2 - before) / hist[i]) * width


class NormalMetrics(Family):
    names = ("mean_angle", "median_angle", *WITHIN)
    higher = {"mean_angle": False, "median_angle": False, **dict.fromkeys(WITHIN, True)}

    def stats(self, pred, truth, ctx):
        a = normal_angles(pred, truth)
        hist = np.bincount(np.minimum((a / _BIN).astype(np.int64), _NBINS - 1),
                           minlength=_NBINS)
        return {"hist": hist, "sum": np.float64(a.sum()), "n": np.int64(a.size),
                "within": np.array([np.sum(a < v) for v in WITHIN.values()], np.int64)}

    def reduce(self, s):
        n = int(s["n"])
        if n == 0:
            return dict.fromkeys(self.names, np.nan)
        out = {"mean_angle": s["sum"] / n, "median_angle": hist_median(s["hist"], _BIN)}
        out.update({k: c / n for k, c in zip(WITHIN, s["within"])})
        return out


class FlowMetrics(Family):
    names = ("epe",)
    higher = {"epe": False}

    def stats(self, pred, truth, ctx):
        p, t = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
        if p.shape != t.shape or p.shape[-1] != 2:
            raise ValueError(f"flow prediction {p.shape} and truth {t.shape}: want equal [...,2]")
        err = np.linalg.norm(p - t, axis=-1)
        ok = np.isfinite(err)
        return {"sum": np.float64(err[ok].sum()), "n": np.int64(ok.sum())}

    def reduce(self, s):
        return {"epe": s["sum"] / s["n"] if s["n"] else np.nan}


FAMILIES = [DepthMetrics, NormalMetrics, FlowMetrics]
