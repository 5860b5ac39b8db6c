"""`render_example` / `render_clip`: one synthetic image or clip with all its annotations.

Pure functions of (seed, resolution[, frames]): deterministic, no TFDS, no files. The schema
(see also lavin_jax/data/sources/synthetic_scenes.py):

image example (H = W = resolution; N = num_objects visible objects):
  image      uint8   [H,W,3]
  depth      float32 [H,W]    metres along the camera z axis; every pixel hits (closed room)
  normals    float32 [H,W,3]  unit, camera frame (x right, y down, z forward), facing the camera
  semantic   uint8   [H,W]    index into scenes.CLASSES (0 = background: floor/walls/ceiling)
  instance   int32   [H,W]    0 = background, 1..N visible objects (a figure is one instance)
  edges      uint8   [H,W]    255 on instance / normal (>30 deg) / self-occlusion boundaries
  camera     float32 [3,3]    intrinsics K in pixels (pixel centres at +0.5)
  num_objects int32  []       N
  boxes      float32 [N,4]    (ymin, xmin, ymax, xmax) in [0,1] of instance k+1's pixels
  box_classes int32  [N]      class of instance k+1
  keypoints  float32 [N,K,3]  (y, x, visible) with y, x in image fractions (may lie outside
                              [0,1] when visible = 0); all zero for non-figure objects.
                              K = scenes.NUM_KEYPOINTS, limbs = scenes.SKELETON.
clip example (T = frames, an instance keeps its id across the clip; ids are the scene's object
order, so an id may be absent from some frames):
  frames uint8 [T,H,W,3], depth float32 [T,H,W], normals float32 [T,H,W,3],
  semantic uint8 [T,H,W], instance int32 [T,H,W], camera float32 [3,3],
  flow float32 [T,H,W,2]: forward flow (dy, dx) in pixels of the surface point seen at pixel
  (i, j) of frame t to its position in frame t+1 (also where it is occluded there); the last
  frame is zeros.
"""

from __future__ import annotations

import numpy as np

from lavin_jax.data import raycast as rc
from lavin_jax.data import scenes, shading

_IMAGE, _CLIP = 0, 1  # seed-stream tags: images and clips of one seed are different scenes


def check_args(resolution: int, frames: int = 1) -> None:
    if not (16 <= resolution <= 1024):
        raise ValueError(f"resolution={resolution}: expected 16..1024 pixels")
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames={frames}: expected 1 + 4k frames (1, 5, 9, ...)")


