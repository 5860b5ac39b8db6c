"""Procedural scene sampling for the `synthetic_scenes` source: room, objects, stick figures,
materials, light, camera, and their motion over a clip.

A scene is sampled once per seed as a `SceneSpec`; `build(spec, frame)` poses it at a frame
index (0 for still images) as a `raycast.Scene` + `raycast.Camera`. Motion is rigid per
primitive (objects translate and spin, figures walk with swinging limbs, the camera orbits and
dollies), so the forward flow of a surface point is exact: keep its primitive-local
coordinates and re-pose the primitive at the next frame.

World frame: +y up, floor at y = 0. Scene content is independent of the resolution: one seed
gives the same scene at 64 and at 512 px.
"""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np

from lavin_jax.data import raycast as rc

# The schema's constants live in raycast (one import for every consumer); re-exported here.
CLASSES, KEYPOINT_NAMES, NUM_KEYPOINTS, SKELETON = (
    rc.CLASSES, rc.KEYPOINT_NAMES, rc.NUM_KEYPOINTS, rc.SKELETON
)  # fmt: skip
BACKGROUND, SPHERE, BOX, CYLINDER, CAPSULE, FIGURE = range(len(CLASSES))
MAX_OBJECTS = 8  # objects placed per scene, figures included
# Clip frames over which the camera path is kept clear of objects and inside the room; longer
# clips still render, but may move the camera into an object.
HORIZON = 16

# Figure proportions as fractions of its height scale s (metres ~ 1.3 .. 1.9).
_TORSO, _NECK_HEAD, _HEAD_R, _TORSO_R = 0.30, 0.10, 0.07, 0.075
_SHOULDER, _HIP = 0.11, 0.06
_UPPER_ARM, _FOREARM, _ARM_R = 0.17, 0.16, 0.032
_THIGH, _SHIN, _LEG_R = 0.24, 0.24, 0.042
# Capsules of a figure as (keypoint a, keypoint b, radius / s, material slot: 1 top, 2 bottom);
# the neck->pelvis torso and the head ball are added separately.
_LIMBS = (
    (2, 5, 0.04, 1), (8, 11, 0.05, 2),
    (2, 3, _ARM_R, 1), (3, 4, _ARM_R, 1), (5, 6, _ARM_R, 1), (6, 7, _ARM_R, 1),
    (8, 9, _LEG_R, 2), (9, 10, _LEG_R, 2), (11, 12, _LEG_R, 2), (12, 13, _LEG_R, 2),
)  # fmt: skip


@dataclasses.dataclass
class Obj:
    """One object: a single primitive (sphere/box/cylinder/capsule) or a figure.

    pos [3] at frame 0; vel [3] metres per frame; yaw and yaw_rate (rad, rad per frame) about
    +y; tilt [3,3] a fixed base rotation; size [3] primitive size; mats material indices
    (figure: skin, top, bottom); pose: figure joint angles (see `_figure_joints`).
    """

    cls: int
    pos: np.ndarray
    yaw: float
    size: np.ndarray
    mats: tuple[int, ...]
    tilt: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    vel: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))
    yaw_rate: float = 0.0
    pose: dict[str, np.ndarray] | None = None


@dataclasses.dataclass
class SceneSpec:
    lo: np.ndarray
    hi: np.ndarray
    room_material: np.ndarray
    materials: rc.Materials
    light_dir: np.ndarray
    light_color: np.ndarray
    ambient: np.ndarray
    objects: list[Obj]
    cam_target: np.ndarray  # [3]
    cam_orbit: np.ndarray  # [3] azimuth, elevation, distance at frame 0
    cam_rate: np.ndarray  # [3] per-frame change of (azimuth, elevation, distance)
    cam_roll: float
    fov: float  # horizontal field of view, radians


def rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def look_at(position: np.ndarray, target: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """Camera -> world rotation (columns: x right, y down, z forward) for a y-up world."""
    f = target - position
    f = f / np.linalg.norm(f)
    right = np.cross(f, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(f, right)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, f], axis=1)


