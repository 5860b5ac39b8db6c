"""Human pose: limb sticks on black, one colour per limb (hue evenly spaced over the skeleton).

A limb (i, j) is drawn when both keypoints are visible (visibility > 0), as the pixels within
``radius`` px of the segment (default: 1 px up to 191 px images, +1 per 128 px). Limbs are
drawn in skeleton order, later ones over earlier ones.
Decoding: pixels brighter than 96, scaled to full brightness (so dimmed line edges keep their
hue), take the nearest limb colour if closer than half the gap between limb colours. Each blob
of one colour (8-connected after bridging gaps of up to 2 * radius + 2 px, where a later limb
crosses it; blobs under 2 * radius + 1 px are dropped) is a stick whose two ends are its
extreme pixels along the blob's principal axis, pulled in by radius - 0.4 px (the measured
overshoot of a round cap). Sticks whose ends meet (within 3 * radius + 3 px) at a shared joint
are joined into one person, which also tells which end is joint i; an isolated stick (no
visible neighbour limb) takes the upper end (then left) as i. A joint's position is the end of
the last-drawn limb there (earlier limbs are cut short by the later ones' caps). On clean
targets the keypoints of drawn limbs come back within ``KEYPOINT_TOL_PX`` = 1.5 px (checked in
the tests; measured <= 0.6 px from 32 to 512 px).
Skeleton: option ``skeleton``, else ``lavin_jax.data.raycast.SKELETON`` when it matches the
keypoint count, else COCO's 17-keypoint skeleton when K = 17.
"""

from __future__ import annotations

import importlib

import numpy as np
from scipy import ndimage

from lavin_jax.data.tasks import Task, register
from lavin_jax.data.tasks.drawing import (
    draw_segment,
    full_brightness,
    hue_colors,
    image_of,
    nearest_color,
    pred_frames,
    stroke,
)

KEYPOINT_TOL_PX = 1.5
# COCO person skeleton, 0-based (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles)
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)


def _raycast_skeleton():
    try:
        mod = importlib.import_module("lavin_jax.data.raycast")
    except ModuleNotFoundError as e:
        if e.name not in ("lavin_jax.data.raycast", "lavin_jax.data"):
            raise
        return None
    return getattr(mod, "SKELETON", None)


def resolve_skeleton(option, k: int | None) -> tuple[tuple[int, int], ...]:
    """The (i, j) limb list for K keypoints (K None: whatever is configured)."""
    cands = [option, _raycast_skeleton(), COCO_SKELETON]
    for sk in cands:
        if sk is not None and (k is None or max(max(p) for p in sk) + 1 == k or sk is option):
            return tuple((int(i), int(j)) for i, j in sk)
    raise ValueError(
        f"pose: no skeleton for {k} keypoints; pass the task option skeleton=((i, j), ...)"
    )


def _hue_gap(colors: np.ndarray) -> float:
    """Smallest RGB distance between two limb colours."""
    c = colors.astype(np.float64)
    d = np.linalg.norm(c[:, None] - c[None], axis=-1)
    return float(d[~np.eye(len(c), dtype=bool)].min()) if len(c) > 1 else 255.0


def stick_ends(coords: np.ndarray, radius: float) -> np.ndarray:
    """Pixel centres [M, 2] of one stick -> its two ends [2, 2] along the principal axis."""
    c = coords.mean(0)
    if len(coords) < 2:
        return np.stack([c, c])
    _, vecs = np.linalg.eigh(np.cov((coords - c).T) + 1e-9 * np.eye(2))
    u = vecs[:, -1]
    proj = (coords - c) @ u
    pull = max(0.0, radius - 0.4)  # how far the round cap's last pixel centres overshoot
    lo, hi = proj.min() + pull, proj.max() - pull
    if lo > hi:
        lo = hi = (lo + hi) / 2
    return np.stack([c + lo * u, c + hi * u])


