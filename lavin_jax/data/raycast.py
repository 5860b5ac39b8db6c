"""A vectorised analytic ray caster in NumPy: rays x primitives, one closest hit per pixel.

Geometry lives in a right-handed world frame with +y up. A scene is an axis-aligned room (floor
at ``lo[1]``; four walls and a ceiling) that encloses the camera, so every primary ray hits
something, plus rigid primitives, each with a centre, a rotation (local -> world columns) and a
size:

  kind      local shape (centred at the origin)                  size
  SPHERE    sphere of radius r                                   (r, -, -)
  BOX       box |x|<=a, |y|<=b, |z|<=c                           (a, b, c)
  CYLINDER  capped cylinder along local y: x^2+z^2<=r^2, |y|<=h  (r, h, -)
  CAPSULE   segment (0,-h,0)-(0,h,0) swept by a ball of radius r (r, h, -)

The camera frame is OpenCV's: x right, y down, z forward. A pixel (row i, col j) looks through
its centre (u, v) = (j + 0.5, i + 0.5); its ray direction in the camera frame is
((u - cx) / fx, (v - cy) / fy, 1), not normalised, so the hit parameter t *is* the metric depth
along the camera z axis.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Schema constants of the synthetic_scenes source (lavin_jax/data/render.py documents it):
# semantic class ids, and the stick figures' keypoints and limbs (pose targets).
CLASSES = ("background", "sphere", "box", "cylinder", "capsule", "figure")
KEYPOINT_NAMES = (
    "head", "neck",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_hip", "left_knee", "left_ankle",
    "right_hip", "right_knee", "right_ankle",
)  # fmt: skip
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
SKELETON = (
    (0, 1), (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7),
    (2, 8), (5, 11), (8, 11), (8, 9), (9, 10), (11, 12), (12, 13),
)  # fmt: skip

# Primitive kinds (geometry only; not the semantic classes above).
SPHERE, BOX, CYLINDER, CAPSULE = 0, 1, 2, 3
ROOM = -1  # `prim` index of a hit on the room (floor, walls, ceiling)
# Pattern ids of a material (procedural albedo, see shading.albedo).
SOLID, CHECKER, STRIPES, WAVES = 0, 1, 2, 3
_CHUNK = 1 << 19  # rays x primitives evaluated per block: bounds memory at 512 px


@dataclasses.dataclass
class Camera:
    """Pinhole camera. position [3] world; rotation [3,3] camera -> world (columns x, y, z)."""

    position: np.ndarray
    rotation: np.ndarray
    fx: float
    fy: float
    cx: float
    cy: float
    height: int
    width: int

    @property
    def intrinsics(self) -> np.ndarray:
        """[3,3] float32 K in pixels (pixel centres at +0.5)."""
        return np.array(
            [[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float32
        )

    def ray_dirs(self) -> np.ndarray:
        """[H*W, 3] world directions with unit camera-z component (row-major pixels)."""
        v, u = np.mgrid[0 : self.height, 0 : self.width].astype(np.float64) + 0.5
        d = np.stack(
            [(u - self.cx) / self.fx, (v - self.cy) / self.fy, np.ones_like(u)], -1
        ).reshape(-1, 3)
        return d @ self.rotation.T

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World points [..., 3] -> (row, col) continuous pixel coordinates and depth z."""
        pc = (points - self.position) @ self.rotation
        z = pc[..., 2]
        safe = np.where(np.abs(z) < 1e-9, 1e-9, z)
        col = self.fx * pc[..., 0] / safe + self.cx
        row = self.fy * pc[..., 1] / safe + self.cy
        return row, col, z


@dataclasses.dataclass
class Materials:
    """Per material [M]: colours in [0,1] linear RGB, pattern id/scale/axis, Blinn-Phong terms."""

    color: np.ndarray  # [M, 3]
    color2: np.ndarray  # [M, 3] second colour of the pattern
    pattern: np.ndarray  # [M] int
    scale: np.ndarray  # [M] pattern frequency (cycles per metre)
    axis: np.ndarray  # [M, 3] unit axis of stripes / waves
    specular: np.ndarray  # [M]
    shininess: np.ndarray  # [M]


