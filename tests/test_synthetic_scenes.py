"""synthetic_scenes: the ray caster against analytic cases, annotation consistency, exact flow,
and the TFDS builder / prepare CLI round trip (tiny resolutions, a handful of examples)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from lavin_jax.data import raycast as rc
from lavin_jax.data import render, scenes, shading
from lavin_jax.data.render import render_clip, render_example

R = 32  # test resolution


def _room_scene(prims: rc.Primitives | None = None) -> rc.Scene:
    mats = rc.Materials(
        color=np.full((2, 3), 0.5), color2=np.full((2, 3), 0.2), pattern=np.array([1, 0]),
        scale=np.ones(2), axis=np.tile([0.0, 1.0, 0.0], (2, 1)), specular=np.full(2, 0.3),
        shininess=np.full(2, 10.0),
    )  # fmt: skip
    if prims is None:
        prims = rc.Primitives(*(np.zeros((0,) + s) for s in ((), (3,), (3, 3), (3,), (), (), ())))
        prims.kind = prims.kind.astype(int)
    return rc.Scene(np.array([-20.0, 0.0, -20.0]), np.array([20.0, 10.0, 8.0]), np.zeros(3, int),
                    prims, mats, np.array([0.3, 0.9, -0.3]) / np.linalg.norm([0.3, 0.9, -0.3]),
                    np.ones(3), np.full(3, 0.2))  # fmt: skip


def _one(kind: int, center, size, rotation=None) -> rc.Primitives:
    return rc.Primitives(
        kind=np.array([kind]), center=np.array([center], float),
        rotation=np.array([np.eye(3) if rotation is None else rotation]),
        size=np.array([size], float), material=np.array([1]), instance=np.array([1]),
        semantic=np.array([1]),
    )  # fmt: skip


def _camera(pos=(0.0, 1.5, 0.0), target=(0.0, 1.5, 5.0), res=R, f=30.0) -> rc.Camera:
    pos = np.array(pos)
    return rc.Camera(pos, scenes.look_at(pos, np.array(target)), f, f, res / 2, res / 2, res, res)


def _cam_rays(cam: rc.Camera) -> np.ndarray:
    """[H,W,3] camera-frame ray directions with unit z (pixel centres at +0.5)."""
    v, u = np.mgrid[0 : cam.height, 0 : cam.width] + 0.5
    return np.stack([(u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy, np.ones(u.shape)], -1)


def test_sphere_depth_and_normals_are_exact():
    cam = _camera()
    c_world = np.array([0.3, 1.2, 4.0])
    out = shading.render(_room_scene(_one(rc.SPHERE, c_world, [1.0, 0, 0])), cam)
    d = _cam_rays(cam)
    c = (c_world - cam.position) @ cam.rotation  # centre in the camera frame
    a, b = (d * d).sum(-1), (d * c).sum(-1)
    disc = b * b - a * (c @ c - 1.0)
    hit = disc > 1e-3  # skip grazing pixels
    t = (b - np.sqrt(np.maximum(disc, 0))) / a
    assert hit.sum() > 100
    np.testing.assert_array_equal(out["prim"][hit], 0)
    np.testing.assert_allclose(out["depth"][hit], t[hit], rtol=0, atol=1e-9)
    normal = t[..., None] * d - c
    np.testing.assert_allclose(out["normal_cam"][hit], normal[hit], atol=1e-9)
    assert (out["prim"][disc < -1e-3] == rc.ROOM).all()


def test_floor_and_wall_depth_and_normals_are_exact():
    cam = _camera(pos=(0.0, 1.5, 0.0), target=(0.0, 1.5, 5.0))
    out = shading.render(_room_scene(), cam)
    d = _cam_rays(cam)
    floor = out["normal_cam"][..., 1] < -0.99  # camera y is down: the floor faces -y
    wall = out["normal_cam"][..., 2] < -0.99  # the far wall faces the camera
    assert floor.sum() > 100 and wall.sum() > 100 and not (floor & wall).any()
    np.testing.assert_allclose(out["depth"][floor], 1.5 / d[..., 1][floor], rtol=1e-12)
    np.testing.assert_allclose(out["depth"][wall], 8.0, rtol=1e-12)  # wall at z = 8
    np.testing.assert_allclose(out["point"][floor][:, 1], 0.0, atol=1e-9)


@pytest.mark.parametrize("kind,size", [(rc.BOX, [0.5, 0.4, 0.3]), (rc.CYLINDER, [0.5, 0.4, 0]),
                                       (rc.CAPSULE, [0.3, 0.4, 0])])  # fmt: skip
def test_front_faces_are_exact(kind, size):
    """A face-on box / an upright cylinder / capsule seen from the front: depth at the centre
    column and normals against closed forms."""
    cam = _camera(pos=(0.0, 1.5, 0.0), target=(0.0, 1.5, 5.0), res=R + 1)  # a centre pixel
    out = shading.render(_room_scene(_one(kind, [0.0, 1.5, 4.0], size)), cam)
    i = j = R // 2
    near = 4.0 - (size[2] if kind == rc.BOX else size[0])
    assert out["prim"][i, j] == 0
    np.testing.assert_allclose(out["depth"][i, j], near, atol=1e-12)
    np.testing.assert_allclose(out["normal_cam"][i, j], [0, 0, -1], atol=1e-12)
    if kind == rc.BOX:  # the whole front face is a plane at z = near
        face = np.abs(out["normal_cam"][..., 2] + 1) < 1e-9
        face &= out["prim"] == 0
        assert face.sum() > 20
        np.testing.assert_allclose(out["depth"][face], near, atol=1e-12)


def test_culling_matches_brute_force():
    """The bounding-ball culling changes nothing: same hits as testing every (ray, prim) pair."""
    spec = scenes.sample_scene(np.random.default_rng(7))
    scene, cam = scenes.build(spec, 0.0, 24)
    dirs = cam.ray_dirs()
    t, prim, _ = rc.closest_hit(scene, cam.position[None], dirs)
    n, p = len(dirs), len(scene.prims)
    ri, pi = np.repeat(np.arange(n), p), np.tile(np.arange(p), n)
    tp = rc._pairs_t(scene.prims, cam.position[None], dirs, ri, pi, 0.0).reshape(n, p)
    t_room, _ = rc._room_hit(scene.lo, scene.hi, np.broadcast_to(cam.position, dirs.shape), dirs)
    best = np.minimum(tp.min(-1), t_room)
    np.testing.assert_array_equal(t, best)
    objs = tp.min(-1) < t_room
    np.testing.assert_array_equal(prim[objs], tp.argmin(-1)[objs])


def test_render_example_schema_and_determinism():
    ex = render_example(3, R)
    again = render_example(3, R)
    for k in ex:
        np.testing.assert_array_equal(ex[k], again[k], err_msg=k)
    assert not np.array_equal(render_example(4, R)["image"], ex["image"])
    n, k = int(ex["num_objects"]), scenes.NUM_KEYPOINTS
    expect = dict(image=(np.uint8, (R, R, 3)), depth=(np.float32, (R, R)),
                  normals=(np.float32, (R, R, 3)), semantic=(np.uint8, (R, R)),
                  instance=(np.int32, (R, R)), edges=(np.uint8, (R, R)),
                  camera=(np.float32, (3, 3)), boxes=(np.float32, (n, 4)),
                  box_classes=(np.int32, (n,)), keypoints=(np.float32, (n, k, 3)))  # fmt: skip
    for key, (dtype, shape) in expect.items():
        assert ex[key].dtype == dtype and ex[key].shape == shape, key
    assert n >= 1 and np.isfinite(ex["depth"]).all() and (ex["depth"] > 0).all()
    np.testing.assert_allclose(np.linalg.norm(ex["normals"], axis=-1), 1.0, atol=1e-5)
    v, u = np.mgrid[0:R, 0:R] + 0.5
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(ex["camera"]).T
    assert ((ex["normals"] * rays).sum(-1) < 1e-6).all()  # normals face the camera
    assert set(np.unique(ex["edges"])) <= {0, 255} and ex["edges"].any()
    assert ex["semantic"].max() < len(scenes.CLASSES)
    assert max(max(p) for p in scenes.SKELETON) < k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instances_boxes_classes_consistent(seed):
    ex = render_example(seed, R)
    inst, n = ex["instance"], int(ex["num_objects"])
    np.testing.assert_array_equal(np.unique(inst[inst > 0]), np.arange(1, n + 1))
    assert ((inst > 0) == (ex["semantic"] > 0)).all()
    for i in range(n):
        ys, xs = np.nonzero(inst == i + 1)
        box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / R
        np.testing.assert_allclose(ex["boxes"][i], box, atol=1e-7)
        assert (ex["semantic"][ys, xs] == ex["box_classes"][i]).all()
        kp = ex["keypoints"][i]
        if ex["box_classes"][i] != scenes.FIGURE:
            assert not kp.any()
            continue
        vis = kp[:, 2] > 0
        py = np.clip((kp[:, 0] * R).astype(int), 0, R - 1)
        px = np.clip((kp[:, 1] * R).astype(int), 0, R - 1)
        on_fig = vis & (inst[py, px] == i + 1)
        assert on_fig.any()
        y0, x0, y1, x1 = ex["boxes"][i]
        assert ((kp[on_fig, 0] >= y0) & (kp[on_fig, 0] <= y1)).all()
        assert ((kp[on_fig, 1] >= x0) & (kp[on_fig, 1] <= x1)).all()
    # Every instance boundary is marked on at least one side.
    diff = inst[:, 1:] != inst[:, :-1]
    marked = (ex["edges"][:, 1:] > 0) | (ex["edges"][:, :-1] > 0)
    assert marked[diff].all()


def _bilinear(img: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)
    y0, x0 = np.minimum(np.floor(y).astype(int), h - 2), np.minimum(np.floor(x).astype(int), w - 2)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    return (img[y0, x0] * (1 - wy) * (1 - wx) + img[y0, x0 + 1] * (1 - wy) * wx
            + img[y0 + 1, x0] * wy * (1 - wx) + img[y0 + 1, x0 + 1] * wy * wx)  # fmt: skip


@pytest.mark.parametrize("seed", [1, 4])
def test_clip_flow_warps_next_frame_onto_current(seed):
    clip = render_clip(seed, 48, 5)
    assert clip["frames"].shape == (5, 48, 48, 3) and clip["flow"].shape == (5, 48, 48, 2)
    assert not clip["flow"][-1].any() and np.abs(clip["flow"][:-1]).max() > 0.5
    i, j = np.mgrid[0:48, 0:48].astype(float)
    for t in range(4):
        y, x = i + clip["flow"][t, ..., 0], j + clip["flow"][t, ..., 1]
        inside = (y >= 0) & (y <= 47) & (x >= 0) & (x <= 47)
        yi, xi = np.clip(np.round(y).astype(int), 0, 47), np.clip(np.round(x).astype(int), 0, 47)
        seen = inside & (clip["instance"][t + 1][yi, xi] == clip["instance"][t])
        assert seen.mean() > 0.8  # instances agree after warping, except at occlusions
        f0 = clip["frames"][t].astype(float)
        warped = _bilinear(clip["frames"][t + 1].astype(float), y, x)
        err = np.abs(warped - f0).mean(-1)[seen]
        assert np.median(err) <= 2.0 and (err < 12).mean() > 0.8


def test_clip_flow_is_exact_for_rigid_motion():
    """Flow of the static room (camera motion only) and of rigid objects, recomputed here from
    depth, intrinsics and the scene's poses."""
    seed, res = 5, 40
    clip = render_clip(seed, res, 5)
    spec = scenes.sample_scene(np.random.default_rng([seed, render._CLIP]), clip=True)
    kinv = np.linalg.inv(clip["camera"].astype(np.float64))
    v, u = np.mgrid[0:res, 0:res] + 0.5
    pix = np.stack([u, v, np.ones_like(u)], -1)
    checked = 0
    for t in range(4):
        _, cam0 = scenes.build(spec, t, res)
        _, cam1 = scenes.build(spec, t + 1, res)
        pc = (pix @ kinv.T) * clip["depth"][t][..., None].astype(np.float64)
        world = cam0.position + pc @ cam0.rotation.T
        inst = clip["instance"][t]
        for oid in np.unique(inst):
            m = inst == oid
            if oid > 0:
                obj = spec.objects[oid - 1]
                if obj.cls == scenes.FIGURE:
                    continue  # articulated: exercised by the warping test
                r0, r1 = (scenes.rot_y(obj.yaw + obj.yaw_rate * k) for k in (t, t + 1))
                local = (world[m] - (obj.pos + obj.vel * t)) @ r0
                moved = obj.pos + obj.vel * (t + 1) + local @ r1.T
            else:
                moved = world[m]
            rows, cols, _ = cam1.project(moved)
            expect = np.stack([rows - v[m], cols - u[m]], -1)
            # depth is stored as float32: allow its rounding, amplified by the projection
            np.testing.assert_allclose(clip["flow"][t][m], expect, atol=2e-3)
            checked += m.sum()
    assert checked > 0.5 * 4 * res * res


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="frames=6"):
        render_clip(0, R, 6)
    with pytest.raises(ValueError, match="resolution=8"):
        render_example(0, 8)