# --------------------------------------------------------------------------- sampling


def _sample_materials(rng: np.random.Generator, n: int, scale: tuple[float, float]):
    hue = rng.uniform(0, 1, n)
    color = np.array([colorsys.hsv_to_rgb(h, rng.uniform(0.15, 0.9), rng.uniform(0.35, 1.0))
                      for h in hue])
    alt_hue = (hue + rng.choice([0.0, 0.1, 0.5], n)) % 1.0
    color2 = np.array([colorsys.hsv_to_rgb(h, rng.uniform(0.0, 0.9), rng.uniform(0.1, 1.0))
                       for h in alt_hue])
    axis = rng.normal(size=(n, 3))
    return dict(
        color=color, color2=color2,
        pattern=rng.choice(4, n, p=[0.35, 0.25, 0.2, 0.2]),
        scale=rng.uniform(*scale, n),
        axis=axis / np.linalg.norm(axis, axis=-1, keepdims=True),
        specular=rng.uniform(0.0, 0.5, n), shininess=rng.uniform(5.0, 80.0, n),
    )  # fmt: skip


def _skin(rng: np.random.Generator):
    tone = rng.uniform(0.25, 0.95)
    c = np.array([0.95, 0.72, 0.58]) * tone + np.array([0.05, 0.03, 0.02])
    return dict(color=c[None], color2=c[None], pattern=np.zeros(1, int), scale=np.ones(1),
                axis=np.array([[0.0, 1.0, 0.0]]), specular=np.full(1, 0.15),
                shininess=np.full(1, 20.0))  # fmt: skip


def _figure_pose(rng: np.random.Generator, clip: bool) -> dict[str, np.ndarray]:
    """Joint angles (rad) per side [left, right] plus a gait for clips (zero amplitude else)."""
    deg = np.pi / 180
    pose = dict(
        arm_swing=rng.uniform(-50, 160, 2) * deg,
        arm_abduct=rng.uniform(5, 80, 2) * deg,
        elbow=rng.uniform(0, 120, 2) * deg,
        leg_swing=rng.uniform(-25, 50, 2) * deg,
        leg_abduct=rng.uniform(0, 20, 2) * deg,
        knee=rng.uniform(0, 80, 2) * deg,
        lean=rng.uniform(-8, 20, 1) * deg,
        gait_amp=np.zeros(1), gait_freq=np.zeros(1), gait_phase=rng.uniform(0, 2 * np.pi, 1),
    )  # fmt: skip
    if clip and rng.uniform() < 0.8:  # walking: calmer base pose, swinging limbs
        pose["arm_swing"] = rng.uniform(-15, 30, 2) * deg
        pose["leg_swing"] = rng.uniform(-10, 15, 2) * deg
        pose["knee"] = rng.uniform(0, 20, 2) * deg
        pose["gait_amp"] = rng.uniform(15, 35, 1) * deg
        pose["gait_freq"] = rng.uniform(0.35, 0.8, 1)
    return pose


