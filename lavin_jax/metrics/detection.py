"""Ranked-detection metrics: COCO-style box AP and keypoint OKS AP, plus PCK.

map / ap50 (detection): per class, detections sorted by score are greedily matched to the
unmatched true box of highest IoU (>= the threshold); AP is the 101-point interpolated area
under the precision-recall curve over the whole data set, for IoU thresholds 0.50:0.05:0.95.
``map`` averages over thresholds and over classes that have true boxes; ``ap50`` is IoU 0.5.
oks_ap / pck (pose, one category "person"): OKS between a predicted and a true person is
sum_k v_k exp(-d_k^2 / (2 s^2 (2 sigma_k)^2)) / sum_k v_k over the true visible keypoints
(d in normalised image units, a keypoint not found counts 0; s^2 = area of the box around the
true visible keypoints, at least ``pose_min_area``); sigma = COCO's per-keypoint values when
K = 17, else ``pose_sigma`` for every keypoint. A prediction's score is its fraction of found
keypoints. oks_ap = AP over OKS thresholds 0.50:0.05:0.95 as above. PCK: people are matched one
to one by OKS (Hungarian); a true visible keypoint is correct when its match found it within
``pck_alpha`` x the longer side of that person's keypoint box; pooled over all true visible
keypoints (unmatched people count as wrong). People with no visible keypoint are ignored.
Coordinates are normalised, i.e. exact for square images (every task renders square ones).
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

from lavin_jax.metrics import Family
from lavin_jax.metrics.masks import box_iou

THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)
COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07,
                        .87, .87, .89, .89]) / 10.0


def greedy_match(scores: np.ndarray, sim: np.ndarray, thr: float) -> np.ndarray:
    """bool [D]: detection i (in score order) takes the free truth of highest sim >= thr."""
    tp = np.zeros(len(scores), bool)
    taken = np.zeros(sim.shape[1], bool)
    for i in np.argsort(-scores, kind="stable"):
        cand = np.where(taken, -1.0, sim[i])
        if cand.size and cand.max() >= thr:
            j = int(cand.argmax())
            taken[j], tp[i] = True, True
    return tp


def match_rows(scores: np.ndarray, sim: np.ndarray) -> list[list[float]]:
    """Rows [score, tp@0.50, ..., tp@0.95] for every detection."""
    tps = np.stack([greedy_match(scores, sim, t) for t in THRESHOLDS], 1) if len(scores) else \
        np.zeros((0, len(THRESHOLDS)), bool)
    return [[float(s), *map(float, row)] for s, row in zip(scores, tps)]


def average_precision(rows: list[list[float]], n_true: int) -> np.ndarray:
    """[len(THRESHOLDS)] 101-point interpolated AP (NaN when there is no truth)."""
    if n_true == 0:
        return np.full(len(THRESHOLDS), np.nan)
    if not rows:
        return np.zeros(len(THRESHOLDS))
    r = np.asarray(rows, np.float64)
    r = r[np.argsort(-r[:, 0], kind="stable")]
    tp = r[:, 1:]
    tpc, fpc = np.cumsum(tp, 0), np.cumsum(1 - tp, 0)
    rec, prec = tpc / n_true, tpc / (tpc + fpc)
    prec = np.maximum.accumulate(prec[::-1], 0)[::-1]  # precision envelope
    grid = np.linspace(0, 1, 101)
    out = []
    for k in range(tp.shape[1]):
        idx = np.searchsorted(rec[:, k], grid, side="left")
        q = np.where(idx < len(rec), prec[np.minimum(idx, len(rec) - 1), k], 0.0)
        out.append(q.mean())
    return np.array(out)


class DetectionAP(Family):
    names = ("map", "ap50")
    higher = dict.fromkeys(names, True)

    def stats(self, pred, truth, ctx):
        pb, pc = np.asarray(pred["boxes"]).reshape(-1, 4), np.asarray(pred["classes"]).ravel()
        ps = np.asarray(pred.get("scores", np.ones(len(pb)))).ravel()
        tb, tc = np.asarray(truth["boxes"]).reshape(-1, 4), np.asarray(truth["classes"]).ravel()
        rows, n_true = {}, {}
        for c in map(int, np.union1d(pc, tc)):
            d, g = pc == c, tc == c
            rows[c] = match_rows(ps[d], box_iou(pb[d], tb[g]))
            n_true[c] = np.int64(g.sum())
        return {"rows": rows, "n_true": n_true}

    def reduce(self, s):
        aps = [average_precision(s["rows"][c], int(s["n_true"][c])) for c in s["rows"]]
        aps = np.array([a for a in aps if np.isfinite(a).all()])
        if not len(aps):
            return {"map": np.nan, "ap50": np.nan}
        return {"map": aps.mean(), "ap50": aps[:, 0].mean()}


def keypoint_box(kp: np.ndarray) -> tuple[float, float]:
    """(area, longer side) of the box around a person's visible keypoints [K, 3]."""
    v = kp[kp[:, 2] > 0, :2]
    h, w = v.max(0) - v.min(0)
    return float(h * w), float(max(h, w))


def oks(pred: np.ndarray, truth: np.ndarray, sigmas: np.ndarray, min_area: float) -> np.ndarray:
    """OKS [P, N] of predicted [P,K,3] and true [N,K,3] people (see the module docstring)."""
    out = np.zeros((len(pred), len(truth)))
    for j, t in enumerate(truth):
        vis = t[:, 2] > 0
        area = max(keypoint_box(t)[0], min_area)
        d2 = np.sum((pred[:, :, :2] - t[None, :, :2]) ** 2, -1)  # [P, K]
        e = np.exp(-d2 / (2 * area * (2 * sigmas) ** 2)) * (pred[:, :, 2] > 0)
        out[:, j] = e[:, vis].sum(1) / vis.sum()
    return out


class PoseMetrics(Family):
    names = ("oks_ap", "pck")
    higher = dict.fromkeys(names, True)
    options = {"pose_sigma": 0.07, "pose_min_area": 1e-3, "pck_alpha": 0.1}

    def stats(self, pred, truth, ctx):
        p = np.asarray(pred, np.float64).reshape(-1, *np.shape(truth)[-2:])
        t = np.asarray(truth, np.float64)
        t = t[(t[:, :, 2] > 0).any(1)] if t.size else t.reshape(0, *t.shape[-2:])
        k = t.shape[1]
        sig = COCO_SIGMAS if k == 17 else np.full(k, float(self.opts["pose_sigma"]))
        sim = oks(p, t, sig, float(self.opts["pose_min_area"]))
        scores = p[:, :, 2].clip(0, 1).mean(1) if len(p) else np.zeros(0)
        correct = 0
        if sim.size:
            rows, cols = optimize.linear_sum_assignment(-sim)
            for r, c in zip(rows, cols):
                vis = t[c, :, 2] > 0
                tol = self.opts["pck_alpha"] * max(keypoint_box(t[c])[1],
                                                   np.sqrt(self.opts["pose_min_area"]))
                d = np.linalg.norm(p[r, :, :2] - t[c, :, :2], axis=-1)
                correct += int(np.sum(vis & (p[r, :, 2] > 0) & (d <= tol)))
        return {"rows": match_rows(scores, sim), "n_true": np.int64(len(t)),
                "pck_correct": np.int64(correct), "pck_total": np.int64((t[:, :, 2] > 0).sum())}

    def reduce(self, s):
        ap = average_precision(s["rows"], int(s["n_true"]))
        total = int(s["pck_total"])
        return {"oks_ap": ap.mean(), "pck": s["pck_correct"] / total if total else np.nan}


FAMILIES = [DetectionAP, PoseMetrics]