# --------------------------------------------------------------------------- TFDS + CLI


def test_builder_roundtrip_matches_pure_render(tmp_path):
    from lavin_jax.data import prepare
    from lavin_jax.data.sources.synthetic_scenes import SPLIT_SEEDS

    with pytest.raises(FileNotFoundError) as err:
        prepare.load_source("synthetic_scenes", tmp_path, "train", "32_n3")
    msg = str(err.value)
    assert "\n" not in msg
    cmd = "python -m lavin_jax.data.prepare --dataset synthetic_scenes --config 32_n3 --data_dir"
    assert f"{cmd} {tmp_path}" in msg

    prepare.prepare("synthetic_scenes", tmp_path, "32_n3", workers=1)
    src = prepare.load_source("synthetic_scenes", tmp_path, "validation", "32_n3")
    assert len(src) == 3
    ex, ref = src[2], render_example(SPLIT_SEEDS["validation"] + 2, R)
    assert int(ex["seed"]) == SPLIT_SEEDS["validation"] + 2
    for k in ref:
        np.testing.assert_array_equal(ex[k], ref[k], err_msg=k)

    prepare.prepare("synthetic_scenes/clips5_32", tmp_path, num_examples=2, workers=1)
    clips = prepare.load_source("synthetic_scenes", tmp_path, "train", "clips5_32_n2")
    ex, ref = clips[1], render_clip(SPLIT_SEEDS["train"] + 1, R, 5)
    for k in ref:
        np.testing.assert_array_equal(ex[k], ref[k], err_msg=k)