def sample_scene(rng: np.random.Generator, clip: bool = False) -> SceneSpec:
    """Draw one scene (motion parameters are drawn too, and used only when `clip`)."""
    deg = np.pi / 180
    # Camera orbit about a target near the origin; motion per frame for clips.
    target = np.array([rng.uniform(-0.5, 0.5), rng.uniform(0.3, 1.0), rng.uniform(-0.5, 0.5)])
    orbit = np.array([rng.uniform(0, 2 * np.pi), rng.uniform(8, 35) * deg, rng.uniform(3.4, 5.8)])
    d0 = orbit[2]
    dolly = (max(-0.15, (3.2 - d0) / HORIZON), min(0.15, (6.5 - d0) / HORIZON))  # stay 3.2..6.5
    spin = rng.choice([-1, 1]) * rng.uniform(0.02, 0.08)
    rate = np.array([spin, rng.uniform(-0.01, 0.01), rng.uniform(*dolly)])
    rate = rate if clip else np.zeros(3)
    roll, fov = rng.uniform(-5, 5) * deg, rng.uniform(45, 65) * deg
    steps = HORIZON + 1 if clip else 1
    cams = [_cam_position(target, orbit + k * rate) for k in range(steps)]
    cam_y = max(c[1] for c in cams)
    lo = np.array([-rng.uniform(6.5, 11), 0.0, -rng.uniform(6.5, 11)])
    ceiling = rng.uniform(max(3.5, cam_y + 0.6), 8)
    hi = np.array([rng.uniform(6.5, 11), ceiling, rng.uniform(6.5, 11)])

    mats = [_sample_materials(rng, 3, (0.25, 1.0))]  # floor, walls, ceiling
    n_mat = 3
    objects: list[Obj] = []
    footprints: list[tuple[np.ndarray, float]] = []
    n_fig = rng.choice([1, 2], p=[0.6, 0.4])
    n_obj = min(MAX_OBJECTS, n_fig + rng.integers(2, 7))
    for i in range(n_obj):
        cls = FIGURE if i < n_fig else int(rng.choice([SPHERE, BOX, CYLINDER, CAPSULE]))
        obj = _sample_object(rng, cls, n_mat, clip)
        radius = 0.45 * obj.size[1] if cls == FIGURE else float(np.linalg.norm(obj.size))
        for _ in range(30):  # rejection: no overlap, keep clear of the camera path
            xz = rng.uniform(-2.6, 2.6, 2)
            p = np.array([xz[0], 0.0, xz[1]])
            path = [p + k * obj.vel for k in range(steps)]
            clear = all(np.linalg.norm((q - c)[[0, 2]]) > radius + 1.2 for q in path for c in cams)
            apart = all(np.linalg.norm((p - q)[[0, 2]]) > radius + r + 0.05 for q, r in footprints)
            if clear and apart:
                break
        else:
            continue
        obj.pos = p + np.array([0.0, obj.pos[1], 0.0])
        footprints.append((p, radius))
        objects.append(obj)
        if cls == FIGURE:
            m = _sample_materials(rng, 2, (3.0, 10.0))
            mats += [_skin(rng), m]
            n_mat += 3
        else:
            mats.append(_sample_materials(rng, 1, (2.0, 8.0)))
            n_mat += 1
    materials = rc.Materials(**{k: np.concatenate([m[k] for m in mats]) for k in mats[0]})

    el, az = rng.uniform(25, 80) * deg, rng.uniform(0, 2 * np.pi)
    light_dir = np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
    tint = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.25), 1.0))
    return SceneSpec(
        lo=lo, hi=hi, room_material=np.arange(3), materials=materials,
        light_dir=light_dir, light_color=tint * rng.uniform(0.7, 1.1),
        ambient=np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.3), 1.0))
        * rng.uniform(0.15, 0.4),
        objects=objects, cam_target=target, cam_orbit=orbit, cam_rate=rate, cam_roll=roll,
        fov=fov,
    )  # fmt: skip