def _maps(scene: rc.Scene, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Instance ([H,W] int32, object index + 1, 0 background) and semantic ([H,W] uint8) maps."""
    prim = out["prim"]
    hit = prim >= 0
    safe = np.maximum(prim, 0)
    inst = np.where(hit, scene.prims.instance[safe], 0).astype(np.int32)
    sem = np.where(hit, scene.prims.semantic[safe], 0).astype(np.uint8)
    return inst, sem


def edges(depth: np.ndarray, normals: np.ndarray, instance: np.ndarray, prim: np.ndarray):
    """uint8 [H,W] in {0,255}: boundaries between right/down neighbour pixels.

    A pair is a boundary if its instances differ, its normals differ by > 30 degrees, or it
    changes primitive with a depth jump > 2% (a figure's limb in front of its own body). The
    nearer pixel of the pair is marked, so a silhouette is drawn on the object.
    """
    out = np.zeros(depth.shape, bool)
    cos30 = np.cos(np.deg2rad(30))
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        a, b = tuple(a), tuple(b)
        za, zb = depth[a], depth[b]
        jump = (
            (instance[a] != instance[b])
            | (np.einsum("...k,...k->...", normals[a], normals[b]) < cos30)
            | ((prim[a] != prim[b]) & (np.abs(za - zb) > 0.02 * np.minimum(za, zb)))
        )
        out[a] |= jump & (za <= zb)
        out[b] |= jump & (zb < za)
    return (out * 255).astype(np.uint8)


def _keypoints(spec: scenes.SceneSpec, obj_idx: int, cam: rc.Camera, depth, inst) -> np.ndarray:
    """[K,3] (y, x, visible) of a figure; visible = in frame and not hidden by another surface."""
    rows, cols, z = cam.project(scenes.figure_joints(spec.objects[obj_idx], 0.0))
    h, w = depth.shape
    i, j = np.floor(rows).astype(int), np.floor(cols).astype(int)
    inside = (z > 0) & (i >= 0) & (i < h) & (j >= 0) & (j < w)
    ic, jc = np.clip(i, 0, h - 1), np.clip(j, 0, w - 1)
    # The joint lies inside its limb: seen if its own figure covers the pixel, or nothing
    # nearer than the joint does (a limb thinner than a pixel).
    seen = (inst[ic, jc] == obj_idx + 1) | (depth[ic, jc] >= z)
    return np.stack([rows / h, cols / w, (inside & seen).astype(np.float64)], -1)


def render_example(seed: int, resolution: int) -> dict[str, np.ndarray]:
    """One still image with every annotation (schema in the module docstring)."""
    check_args(resolution)
    spec = scenes.sample_scene(np.random.default_rng([seed, _IMAGE]), clip=False)
    scene, cam = scenes.build(spec, 0.0, resolution)
    out = shading.render(scene, cam)
    inst, sem = _maps(scene, out)
    normals = out["normal_cam"].astype(np.float32)
    edge = edges(out["depth"], normals, inst, out["prim"])
    # Relabel visible objects 1..N in scene order.
    ids = np.unique(inst[inst > 0])
    lut = np.zeros(len(spec.objects) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    n, k = len(ids), scenes.NUM_KEYPOINTS
    boxes = np.zeros((n, 4), np.float32)
    classes = np.zeros(n, np.int32)
    kps = np.zeros((n, k, 3), np.float32)
    for r, oid in enumerate(ids):
        ys, xs = np.nonzero(inst == oid)
        boxes[r] = (ys.min() / resolution, xs.min() / resolution,
                    (ys.max() + 1) / resolution, (xs.max() + 1) / resolution)  # fmt: skip
        classes[r] = spec.objects[oid - 1].cls
        if classes[r] == scenes.FIGURE:
            kps[r] = _keypoints(spec, oid - 1, cam, out["depth"], inst)
    return {
        "image": np.round(out["rgb"] * 255).astype(np.uint8),
        "depth": out["depth"].astype(np.float32),
        "normals": normals,
        "semantic": sem,
        "instance": lut[inst],
        "edges": edge,
        "camera": cam.intrinsics,
        "num_objects": np.int32(n),
        "boxes": boxes,
        "box_classes": classes,
        "keypoints": kps,
    }


def _flow(next_scene: rc.Scene, next_cam: rc.Camera, out: dict[str, np.ndarray]) -> np.ndarray:
    """[H,W,2] (dy, dx) of each pixel's surface point from this frame to the next one."""
    prim, local = out["prim"], out["local"]
    pts = out["point"].copy()  # the room is static: its points stay put
    hit = prim >= 0
    p = prim[hit]
    pts[hit] = next_scene.prims.center[p] + np.einsum(
        "nij,nj->ni", next_scene.prims.rotation[p], local[hit]
    )
    rows, cols, _ = next_cam.project(pts)
    h, w = prim.shape
    i, j = np.mgrid[0:h, 0:w] + 0.5
    return np.stack([rows - i, cols - j], -1).astype(np.float32)


def render_clip(seed: int, resolution: int, frames: int = 5) -> dict[str, np.ndarray]:
    """A clip of `frames` = 1 + 4k frames with a moving camera and moving objects."""
    check_args(resolution, frames)
    spec = scenes.sample_scene(np.random.default_rng([seed, _CLIP]), clip=True)
    keys = ("frames", "depth", "normals", "semantic", "instance", "flow")
    acc: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    cur = scenes.build(spec, 0.0, resolution)
    for t in range(frames):
        scene, cam = cur
        out = shading.render(scene, cam)
        inst, sem = _maps(scene, out)
        acc["frames"].append(np.round(out["rgb"] * 255).astype(np.uint8))
        acc["depth"].append(out["depth"].astype(np.float32))
        acc["normals"].append(out["normal_cam"].astype(np.float32))
        acc["semantic"].append(sem)
        acc["instance"].append(inst)
        if t + 1 < frames:
            cur = scenes.build(spec, float(t + 1), resolution)
            acc["flow"].append(_flow(cur[0], cur[1], out))
        else:
            acc["flow"].append(np.zeros((resolution, resolution, 2), np.float32))
    res = {k: np.stack(v) for k, v in acc.items()}
    res["camera"] = cam.intrinsics
    return res


def render_seeded(kind: str, resolution: int, frames: int, seed: int) -> dict[str, np.ndarray]:
    """render_example ("image") or render_clip ("clip"), plus "seed" int64 (builder records)."""
    if kind == "clip":
        ex = render_clip(seed, resolution, frames)
    else:
        ex = render_example(seed, resolution)
    ex["seed"] = np.int64(seed)
    return ex