def test_cli_and_ensure_prepared(tmp_path, caplog, capsys):
    from lavin_jax.data import prepare

    args = ["--dataset", "synthetic_scenes", "--data_dir", str(tmp_path), "--resolution", "24",
            "--num_examples", "2", "--workers", "1", "--split", "test"]  # fmt: skip
    assert prepare.main(args) == 0
    assert "synthetic_scenes/24_n2 test: 2 examples" in capsys.readouterr().out
    assert prepare.main(["--dataset", "nope", "--data_dir", str(tmp_path)]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert prepare.main(["--dataset", "synthetic_scenes", "--config", "big",
                         "--data_dir", str(tmp_path)]) == 2  # fmt: skip

    with caplog.at_level(logging.INFO):
        b = prepare.ensure_prepared("synthetic_scenes", tmp_path, "16_n1", workers=1)
    assert "preparing it now (first use)" in caplog.text and b.is_prepared()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        prepare.ensure_prepared("synthetic_scenes", tmp_path, "16_n1")
    assert "preparing" not in caplog.text


def test_registered_configs():
    from lavin_jax.data.sources.synthetic_scenes import SyntheticScenes

    names = {c.name for c in SyntheticScenes.BUILDER_CONFIGS}
    assert {"64", "128", "256", "512", "clips5_64", "clips9_64"} <= names
    assert SyntheticScenes.make_config("64") is SyntheticScenes.builder_configs["64"]
    cfg = SyntheticScenes.make_config("clips5_128", num_examples=7)
    assert (cfg.name, cfg.kind, cfg.frames, cfg.resolution) == ("clips5_128_n7", "clip", 5, 128)
    assert dict(cfg.splits) == {"train": 7, "validation": 7, "test": 7}


@pytest.mark.slow
def test_large_resolutions_render():
    ex = render_example(11, 512)
    assert ex["image"].shape == (512, 512, 3) and np.isfinite(ex["depth"]).all()
    clip = render_clip(11, 128, 9)
    assert clip["frames"].shape == (9, 128, 128, 3) and np.isfinite(clip["flow"]).all()