@dataclasses.dataclass
class Primitives:
    """Struct of arrays over P primitives (see the module docstring for kinds and sizes)."""

    kind: np.ndarray  # [P] int
    center: np.ndarray  # [P, 3]
    rotation: np.ndarray  # [P, 3, 3] local -> world
    size: np.ndarray  # [P, 3]
    material: np.ndarray  # [P] int index into Materials
    instance: np.ndarray  # [P] int object id (>= 1); parts of one object share it
    semantic: np.ndarray  # [P] int class id

    def __len__(self) -> int:
        return len(self.kind)


@dataclasses.dataclass
class Scene:
    """Room bounds lo/hi [3], room materials (floor, walls, ceiling) and one directional light."""

    lo: np.ndarray
    hi: np.ndarray
    room_material: np.ndarray  # [3] int: floor, walls, ceiling
    prims: Primitives
    materials: Materials
    light_dir: np.ndarray  # [3] unit, points *towards* the light
    light_color: np.ndarray  # [3]
    ambient: np.ndarray  # [3]


# --------------------------------------------------------------------------- intersection


def _hit_t(kind: int, o: np.ndarray, d: np.ndarray, size: np.ndarray, tmin: float):
    """Nearest entry distance of rays into one kind of primitive, in its local frame.

    o, d, size: [m, 3] per (ray, primitive) pair. Returns t [m] (> tmin), inf on a miss.
    Rays must start outside the shape: only the entry point counts.
    """
    inf = np.inf
    if kind == BOX:
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            t1 = (-size - o) * inv
            t2 = (size - o) * inv
        near = np.fmax.reduce(np.fmin(t1, t2), axis=-1)
        far = np.fmin.reduce(np.fmax(t1, t2), axis=-1)
        return np.where((near <= far) & (near > tmin), near, inf)
    r = size[:, 0]
    if kind == SPHERE:
        a = np.einsum("...k,...k->...", d, d)
        b = np.einsum("...k,...k->...", o, d)
        c = np.einsum("...k,...k->...", o, o) - r * r
        disc = b * b - a * c
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        return np.where((disc >= 0) & (t > tmin), t, inf)
    h = size[:, 1]
    ox, oy, oz = o[..., 0], o[..., 1], o[..., 2]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    # Side wall of the infinite cylinder x^2 + z^2 = r^2, kept where |y| <= h.
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - r * r
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    ys = oy + ts * dy
    best = np.where((disc >= 0) & (a > 0) & (np.abs(ys) <= h) & (ts > tmin), ts, inf)
    if kind == CYLINDER:
        # The cap a ray enters through: y = -h when travelling up (dy > 0), else y = +h.
        with np.errstate(divide="ignore", invalid="ignore"):
            tc = (-np.sign(dy) * h - oy) / dy
        xc, zc = ox + tc * dx, oz + tc * dz
        cap = (xc * xc + zc * zc <= r * r) & (tc > tmin)
        return np.minimum(best, np.where(cap, tc, inf))
    # CAPSULE: the two end balls.
    for sgn in (-1.0, 1.0):
        oyy = oy - sgn * h
        a2 = a + dy * dy
        b2 = b + oyy * dy
        c2 = c + oyy * oyy
        disc2 = b2 * b2 - a2 * c2
        t2 = (-b2 - np.sqrt(np.maximum(disc2, 0.0))) / a2
        best = np.minimum(best, np.where((disc2 >= 0) & (t2 > tmin), t2, inf))
    return best


def bounding_radius(prims: Primitives) -> np.ndarray:
    """[P] radius of a ball about each centre that contains the primitive."""
    r, h = prims.size[:, 0], prims.size[:, 1]
    rad = np.select(
        [prims.kind == SPHERE, prims.kind == BOX, prims.kind == CYLINDER],
        [r, np.linalg.norm(prims.size, axis=-1), np.hypot(r, h)],
        h + r,
    )
    # A hair larger: culling must never decide a grazing hit (BLAS rounding differs by machine).
    return rad * (1 + 1e-6) + 1e-9


