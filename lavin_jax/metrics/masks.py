"""Mask, segment, box-IoU and edge metrics.

miou (foreground): per-example IoU of the foreground masks averaged over examples, or, when
every example's ``ctx`` names its class (``{"cls": c}``, the foreground task's context in class
mode), the class-wise IoU sum(I) / sum(U) averaged over classes (the Pascal-5i protocol). Two
empty masks have IoU 1.
box_miou (single-object detection): IoU of the predicted and true box, averaged.
pq / sq / rq (panoptic, class-agnostic: the task's colours carry no class): segments are the
non-zero ids; a predicted and a true segment match when IoU > 0.5 (unique by construction);
PQ = sum IoU(matches) / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2),
counted over the whole data set. Background (id 0) pixels are not void: predicted segments
there lower their IoU and unmatched ones are false positives.
j_and_f / j / f (video segmentation, DAVIS-style): predicted tracks are matched one-to-one to
true tracks by Hungarian assignment on clip IoU; per true object J = mean over frames of the
mask IoU and F = mean over frames of the boundary F-measure (boundaries matched within
ceil(0.008 * image diagonal) px); an empty frame in both counts 1. Means over all objects.
ods_f / ois_f (edges, BSDS-style): the soft edge map is thinned by non-maximum suppression
across the edge (Hessian orientation), then for ``edge_thresholds`` thresholds a predicted edge
pixel is correct if a true one lies within ``max(1.5, 0.0075 * diagonal)`` px, and a true pixel
is recalled if a predicted one does (a tolerance match, not BSDS's one-to-one assignment).
ODS = best F of the counts summed over the data set at one threshold; OIS = F of the counts
summed at each image's own best threshold.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, optimize

from lavin_jax.metrics import Family


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts of two bool masks of equal shape."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if p.shape != t.shape:
        raise ValueError(f"mask prediction {p.shape} and truth {t.shape} differ in shape")
    return int(np.sum(p & t)), int(np.sum(p | t))


def _ratio(i: float, u: float) -> float:
    return 1.0 if u == 0 else i / u


class ForegroundIoU(Family):
    names = ("miou",)
    higher = {"miou": True}

    def stats(self, pred, truth, ctx):
        i, u = mask_iou(pred, truth)
        cls = None if ctx is None else ctx.get("cls")
        return {"iou": [_ratio(i, u)], "n": np.int64(1),
                "by_class": {} if cls is None else {int(cls): np.array([i, u], np.int64)},
                "n_class": np.int64(cls is not None)}

    def reduce(self, s):
        if s["n"] and s["n_class"] == s["n"]:  # every example named its class
            return {"miou": np.mean([_ratio(*iu) for iu in s["by_class"].values()])}
        return {"miou": np.mean(s["iou"]) if s["iou"] else np.nan}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N,4] and b [M,4] (ymin, xmin, ymax, xmax) -> [N, M]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), -1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)
    union = area(a)[:, None] + area(b)[None] - inter
    same = np.all(a[:, None] == b[None], -1)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), same * 1.0)


class BoxIoU(Family):
    names = ("box_miou",)
    higher = {"box_miou": True}

    def stats(self, pred, truth, ctx):
        return {"iou": [float(box_iou(pred, truth)[0, 0])]}

    def reduce(self, s):
        return {"box_miou": np.mean(s["iou"]) if s["iou"] else np.nan}


def segment_overlaps(pred: np.ndarray, truth: np.ndarray):
    """Ids, areas and IoUs of non-zero segments: (p_ids, t_ids, iou [P, T])."""
    p, t = np.asarray(pred, np.int64).ravel(), np.asarray(truth, np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"segment prediction {np.shape(pred)} and truth {np.shape(truth)} "
                         "differ in shape")
    p_ids, p_inv, p_area = np.unique(p, return_inverse=True, return_counts=True)
    t_ids, t_inv, t_area = np.unique(t, return_inverse=True, return_counts=True)
    inter = np.zeros((len(p_ids), len(t_ids)), np.int64)
    np.add.at(inter, (p_inv.ravel(), t_inv.ravel()), 1)
    iou = inter / (p_area[:, None] + t_area[None] - inter)
    pk, tk = p_ids != 0, t_ids != 0
    return p_ids[pk], t_ids[tk], iou[np.ix_(pk, tk)]


class PanopticQuality(Family):
    names = ("pq", "sq", "rq")
    higher = dict.fromkeys(names, True)

    def stats(self, pred, truth, ctx):
        p_ids, t_ids, iou = segment_overlaps(pred, truth)
        match = iou > 0.5  # at most one per row and column (segments are disjoint)
        tp = int(match.sum())
        return {"iou_sum": np.float64(iou[match].sum()), "tp": np.int64(tp),
                "fp": np.int64(len(p_ids) - tp), "fn": np.int64(len(t_ids) - tp)}

    def reduce(self, s):
        tp, fp, fn = int(s["tp"]), int(s["fp"]), int(s["fn"])
        den = tp + 0.5 * fp + 0.5 * fn
        if den == 0:
            return dict.fromkeys(self.names, np.nan)
        sq = s["iou_sum"] / tp if tp else 0.0
        return {"pq": s["iou_sum"] / den, "sq": sq, "rq": tp / den}


def _dist_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of ``mask`` (inf if none)."""
    if not mask.any():
        return np.full(mask.shape, np.inf)
    return ndimage.distance_transform_edt(~mask)


