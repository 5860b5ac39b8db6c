"""Task renderers: every task renders hand-made examples, and decode(render) recovers the truth."""

import numpy as np
import pytest

from lavin_jax.data.tasks import all_tasks, get_task
from lavin_jax.data.tasks.depth import relative_error_bound
from lavin_jax.data.tasks.normals import ANGLE_BOUND_DEG
from lavin_jax.data.tasks.pose import COCO_SKELETON, KEYPOINT_TOL_PX
from lavin_jax.data.tasks.video import FLOW_EPE_BOUND

ALL = (
    "depth", "normals", "panoptic", "foreground", "detection", "single_detection", "pose",
    "edges", "colorization", "inpainting", "deraining", "motion_deblur", "gaussian_deblur",
    "denoising", "low_light", "depth_to_image", "normal_to_image", "pose_to_image",
    "frame_prediction", "video_depth", "video_normals", "optical_flow", "video_segmentation",
    "depth_to_video", "normal_to_video",
)
VIDEO = {"frame_prediction", "video_depth", "video_normals", "optical_flow",
         "video_segmentation", "depth_to_video", "normal_to_video"}

# A stick figure (y, x) in [0, 1], COCO keypoint order.
FIGURE = np.array([
    [0.15, 0.50], [0.12, 0.46], [0.12, 0.54], [0.14, 0.40], [0.14, 0.60], [0.30, 0.36],
    [0.30, 0.64], [0.45, 0.28], [0.45, 0.72], [0.58, 0.24], [0.58, 0.76], [0.58, 0.42],
    [0.58, 0.58], [0.74, 0.40], [0.74, 0.60], [0.92, 0.38], [0.92, 0.62],
])


def unit_normals(rng, shape):
    n = rng.normal(size=(*shape, 3))
    return (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)