def _ball_test(c: np.ndarray, rad: np.ndarray, origins, dirs, tmin: float) -> np.ndarray:
    """[n, B] whether rays meet balls (centres c [B,3], radii [B]) beyond tmin (two matmuls)."""
    od = np.einsum("nk,nk->n", np.broadcast_to(origins, dirs.shape), dirs)
    b = od[:, None] - dirs @ c.T  # (o - c) . d
    oo = np.einsum("nk,nk->n", origins, origins)
    cc = (oo[:, None] - 2 * origins @ c.T) + (np.einsum("pk,pk->p", c, c) - rad * rad)[None]
    a = np.einsum("nk,nk->n", dirs, dirs)[:, None]
    disc = b * b - a * cc
    ok = disc >= 0
    ok &= (-b + np.sqrt(np.maximum(disc, 0.0))) > tmin * a  # far root in front
    return ok


def _candidates(prims: Primitives, origins: np.ndarray, dirs: np.ndarray, tmin: float):
    """(ray, prim) index pairs whose ray meets the primitive's bounding ball beyond tmin.

    Two levels of bounding balls (per object, then per primitive of a multi-part object) cull
    most pairs before the exact, costlier tests.
    """
    rad = bounding_radius(prims)
    ids, inv = np.unique(prims.instance, return_inverse=True)
    parts = [np.nonzero(inv == k)[0] for k in range(len(ids))]
    oc = np.array([prims.center[p].mean(0) for p in parts])
    orad = np.array([
        (np.linalg.norm(prims.center[p] - oc[k], axis=-1) + rad[p]).max()
        for k, p in enumerate(parts)
    ])
    hit_obj = _ball_test(oc, orad, origins, dirs, tmin)
    ris, pis = [], []
    for k, p in enumerate(parts):
        rays = np.nonzero(hit_obj[:, k])[0]
        if rays.size == 0:
            continue
        if p.size == 1:
            ris.append(rays)
            pis.append(np.full_like(rays, p[0]))
            continue
        o = origins if origins.shape[0] == 1 else origins[rays]
        r2, j2 = np.nonzero(_ball_test(prims.center[p], rad[p], o, dirs[rays], tmin))
        ris.append(rays[r2])
        pis.append(p[j2])
    if not ris:
        return np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(ris), np.concatenate(pis)


def _pairs_t(prims: Primitives, origins, dirs, ri, pi, tmin: float) -> np.ndarray:
    """Exact t [m] of candidate pairs (inf on a miss), evaluated in each primitive's frame."""
    t = np.full(ri.shape, np.inf)
    for kind in (SPHERE, BOX, CYLINDER, CAPSULE):
        m = prims.kind[pi] == kind
        if not m.any():
            continue
        r_i, p_i = ri[m], pi[m]
        rel = origins[r_i if origins.shape[0] > 1 else np.zeros_like(r_i)] - prims.center[p_i]
        d = dirs[r_i]
        if kind != SPHERE:  # spheres are rotation-invariant: skip the change of frame
            rot = prims.rotation[p_i]
            rel = (rel[:, :, None] * rot).sum(1)
            d = (d[:, :, None] * rot).sum(1)
        t[m] = _hit_t(kind, rel, d, prims.size[p_i], tmin)
    return t