def _sample_object(rng: np.random.Generator, cls: int, mat0: int, clip: bool) -> Obj:
    moving = clip and rng.uniform() < 0.7
    heading = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0.03, 0.12) if moving else 0.0
    vel = speed * np.array([np.sin(heading), 0.0, np.cos(heading)])
    spin = rng.uniform(-0.12, 0.12) if moving else 0.0
    yaw = rng.uniform(0, 2 * np.pi)
    if cls == FIGURE:
        s = rng.uniform(1.3, 1.9)
        pose = _figure_pose(rng, clip)
        walk = pose["gait_amp"][0] > 0
        vel = rng.uniform(0.03, 0.08) * np.array([np.sin(yaw), 0.0, np.cos(yaw)]) if walk else vel
        spin = rng.uniform(-0.04, 0.04) if walk else spin
        return Obj(FIGURE, np.zeros(3), yaw, np.array([s, s, s]), (mat0, mat0 + 1, mat0 + 2),
                   vel=vel, yaw_rate=spin, pose=pose)  # fmt: skip
    tilt, y = np.eye(3), 0.0
    if cls == SPHERE:
        r = rng.uniform(0.25, 0.7)
        size = np.array([r, 0.0, 0.0])
        y = r + (rng.uniform(0.2, 1.2) if rng.uniform() < 0.25 else 0.0)
        tilt = rot_x(rng.uniform(0, np.pi))  # only orients the texture
    elif cls == BOX:
        size = rng.uniform(0.2, 0.6, 3)
        y = size[1]
    else:  # CYLINDER / CAPSULE: upright or lying on its side
        r = rng.uniform(0.15, 0.5) if cls == CYLINDER else rng.uniform(0.12, 0.3)
        h = rng.uniform(0.2, 0.8) if cls == CYLINDER else rng.uniform(0.2, 0.6)
        size = np.array([r, h, 0.0])
        if rng.uniform() < 0.6:
            y = h + (r if cls == CAPSULE else 0.0)
        else:
            tilt, y = rot_x(np.pi / 2), r
    return Obj(cls, np.array([0.0, y, 0.0]), yaw, size, (mat0,), tilt=tilt, vel=vel,
               yaw_rate=spin)  # fmt: skip


def _cam_position(target: np.ndarray, orbit: np.ndarray) -> np.ndarray:
    az, el, dist = orbit
    return target + dist * np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])


# --------------------------------------------------------------------------- posing


def _limb_dir(swing: float, abduct: float, side: float) -> np.ndarray:
    """Unit direction of a limb hanging down, swung forward (+z) and abducted to `side` (+-x)."""
    return np.array(
        [side * np.sin(abduct), -np.cos(abduct) * np.cos(swing), np.cos(abduct) * np.sin(swing)]
    )


def _bend(d: np.ndarray, toward: np.ndarray, angle: float) -> np.ndarray:
    """Rotate unit d by `angle` in the plane of d and `toward`."""
    e = toward - np.dot(toward, d) * d
    n = np.linalg.norm(e)
    e = np.array([0.0, 1.0, 0.0]) if n < 1e-6 else e / n
    return np.cos(angle) * d + np.sin(angle) * e


def figure_joints(obj: Obj, frame: float) -> np.ndarray:
    """World keypoints [NUM_KEYPOINTS, 3] of a figure at a frame (feet resting on the floor).

    Figure frame: +z forward, +y up, its left side at +x.
    """
    p, s = obj.pose, obj.size[0]
    g = p["gait_amp"][0] * np.sin(p["gait_freq"][0] * frame + p["gait_phase"][0])
    osc = np.array([g, -g])  # left and right limbs swing in antiphase
    fwd, up = np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0])
    lean = p["lean"][0]
    spine = np.array([0.0, np.cos(lean), np.sin(lean)])
    pelvis = np.zeros(3)
    neck = pelvis + _TORSO * s * spine
    j = np.zeros((NUM_KEYPOINTS, 3))
    j[0], j[1] = neck + _NECK_HEAD * s * spine, neck
    for k, side in enumerate((1.0, -1.0)):  # left (+x), right (-x)
        sh = neck + side * _SHOULDER * s * np.array([1.0, 0.0, 0.0])
        ua = _limb_dir(p["arm_swing"][k] - osc[k], p["arm_abduct"][k], side)
        el = sh + _UPPER_ARM * s * ua
        wr = el + _FOREARM * s * _bend(ua, fwd + up, p["elbow"][k] + 0.5 * abs(osc[k]))
        hip = pelvis + side * _HIP * s * np.array([1.0, 0.0, 0.0])
        th = _limb_dir(p["leg_swing"][k] + osc[k], p["leg_abduct"][k], side)
        kn = hip + _THIGH * s * th
        an = kn + _SHIN * s * _bend(th, -fwd, p["knee"][k] + max(0.0, osc[k]))
        j[2 + 3 * k : 5 + 3 * k] = sh, el, wr
        j[8 + 3 * k : 11 + 3 * k] = hip, kn, an
    # Rest the lowest surface point on the floor.
    radii = np.full(NUM_KEYPOINTS, _LEG_R * s)
    radii[0] = _HEAD_R * s
    radii[[3, 4, 6, 7]] = _ARM_R * s
    j[:, 1] -= (j[:, 1] - radii).min()
    rot = rot_y(obj.yaw + obj.yaw_rate * frame)
    return j @ rot.T + obj.pos + obj.vel * frame