@register
class PoseTask(Task):
    name = "pose"
    requires = ("image", "keypoints")
    metrics = ("oks_ap", "pck")

    @classmethod
    def default_options(cls):
        return {"skeleton": None, "radius": None}

    def _radius(self, h: int, w: int) -> float:
        return float(self.options["radius"] or stroke(h, w))

    def context(self, example, choice=None):
        k = np.asarray(example["keypoints"]).shape[1]
        return {**(choice or {}), "skeleton": resolve_skeleton(self.options["skeleton"], k),
                "num_keypoints": k}

    def draw(self, example, choice):
        img = image_of(example)
        h, w = img.shape[1:3]
        kp = np.asarray(example["keypoints"], np.float64)
        kp = kp.reshape(-1, *kp.shape[-2:])
        skel = resolve_skeleton(self.options["skeleton"], kp.shape[1])
        colors, rad = hue_colors(len(skel)), self._radius(h, w)
        canvas = np.zeros((h, w, 3), np.uint8)
        for person in kp:
            pts = person[:, :2] * np.array([h, w])
            for l, (i, j) in enumerate(skel):
                if person[i, 2] > 0 and person[j, 2] > 0:
                    draw_segment(canvas, pts[i], pts[j], colors[l], rad)
        return img, canvas[None]

    def truth(self, example, choice=None):
        """Keypoints float32 [N,K,3] (y, x in [0, 1], visibility)."""
        return np.asarray(example["keypoints"], np.float32)

    def baseline(self, example, choice=None):
        """No person."""
        return np.zeros((0, np.asarray(example["keypoints"]).shape[1], 3), np.float32)

    def decode(self, pred, ctx=None):
        """Keypoints float32 [P,K,3] (y, x in [0, 1], 1 = found) of the P people read back."""
        pix = pred_frames(pred)[0]
        h, w = pix.shape[:2]
        k = None if ctx is None else ctx.get("num_keypoints")
        skel = tuple(ctx["skeleton"]) if ctx and "skeleton" in ctx else resolve_skeleton(
            self.options["skeleton"], k)
        k = k or max(max(p) for p in skel) + 1
        colors, rad = hue_colors(len(skel)), self._radius(h, w)
        label = np.full((h, w), -1)
        on = pix.max(-1) > 96
        idx, dist = nearest_color(full_brightness(pix[on]), colors)
        label[on] = np.where(dist < 0.5 * _hue_gap(colors), idx, -1)
        sticks = []  # (limb, ends [2, 2] in pixel units)
        bridge = int(np.ceil(rad)) + 1
        min_px = max(2, int(2 * rad + 1))  # smaller blobs are noise or colour fringes
        for l in range(len(skel)):
            mask = label == l
            # a later limb drawn across this one splits it; bridge gaps up to 2 * radius + 2 px
            grown = ndimage.binary_dilation(mask, iterations=bridge)
            comps, n = ndimage.label(grown, structure=np.ones((3, 3)))
            comps = np.where(mask, comps, 0)
            for lab in range(1, n + 1):
                rr, cc = np.nonzero(comps == lab)
                if len(rr) >= min_px:
                    sticks.append((l, stick_ends(np.stack([rr, cc], 1) + 0.5, rad)))
        return self._assemble(sticks, skel, k, h, w, 3 * rad + 3)

    @staticmethod
    def _assemble(sticks, skel, k, h, w, tol) -> np.ndarray:
        """Join sticks into people at shared joints; see the module docstring."""
        ns = len(sticks)
        vote = np.zeros(ns)  # > 0: end 0 is the limb's joint i; < 0: end 0 is joint j
        links = []  # (stick a, end a, stick b, end b)
        for a in range(ns):
            for b in range(a + 1, ns):
                (la, ea), (lb, eb) = sticks[a], sticks[b]
                shared = set(skel[la]) & set(skel[lb])
                if la == lb or not shared:
                    continue
                d = np.linalg.norm(ea[:, None] - eb[None], axis=-1)
                x, y = np.unravel_index(d.argmin(), d.shape)
                if d[x, y] >= tol:
                    continue
                joint = shared.pop()
                wgt = 1.0 / (1.0 + d[x, y])
                vote[a] += wgt if (skel[la].index(joint) == x) else -wgt
                vote[b] += wgt if (skel[lb].index(joint) == y) else -wgt
                links.append((a, b))
        parent = list(range(ns))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for a, b in links:
            parent[find(a)] = find(b)
        groups: dict[int, list[int]] = {}
        for s in range(ns):
            groups.setdefault(find(s), []).append(s)
        people = []
        for members in groups.values():
            kp, drawn_by = np.zeros((k, 3), np.float32), np.full(k, -1)
            for s in members:
                l, ends = sticks[s]
                first = vote[s] > 0 or (vote[s] == 0 and tuple(ends[0]) <= tuple(ends[1]))
                i_end, j_end = (ends[0], ends[1]) if first else (ends[1], ends[0])
                for joint, p in zip(skel[l], (i_end, j_end)):
                    if l > drawn_by[joint]:  # the last limb drawn at a joint is not cut short
                        drawn_by[joint] = l
                        kp[joint] = (*(p / np.array([h, w])), 1.0)
            people.append(kp)
        people.sort(key=lambda p: -p[:, 2].sum())
        return np.array(people, np.float32).reshape(-1, k, 3)