def _room_hit(lo: np.ndarray, hi: np.ndarray, origins: np.ndarray, dirs: np.ndarray):
    """Exit distance of rays from inside the room box; returns t [n] and the axis hit [n]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        tw = np.where(dirs > 0, (hi - origins) / dirs, (lo - origins) / dirs)
    tw = np.where(dirs == 0, np.inf, tw)
    axis = np.argmin(tw, axis=-1)
    return np.take_along_axis(tw, axis[:, None], -1)[:, 0], axis


def _chunks(n: int, p: int):
    if p == 0:
        return
    step = max(1, _CHUNK // p)
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def closest_hit(scene: Scene, origins: np.ndarray, dirs: np.ndarray):
    """Closest hit of each ray: (t [n], prim [n] with ROOM for the room, room axis [n]).

    origins [n|1, 3], dirs [n, 3]. Rays must start inside the room and outside every primitive.
    """
    n = dirs.shape[0]
    t, axis = _room_hit(scene.lo, scene.hi, np.broadcast_to(origins, dirs.shape), dirs)
    prim = np.full(n, ROOM)
    for sl in _chunks(n, len(scene.prims)):
        o = origins if origins.shape[0] == 1 else origins[sl]
        ri, pi = _candidates(scene.prims, o, dirs[sl], 0.0)
        if ri.size == 0:
            continue
        tp = _pairs_t(scene.prims, o, dirs[sl], ri, pi, 0.0)
        ts = t[sl]  # a view: updated in place
        np.minimum.at(ts, ri, tp)
        win = np.isfinite(tp) & (tp == ts[ri])
        prim[sl.start + ri[win]] = pi[win]
    return t, prim, axis


def occluded(prims: Primitives, origins: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Whether rays from `origins` [n,3] towards a direction [3] hit any primitive (shadows)."""
    n = origins.shape[0]
    out = np.zeros(n, bool)
    if len(prims) == 0 or n == 0:
        return out
    dirs = np.broadcast_to(direction, (n, 3))
    for sl in _chunks(n, len(prims)):
        ri, pi = _candidates(prims, origins[sl], dirs[sl], 1e-4)
        tp = _pairs_t(prims, origins[sl], dirs[sl], ri, pi, 1e-4)
        out[sl.start + ri[np.isfinite(tp)]] = True
    return out


def local_geometry(scene: Scene, points: np.ndarray, prim: np.ndarray, axis: np.ndarray,
                   dirs: np.ndarray):
    """Local hit coordinates and world normals of hits.

    points [n,3] world hit points, prim [n] (ROOM or index), axis [n] room axis, dirs [n,3].
    Returns (local [n,3]: primitive-frame point, or the world point for the room;
    normal [n,3] unit world normal facing the ray origin).
    """
    local = points.copy()
    normal = np.zeros_like(points)
    room = prim == ROOM
    # Room: the inward normal of the wall the ray exits through.
    ax = axis[room]
    nr = np.zeros((ax.size, 3))
    nr[np.arange(ax.size), ax] = -np.sign(dirs[room, ax])
    normal[room] = nr
    hit = ~room
    if hit.any():
        pi = prim[hit]
        rot = scene.prims.rotation[pi]
        size = scene.prims.size[pi]
        kind = scene.prims.kind[pi]
        q = ((points[hit] - scene.prims.center[pi])[:, :, None] * rot).sum(1)
        nl = np.zeros_like(q)
        m = kind == SPHERE
        nl[m] = q[m]
        m = kind == BOX
        if m.any():
            rel = np.abs(q[m]) / size[m]
            a = np.argmax(rel, -1)
            nb = np.zeros((a.size, 3))
            nb[np.arange(a.size), a] = np.sign(q[m][np.arange(a.size), a])
            nl[m] = nb
        m = kind == CYLINDER
        if m.any():
            qc, r, h = q[m], size[m, 0], size[m, 1]
            rad = np.hypot(qc[:, 0], qc[:, 2])
            cap = (h - np.abs(qc[:, 1])) < (r - rad)
            nl[m] = np.where(
                cap[:, None],
                np.stack([0 * rad, np.sign(qc[:, 1]), 0 * rad], -1),
                np.stack([qc[:, 0], 0 * rad, qc[:, 2]], -1),
            )
        m = kind == CAPSULE
        if m.any():
            qc, h = q[m], size[m, 1]
            nl[m] = qc - np.stack([0 * h, np.clip(qc[:, 1], -h, h), 0 * h], -1)
        nl /= np.linalg.norm(nl, axis=-1, keepdims=True) + 1e-12
        normal[hit] = (rot * nl[:, None, :]).sum(-1)
        local[hit] = q
    return local, normal