def _capsule_frame(a: np.ndarray, b: np.ndarray, side: np.ndarray):
    """Centre, rotation (local y along a->b, x near `side`) and half length of a capsule a-b."""
    y = b - a
    half = np.linalg.norm(y) / 2
    y = y / (2 * half)
    x = side - np.dot(side, y) * y
    if np.linalg.norm(x) < 1e-6:
        x = np.cross(y, [0.0, 0.0, 1.0]) if abs(y[2]) < 0.9 else np.cross(y, [1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    return (a + b) / 2, np.stack([x, y, np.cross(x, y)], axis=1), half


Prim = tuple[int, np.ndarray, np.ndarray, np.ndarray, int]


def object_prims(obj: Obj, frame: float) -> list[Prim]:
    """Primitives (kind, centre, rotation, size, material) of one object at a frame."""
    rot = rot_y(obj.yaw + obj.yaw_rate * frame)
    if obj.cls != FIGURE:
        kind = {SPHERE: rc.SPHERE, BOX: rc.BOX, CYLINDER: rc.CYLINDER, CAPSULE: rc.CAPSULE}
        return [(kind[obj.cls], obj.pos + obj.vel * frame, rot @ obj.tilt, obj.size, obj.mats[0])]
    j, s = figure_joints(obj, frame), obj.size[0]
    side = rot[:, 0]
    out = [(rc.SPHERE, j[0], rot, np.array([_HEAD_R * s, 0, 0]), obj.mats[0])]
    pelvis = (j[8] + j[11]) / 2
    c, r, h = _capsule_frame(pelvis, j[1], side)
    out.append((rc.CAPSULE, c, r, np.array([_TORSO_R * s, h, 0]), obj.mats[1]))
    for a, b, rad, slot in _LIMBS:
        c, r, h = _capsule_frame(j[a], j[b], side)
        out.append((rc.CAPSULE, c, r, np.array([rad * s, h, 0]), obj.mats[slot]))
    return out


def build(spec: SceneSpec, frame: float, resolution: int) -> tuple[rc.Scene, rc.Camera]:
    """Pose the scene and camera at a frame index. Instance ids are object index + 1."""
    rows = []
    for i, obj in enumerate(spec.objects):
        rows += [(*p, i + 1, obj.cls) for p in object_prims(obj, frame)]
    prims = rc.Primitives(
        kind=np.array([r[0] for r in rows], int), center=np.array([r[1] for r in rows]),
        rotation=np.array([r[2] for r in rows]), size=np.array([r[3] for r in rows], float),
        material=np.array([r[4] for r in rows], int), instance=np.array([r[5] for r in rows]),
        semantic=np.array([r[6] for r in rows]),
    )  # fmt: skip
    scene = rc.Scene(spec.lo, spec.hi, spec.room_material, prims, spec.materials,
                     spec.light_dir, spec.light_color, spec.ambient)  # fmt: skip
    pos = _cam_position(spec.cam_target, spec.cam_orbit + frame * spec.cam_rate)
    f = (resolution / 2) / np.tan(spec.fov / 2)
    cam = rc.Camera(pos, look_at(pos, spec.cam_target, spec.cam_roll), f, f,
                    resolution / 2, resolution / 2, resolution, resolution)  # fmt: skip
    return scene, cam