def image_example(h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    image = np.stack([yy * 255, xx * 255, rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
    depth = (0.5 + 7.5 * yy + xx).astype(np.float32)
    valid = np.ones((h, w), np.uint8)
    valid[:3, :3] = 0
    semantic = np.zeros((h, w), np.uint8)
    instance = np.zeros((h, w), np.int32)
    semantic[int(0.8 * h):] = 1  # a "stuff" band
    rects = [(0.1, 0.1, 0.4, 0.45, 3), (0.2, 0.3, 0.6, 0.7, 3), (0.5, 0.55, 0.95, 0.95, 5)]
    boxes, classes = [], []
    for i, (y0, x0, y1, x1, c) in enumerate(rects, 1):
        r0, c0, r1, c1 = round(y0 * h), round(x0 * w), round(y1 * h), round(x1 * w)
        semantic[r0:r1, c0:c1], instance[r0:r1, c0:c1] = c, i
        boxes.append([r0 / h, c0 / w, r1 / h, c1 / w])
        classes.append(c)
    edges = np.zeros((h, w), np.uint8)
    edges[:, 1:][instance[:, 1:] != instance[:, :-1]] = 255
    edges[1:][instance[1:] != instance[:-1]] = 255
    kp = np.concatenate([FIGURE, np.full((17, 1), 2.0)], 1)[None].astype(np.float32)
    return {"image": image, "depth": depth, "valid": valid, "normals": unit_normals(rng, (h, w)),
            "semantic": semantic, "instance": instance, "boxes": np.array(boxes, np.float32),
            "box_classes": np.array(classes, np.int32), "keypoints": kp, "edges": edges}


def clip_example(t=10, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    ex = image_example(h, w, seed)
    frames = np.stack([np.roll(ex["image"], s, axis=1) for s in range(t)])
    inst = np.stack([np.roll(ex["instance"], s, axis=1) for s in range(t)])
    sem = np.stack([np.roll(ex["semantic"], s, axis=1) for s in range(t)])
    depth = np.stack([ex["depth"] * (1 + 0.05 * s) for s in range(t)]).astype(np.float32)
    flow = rng.normal(0, 2.0, (t, h, w, 2)).astype(np.float32)
    return {"frames": frames, "depth": depth, "normals": unit_normals(rng, (t, h, w)),
            "instance": inst, "semantic": sem, "flow": flow}


def example_for(task):
    return clip_example() if task.is_video else image_example()


def shapes(x):
    if isinstance(x, dict):
        return {k: np.shape(v)[1:] for k, v in x.items()}  # counts may differ
    return np.shape(x)


def test_registry_lists_every_task_of_the_reference():
    assert set(all_tasks()) == set(ALL)
    assert {n for n in ALL if get_task(n).is_video} == VIDEO
    for n in ALL:
        t = get_task(n)
        assert t.main_metric == t.metrics[0] and isinstance(t.higher_is_better, bool)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("segment_anything")
    with pytest.raises(ValueError, match="unknown option"):
        get_task("depth", colormap="jet")


@pytest.mark.parametrize("name", ALL)
def test_render_shapes_determinism_decode_and_baseline(name):
    task = get_task(name)
    ex = example_for(task)
    inputs, targets = task.render(ex, np.random.default_rng(3))
    tin, tout = task.frames
    assert inputs.dtype == np.uint8 and inputs.shape == (tin, 32, 32, 3)
    assert targets.dtype == np.uint8 and targets.shape == (tout, 32, 32, 3)
    again = task.render(ex, np.random.default_rng(3))
    np.testing.assert_array_equal(again[0], inputs)
    np.testing.assert_array_equal(again[1], targets)
    choice = task.choose(ex, np.random.default_rng(3))
    truth = task.truth(ex, choice)
    decoded = task.decode(targets, task.context(ex, choice))
    baseline = task.baseline(ex, choice)
    if isinstance(truth, dict):  # predictions may carry more fields (scores)
        decoded = {k: decoded[k] for k in truth}
        baseline = {k: baseline[k] for k in truth}
    assert shapes(decoded) == shapes(truth)
    if name == "pose":  # [people, K, 3]: the baseline finds nobody
        assert baseline.shape[1:] == truth.shape[1:]
    else:
        assert shapes(baseline) == shapes(truth)
    # float predictions in [0, 1] decode like the uint8 ones
    as_float = task.decode(targets / np.float32(255), task.context(ex, choice))
    if not isinstance(decoded, dict):
        np.testing.assert_allclose(np.asarray(as_float, np.float64),
                                   np.asarray(decoded, np.float64), atol=1e-4)


@pytest.mark.parametrize("name", ["depth", "video_depth"])
def test_depth_round_trip_within_quantisation_bound(name):
    task = get_task(name)
    ex = example_for(task)
    choice = task.choose(ex, np.random.default_rng(0))
    _, targets = task.draw(ex, choice)
    ctx = task.context(ex, choice)
    truth, pred = task.truth(ex, choice), task.decode(targets, ctx)
    ok = np.isfinite(truth)
    rel = np.abs(pred[ok] / truth[ok] - 1).max()
    near, far = ctx["depth_range"]
    assert rel <= relative_error_bound(near, far) + 1e-6
    assert rel < 0.01
    gray = targets[..., 0].astype(int).reshape(truth.shape)
    assert gray[ok].max() == 255 and gray[ok].min() == 0  # near = white, far = black
    assert (gray[~ok] == 0).all()
    if name == "depth":  # the raw example works as the context of an image task
        np.testing.assert_allclose(task.decode(targets, ex), pred)
        rel_only = task.decode(targets)  # relative: monotone in the true depth
        assert np.corrcoef(np.log(rel_only[ok]), np.log(truth[ok]))[0, 1] > 0.999


def test_normals_round_trip_angle():
    task = get_task("normals")
    ex = image_example(64, 64, seed=5)
    _, targets = task.render(ex, np.random.default_rng(0))
    n = task.decode(targets)
    cos = np.clip((n * ex["normals"]).sum(-1), -1, 1)
    assert np.degrees(np.arccos(cos)).max() < ANGLE_BOUND_DEG
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1, atol=1e-5)


def same_partition(a, b):
    """True iff the id maps are equal up to a relabelling (0 must map to 0)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0)
    return (len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))
            and ((pairs[:, 0] == 0) == (pairs[:, 1] == 0)).all())


@pytest.mark.parametrize("noise", [0.0, 6.0])
def test_panoptic_decodes_segments_exactly(noise):
    task = get_task("panoptic")
    ex = image_example(48, 48)
    choice = task.choose(ex, np.random.default_rng(1))
    _, targets = task.draw(ex, choice)
    truth = task.truth(ex, choice)
    assert truth.max() == 4  # the stuff band + 3 instances
    noisy = np.clip(targets + np.random.default_rng(0).normal(0, noise, targets.shape), 0, 255)
    assert same_partition(task.decode(noisy.astype(np.uint8)), truth)


def test_video_segmentation_ids_consistent_over_time():
    task = get_task("video_segmentation")
    ex = clip_example()
    choice = task.choose(ex, np.random.default_rng(0))
    _, targets = task.draw(ex, choice)
    dec, truth = task.decode(targets), task.truth(ex, choice)
    assert dec.shape == (5, 32, 32) and same_partition(dec, truth)


def test_foreground_mask_exact_and_choosable():
    task = get_task("foreground")
    ex = image_example()
    _, targets = task.draw(ex, {"cls": 5})
    mask = task.decode(targets)
    np.testing.assert_array_equal(mask, ex["semantic"] == 5)
    np.testing.assert_array_equal(task.truth(ex, {"cls": 5}), mask)
    inst = get_task("foreground", mode="instance")
    choice = inst.choose(ex, np.random.default_rng(0))
    np.testing.assert_array_equal(inst.decode(inst.draw(ex, choice)[1]),
                                  ex["instance"] == choice["inst"])


@pytest.mark.parametrize("size,thickness", [(32, None), (64, 2), (256, None)])
def test_detection_boxes_and_classes_decode_exactly(size, thickness):
    task = get_task("detection", thickness=thickness)
    ex = image_example(size, size)
    _, targets = task.render(ex, np.random.default_rng(0))
    dec, truth = task.decode(targets), task.truth(ex)
    assert len(dec["boxes"]) == len(truth["boxes"]) == 3
    for box, cls in zip(truth["boxes"], truth["classes"]):
        err = np.abs(dec["boxes"] - box).max(1)
        i = int(err.argmin())
        assert err[i] <= 0.5 / size + 1e-6 and dec["classes"][i] == cls


def test_single_detection_box_exact():
    task = get_task("single_detection")
    ex = image_example(64, 64)
    for i in range(3):
        _, targets = task.draw(ex, {"box": i})
        np.testing.assert_allclose(task.decode(targets), ex["boxes"][i], atol=0.5 / 64 + 1e-6)
    largest = get_task("single_detection", pick="largest")
    assert largest.choose(ex, np.random.default_rng(0)) == {"box": 2}  # 0.45 x 0.4


def match_people(dec, truth, h):
    """Max keypoint error in px over visible truth joints, people matched greedily."""
    worst = 0.0
    for person in truth:
        vis = person[:, 2] > 0
        errs = [np.abs(d[vis, :2] - person[vis, :2]).max() * h for d in dec if d[vis, 2].all()]
        assert errs, "a person was not decoded"
        worst = max(worst, min(errs))
    return worst


@pytest.mark.parametrize("size,case", [(32, "one"), (64, "two"), (128, "crossed"), (512, "one")])
def test_pose_keypoints_from_stick_ends(size, case):
    task = get_task("pose")
    ex = image_example(size, size)
    if case == "two":  # two people side by side, one missing its left leg
        a, b = ex["keypoints"][0].copy(), ex["keypoints"][0].copy()
        a[:, 1], b[:, 1] = a[:, 1] * 0.5, 0.5 + b[:, 1] * 0.5
        b[[13, 15], 2] = 0
        ex["keypoints"] = np.stack([a, b])
    if case == "crossed":  # the left forearm (drawn late) cuts both sides of the torso
        ex["keypoints"][0, 9, :2] = (0.52, 0.68)
    _, targets = task.render(ex, np.random.default_rng(0))
    dec = task.decode(targets, task.context(ex))
    assert len(dec) == len(ex["keypoints"])
    assert match_people(dec, ex["keypoints"], size) <= KEYPOINT_TOL_PX
    assert len(COCO_SKELETON) == 19


def test_edges_exact():
    task = get_task("edges")
    ex = image_example()
    _, targets = task.render(ex, np.random.default_rng(0))
    np.testing.assert_array_equal(task.decode(targets) > 0.5, ex["edges"] > 0)


RESTORATION = ("colorization", "inpainting", "deraining", "motion_deblur", "gaussian_deblur",
               "denoising", "low_light")


@pytest.mark.parametrize("name", RESTORATION)
def test_restoration_degrades_input_and_target_is_clean(name):
    task = get_task(name)
    ex = image_example(64, 64)
    inputs, targets = task.render(ex, np.random.default_rng(0))
    np.testing.assert_array_equal(targets[0], ex["image"])
    np.testing.assert_allclose(task.decode(targets), ex["image"] / 255.0, atol=1e-6)
    diff = np.abs(inputs[0].astype(int) - ex["image"]).mean()
    assert diff > 1.0, f"{name}: input barely degraded ({diff})"
    np.testing.assert_allclose(task.baseline(ex, task.choose(ex, np.random.default_rng(0))),
                               inputs[0] / 255.0, atol=1e-6)


def test_restoration_specifics():
    ex = image_example(64, 64)
    gray = get_task("colorization").render(ex, np.random.default_rng(0))[0][0]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    task = get_task("inpainting")
    choice = task.choose(ex, np.random.default_rng(0))
    r, c, s = choice["square"]
    assert 12 <= s <= 20
    inp = task.draw(ex, choice)[0][0]
    assert (inp[r:r + s, c:c + s] == 128).all()
    low = get_task("low_light").render(ex, np.random.default_rng(0))[0]
    assert low.mean() < 0.5 * ex["image"].mean()


@pytest.mark.parametrize("name,base", [("depth_to_image", "depth"), ("normal_to_image", "normals"),
                                       ("pose_to_image", "pose"), ("depth_to_video", "video_depth"),
                                       ("normal_to_video", "video_normals")])
def test_generation_swaps_base_task(name, base):
    task, btask = get_task(name), get_task(base)
    ex = example_for(task)
    choice = task.choose(ex, np.random.default_rng(2))
    inputs, targets = task.draw(ex, choice)
    b_in, b_tgt = btask.draw(ex, choice)
    np.testing.assert_array_equal(inputs, b_tgt)
    np.testing.assert_array_equal(targets, b_in)
    assert task.frames == btask.frames[::-1] and task.requires == btask.requires
    np.testing.assert_allclose(task.decode(targets), task.truth(ex, choice), atol=1e-6)


def test_video_normals_and_frame_prediction():
    ex = clip_example()
    task = get_task("video_normals")
    choice = task.choose(ex, np.random.default_rng(4))
    _, targets = task.draw(ex, choice)
    truth = task.truth(ex, choice)
    s = choice["start"]
    np.testing.assert_array_equal(truth, ex["normals"][s:s + 5])
    cos = np.clip((task.decode(targets) * truth).sum(-1), -1, 1)
    assert np.degrees(np.arccos(cos)).max() < ANGLE_BOUND_DEG
    fp = get_task("frame_prediction", num_in=3, num_out=4)
    choice = fp.choose(ex, np.random.default_rng(0))
    inputs, targets = fp.draw(ex, choice)
    s = choice["start"]
    np.testing.assert_array_equal(inputs, ex["frames"][s:s + 3])
    np.testing.assert_array_equal(targets, ex["frames"][s + 3:s + 7])
    base = fp.baseline(ex, choice)
    assert base.shape == (4, 32, 32, 3) and (base == inputs[-1] / np.float32(255)).all()


def test_optical_flow_round_trip_epe():
    task = get_task("optical_flow")
    ex = clip_example(h=48, w=48)
    choice = task.choose(ex, np.random.default_rng(0))
    _, targets = task.draw(ex, choice)
    ctx = task.context(ex, choice)
    truth, dec = task.truth(ex, choice), task.decode(targets, ctx)
    epe = np.linalg.norm(dec - truth, axis=-1)
    assert epe.max() <= FLOW_EPE_BOUND * ctx["max_mag"]
    # direction convention: rightward motion is red, downward is hue 1/4 (chartreuse)
    from lavin_jax.data.tasks.video import encode_flow
    right, down = encode_flow(np.array([[0.0, 1.0], [1.0, 0.0]]), 1.0)
    assert tuple(right) == (255, 0, 0) and tuple(down) == (128, 255, 0)


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="needs example key"):
        get_task("depth").render({"image": np.zeros((8, 8, 3), np.uint8)},
                                 np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs clips of >= 9 frames"):
        get_task("frame_prediction").render(clip_example(t=6), np.random.default_rng(0))
    with pytest.raises(ValueError, match="prediction must be"):
        get_task("edges").decode(np.zeros((8, 8), np.uint8))


def test_decoders_tolerate_mild_blur_and_noise():
    """Model outputs are not clean: blur (sigma 0.7 px) + noise (sigma 6) at 128 px."""
    from scipy import ndimage

    rng = np.random.default_rng(0)

    def degrade(x):
        y = ndimage.gaussian_filter(x.astype(float), (0, 0.7, 0.7, 0))
        return np.clip(y + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8)

    ex = image_example(128, 128, seed=1)
    det = get_task("detection", fill=0.8)
    dec = det.decode(degrade(det.render(ex, rng)[1]))
    assert len(dec["boxes"]) == 3
    for box, cls in zip(ex["boxes"], ex["box_classes"]):
        err = np.abs(dec["boxes"] - box).max(1) * 128
        assert err.min() <= 1.0 and dec["classes"][err.argmin()] == cls
    pose = get_task("pose")
    people = pose.decode(degrade(pose.render(ex, rng)[1]), pose.context(ex))
    assert len(people) == 1 and people[0, :, 2].all()
    body = slice(5, 17)  # shoulders to ankles; the face's sticks are only a few px long
    assert np.abs(people[0, body, :2] - ex["keypoints"][0, body, :2]).max() * 128 <= 3.0
    fg = get_task("foreground")
    mask = fg.decode(degrade(fg.draw(ex, {"cls": 3})[1]))
    assert (mask == (ex["semantic"] == 3)).mean() > 0.99


def test_tiny_panoptic_segment_survives_clean_round_trip():
    task = get_task("panoptic")
    ex = image_example()
    ex["semantic"][0, 31], ex["instance"][0, 31] = 7, 9  # a one-pixel segment
    choice = task.choose(ex, np.random.default_rng(0))
    truth = task.truth(ex, choice)
    assert same_partition(task.decode(task.draw(ex, choice)[1]), truth) and truth.max() == 5


def test_every_task_on_the_synthetic_source():
    """The real schema producer (when present): 14-keypoint skeleton, variable box counts."""
    render = pytest.importorskip("lavin_jax.data.render")
    image, clip = render.render_example(0, 64), render.render_clip(0, 32, 9)
    for name in ALL:
        task = get_task(name)
        ex = clip if task.is_video else image
        choice = task.choose(ex, np.random.default_rng(0))
        inputs, targets = task.draw(ex, choice)
        h = 32 if task.is_video else 64
        assert inputs.shape == (task.frames[0], h, h, 3) and inputs.dtype == np.uint8, name
        assert targets.shape == (task.frames[1], h, h, 3) and targets.dtype == np.uint8, name
        task.decode(targets, task.context(ex, choice))
    seg = get_task("video_segmentation")
    choice = seg.choose(clip, np.random.default_rng(0))
    assert same_partition(seg.decode(seg.draw(clip, choice)[1]), seg.truth(clip, choice))
    det = get_task("detection")
    dec, truth = det.decode(det.draw(image, {})[1]), det.truth(image)
    for box in dec["boxes"]:  # nothing spurious (a box abutting others may be missed)
        assert np.abs(truth["boxes"] - box).max(1).min() <= 0.5 / 64 + 1e-6
    assert len(dec["boxes"]) >= len(truth["boxes"]) / 2