def f_measure(matched_p, n_p, matched_t, n_t):
    """F from tolerance-match counts (arrays ok); P = 1 without predictions, R = 1 without
    truth, F = 0 when both are 0."""
    prec = np.where(n_p > 0, matched_p / np.maximum(n_p, 1), 1.0)
    rec = np.where(n_t > 0, matched_t / np.maximum(n_t, 1), 1.0)
    s = prec + rec
    return np.where(s > 0, 2 * prec * rec / np.where(s > 0, s, 1), 0.0)


def boundary_f(pred: np.ndarray, truth: np.ndarray, tol: float) -> float:
    """Boundary F-measure of two bool masks [H, W] (inner boundaries, tolerance ``tol`` px)."""
    bp = pred & ~ndimage.binary_erosion(pred, border_value=1)
    bt = truth & ~ndimage.binary_erosion(truth, border_value=1)
    if not bp.any() and not bt.any():
        return 1.0
    mp = np.sum(_dist_to(bt)[bp] <= tol)
    mt = np.sum(_dist_to(bp)[bt] <= tol)
    return float(f_measure(mp, bp.sum(), mt, bt.sum()))


class VideoSegmentation(Family):
    names = ("j_and_f", "j", "f")
    higher = dict.fromkeys(names, True)
    options = {"jf_tolerance": 0.008}  # boundary tolerance, fraction of the image diagonal

    def stats(self, pred, truth, ctx):
        p, t = np.asarray(pred, np.int64), np.asarray(truth, np.int64)
        if t.ndim == 2:
            p, t = p[None], t[None]
        p_ids, t_ids, iou = segment_overlaps(p, t)
        pick = {}
        if iou.size:
            rows, cols = optimize.linear_sum_assignment(-iou)
            pick = {t_ids[c]: p_ids[r] for r, c in zip(rows, cols) if iou[r, c] > 0}
        tol = np.ceil(self.opts["jf_tolerance"] * np.hypot(*t.shape[1:]))
        j_sum = f_sum = 0.0
        for tid in t_ids:
            tm = t == tid
            pm = p == pick[tid] if tid in pick else np.zeros_like(tm)
            j_sum += np.mean([_ratio(*mask_iou(a, b)) for a, b in zip(pm, tm)])
            f_sum += np.mean([boundary_f(a, b, tol) for a, b in zip(pm, tm)])
        return {"j": np.float64(j_sum), "f": np.float64(f_sum), "n": np.int64(len(t_ids))}

    def reduce(self, s):
        n = int(s["n"])
        if n == 0:
            return dict.fromkeys(self.names, np.nan)
        j, f = s["j"] / n, s["f"] / n
        return {"j_and_f": (j + f) / 2, "j": j, "f": f}


