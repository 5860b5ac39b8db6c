"""Shading and the per-pixel entry point of the ray caster: procedural albedo, ambient +
Lambert + Blinn-Phong from one directional light, hard shadows by shadow rays.

`render(scene, camera)` casts one primary ray per pixel (lavin_jax/data/raycast.py has the
geometry and frame conventions) and returns the raw per-pixel buffers the annotators use.
"""

from __future__ import annotations

import numpy as np

from lavin_jax.data.raycast import (
    CHECKER,
    ROOM,
    STRIPES,
    WAVES,
    Camera,
    Materials,
    Scene,
    closest_hit,
    local_geometry,
    occluded,
)


def albedo(mat: Materials, idx: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Procedural albedo [n,3] of material indices idx [n] at texture coordinates local [n,3]."""
    pat = mat.pattern[idx]
    p = local * mat.scale[idx, None]
    s = np.einsum("nk,nk->n", p, mat.axis[idx])
    checker = (np.floor(p + 1e-6).sum(-1) % 2).astype(np.float64)
    stripes = (np.floor(s + 1e-6) % 2).astype(np.float64)
    waves = 0.5 + 0.5 * np.sin(2 * np.pi * s)
    w = np.select([pat == CHECKER, pat == STRIPES, pat == WAVES], [checker, stripes, waves], 0.0)
    return mat.color[idx] * (1 - w[:, None]) + mat.color2[idx] * w[:, None]


def shade(scene: Scene, points, normal, local, mat_idx, view_dirs, shadows: bool = True):
    """Linear RGB [n,3]: ambient (sky/ground hemisphere) + Lambert + Blinn-Phong from the light.

    normal: unit world normals facing the viewer; view_dirs: ray directions (any length).
    """
    mat = scene.materials
    alb = albedo(mat, mat_idx, local)
    ndl = np.einsum("nk,k->n", normal, scene.light_dir)
    lit = ndl > 0
    if shadows and lit.any():
        src = points[lit] + 1e-3 * normal[lit]
        lit[lit] = ~occluded(scene.prims, src, scene.light_dir)
    diffuse = np.where(lit, ndl, 0.0)
    v = -view_dirs / np.linalg.norm(view_dirs, axis=-1, keepdims=True)
    half = v + scene.light_dir
    half /= np.linalg.norm(half, axis=-1, keepdims=True) + 1e-12
    ndh = np.clip(np.einsum("nk,nk->n", normal, half), 0.0, 1.0)
    spec = np.where(lit, mat.specular[mat_idx] * ndh ** mat.shininess[mat_idx], 0.0)
    hemi = 0.65 + 0.35 * normal[:, 1]  # brighter from the ceiling side
    return (
        alb * (scene.ambient * hemi[:, None] + scene.light_color * diffuse[:, None])
        + scene.light_color * spec[:, None]
    )


def render(scene: Scene, cam: Camera, shadows: bool = True) -> dict[str, np.ndarray]:
    """Cast one ray per pixel. Returns [H, W, ...] arrays:

    rgb float [H,W,3] in [0,1] (gamma 2.2 encoded), depth [H,W] (camera z, metres),
    normal_cam [H,W,3] (unit, camera frame, facing the camera), prim [H,W] (ROOM or index),
    local [H,W,3] (texture/primitive coordinates of the hit), point [H,W,3] world hit point.
    """
    h, w = cam.height, cam.width
    dirs = cam.ray_dirs()
    origin = cam.position[None]
    t, prim, axis = closest_hit(scene, origin, dirs)
    points = origin + t[:, None] * dirs
    local, normal = local_geometry(scene, points, prim, axis, dirs)
    room = prim == ROOM
    # Room material by surface: floor (-y wall), ceiling (+y wall), else the walls.
    floor = room & (axis == 1) & (normal[:, 1] > 0)
    ceil = room & (axis == 1) & (normal[:, 1] < 0)
    mat_idx = np.where(floor, scene.room_material[0], scene.room_material[1])
    mat_idx = np.where(ceil, scene.room_material[2], mat_idx)
    if len(scene.prims):
        mat_idx = np.where(room, mat_idx, scene.prims.material[np.maximum(prim, 0)])
    rgb = shade(scene, points, normal, local, mat_idx, dirs, shadows)
    rgb = np.clip(rgb, 0.0, 1.0) ** (1 / 2.2)
    return {
        "rgb": rgb.reshape(h, w, 3),
        "depth": t.reshape(h, w),
        "normal_cam": (normal @ cam.rotation).reshape(h, w, 3),
        "prim": prim.reshape(h, w),
        "local": local.reshape(h, w, 3),
        "point": points.reshape(h, w, 3),
    }