def edge_nms(e: np.ndarray, margin: float = 1.01) -> np.ndarray:
    """Thins a soft edge map [H, W]: zero pixels below a neighbour 1 px away across the edge.

    The across-edge direction is the Hessian eigenvector of most negative curvature of the
    lightly smoothed map. Equal neighbours are kept (a clean 0/1 map passes unchanged).
    """
    s = ndimage.gaussian_filter(e.astype(np.float64), 1.0)
    gy, gx = np.gradient(s)
    hyy, hyx = np.gradient(gy)
    hxy, hxx = np.gradient(gx)
    hxy = 0.5 * (hxy + hyx)
    theta = 0.5 * np.arctan2(2 * hxy, hxx - hyy) + np.pi / 2  # min-curvature axis
    dy, dx = np.sin(theta), np.cos(theta)
    rr, cc = np.mgrid[0:e.shape[0], 0:e.shape[1]].astype(np.float64)
    keep = np.ones(e.shape, bool)
    for sign in (1, -1):
        nb = ndimage.map_coordinates(e, [rr + sign * dy, cc + sign * dx], order=1, mode="nearest")
        keep &= e * margin >= nb
    return np.where(keep, e, 0.0)


def _at_least(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[K] counts of values >= each threshold (thresholds ascending)."""
    idx = np.searchsorted(thresholds, values, side="right")  # thresholds <= value
    return np.cumsum(np.bincount(idx, minlength=len(thresholds) + 1)[::-1])[::-1][1:]


def edge_counts(pred: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, tol_frac: float,
                nms: bool = True) -> np.ndarray:
    """[K, 4] (matched pred, pred, matched truth, truth) pixel counts per threshold."""
    e, t = np.asarray(pred, np.float64), np.asarray(truth, bool)
    if e.shape != t.shape or e.ndim != 2:
        raise ValueError(f"edge prediction {e.shape} and truth {t.shape}: want equal [H, W]")
    if nms:
        e = edge_nms(e)
    tol = max(1.5, tol_frac * float(np.hypot(*e.shape)))
    r = int(np.floor(tol))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    near_max = ndimage.grey_dilation(e, footprint=yy**2 + xx**2 <= tol**2, mode="constant")
    close = _dist_to(t) <= tol
    k = len(thresholds)
    return np.stack([_at_least(e[close], thresholds), _at_least(e.ravel(), thresholds),
                     _at_least(near_max[t], thresholds), np.full(k, t.sum())], 1)


class EdgeF(Family):
    names = ("ods_f", "ois_f")
    higher = dict.fromkeys(names, True)
    options = {"edge_thresholds": 99, "edge_tolerance": 0.0075, "edge_nms": True}

    def _thresholds(self) -> np.ndarray:
        k = int(self.opts["edge_thresholds"])
        return np.linspace(1.0 / (k + 1), k / (k + 1), k)

    def stats(self, pred, truth, ctx):
        p, t = np.asarray(pred), np.asarray(truth)
        if t.ndim == 2:
            p, t = p[None], t[None]
        ths = self._thresholds()
        total, best = np.zeros((len(ths), 4), np.int64), np.zeros(4, np.int64)
        for a, b in zip(p, t):
            c = edge_counts(a, b, ths, self.opts["edge_tolerance"], self.opts["edge_nms"])
            total += c
            best += c[int(np.argmax(f_measure(*c.T)))]
        return {"counts": total, "best": best}

    def reduce(self, s):
        return {"ods_f": float(np.max(f_measure(*s["counts"].T))),
                "ois_f": float(f_measure(*s["best"]))}


FAMILIES = [ForegroundIoU, BoxIoU, PanopticQuality, VideoSegmentation, EdgeF]
