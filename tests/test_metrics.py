"""Metrics: hand-computed values per family, registry consistency with the tasks, perfect scores
of decoded clean targets, merging across shards, perceptual metrics only with given weights."""

import math

import numpy as np
import pytest

from lavin_jax import metrics
from lavin_jax.data.render import render_clip, render_example
from lavin_jax.data.tasks import all_tasks, get_task
from lavin_jax.data.tasks.depth import relative_error_bound
from lavin_jax.metrics import Accumulator, compute, detection, image, masks


# ---- registry --------------------------------------------------------------------------------
def test_every_task_metric_has_a_family_and_matching_direction():
    for name in all_tasks():
        t = get_task(name)
        for m in t.metrics:
            assert m in metrics.family_of(m).names
        assert metrics.higher_is_better(t.main_metric) == t.higher_is_better, name


def test_unknown_option_and_metric_are_clear_errors():
    with pytest.raises(ValueError, match="unknown metric option.*depth_align"):
        Accumulator("normals", depth_align="scale")
    with pytest.raises(KeyError, match="no metric named 'bogus'"):
        metrics.family_of("bogus")
    assert metrics.options_of(("abs_rel",)) == {"depth_align": "none"}


# ---- dense -----------------------------------------------------------------------------------
def test_depth_hand_computed():
    pred = np.array([[1.0, 2.0, 5.0], [3.0, 4.0, 9.0]])
    truth = np.array([[1.0, 1.0, np.nan], [3.0, 8.0, 0.0]])  # NaN / 0 = invalid
    r = compute("depth", pred, truth)
    assert r["abs_rel"] == pytest.approx((0 + 1 + 0 + 0.5) / 4)
    assert r["delta1"] == pytest.approx(0.5)  # ratios 1, 2, 1, 2
    assert r["rmse"] == pytest.approx(math.sqrt((0 + 1 + 0 + 16) / 4))
    # per-image mean over two images (the second is perfect)
    acc = Accumulator("depth")
    acc.add(pred, truth)
    acc.add(truth, truth)
    assert acc.result()["abs_rel"] == pytest.approx(0.375 / 2)


@pytest.mark.parametrize("align,pred", [("scale", lambda t: 2 * t),
                                        ("scale_shift", lambda t: 0.5 * t + 3)])
def test_depth_alignment_recovers_affine_predictions(align, pred):
    t = np.random.default_rng(0).uniform(1, 5, (8, 8))
    r = compute("depth", pred(t), t, depth_align=align)
    assert r["abs_rel"] == pytest.approx(0, abs=1e-9) and r["delta1"] == 1.0
    assert compute("depth", pred(t), t)["abs_rel"] > 0.1  # no alignment by default


def test_normals_hand_computed():
    deg = np.array([0.0, 10.0, 20.0, 40.0, 0.0])
    rad = np.radians(deg)
    pred = np.stack([np.sin(rad), np.zeros(5), np.cos(rad)], -1) * 3.0  # not unit: renormalised
    truth = np.tile([0.0, 0.0, 1.0], (5, 1))
    truth[4] = np.nan  # invalid pixel, ignored
    r = compute("normals", pred, truth)
    assert r["mean_angle"] == pytest.approx(17.5, abs=1e-6)
    assert r["within_11_25"] == 0.5 and r["within_22_5"] == 0.75 and r["within_30"] == 0.75
    # pooled median of 0, 10, 20 (0.01-degree histogram)
    r3 = compute("normals", pred[:3], truth[:3])
    assert r3["median_angle"] == pytest.approx(10.0, abs=0.01)


def test_normals_median_is_pooled_over_images():
    truth = np.tile([0.0, 0.0, 1.0], (3, 1))
    mk = lambda d: np.stack([np.sin(np.radians(d)), 0 * d, np.cos(np.radians(d))], -1)
    acc = Accumulator("normals")
    acc.add(mk(np.array([1.0, 2.0, 3.0])), truth)
    acc.add(mk(np.array([50.0, 60.0, 70.0])), truth)
    # six angles 1, 2, 3, 50, 60, 70: the pooled median lies between 3 and 50, not at the
    # mean of per-image medians (31)
    assert 3.0 <= acc.result()["median_angle"] <= 3.02


def test_flow_epe_hand_computed():
    truth = np.array([[[3.0, 4.0], [1.0, 1.0]]])
    pred = np.array([[[0.0, 0.0], [1.0, 1.0]]])
    assert compute("optical_flow", pred, truth)["epe"] == pytest.approx(2.5)


# ---- masks / segments / edges ------------------------------------------------------------------
def test_foreground_miou_per_example_and_by_class():
    a_p, a_t = np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool)
    empty = np.zeros(4, bool)
    acc = Accumulator("foreground")
    acc.add(a_p, a_t)
    acc.add(empty, empty)  # both empty: IoU 1
    assert acc.result()["miou"] == pytest.approx(0.75)
    acc = Accumulator("foreground")
    acc.add(a_p, a_t, {"cls": 1})  # I 1, U 2
    acc.add(np.array([1, 1, 0, 0], bool), np.array([1, 1, 0, 0], bool), {"cls": 1})  # I 2, U 2
    acc.add(a_t, ~a_t, {"cls": 2})  # I 0, U 4
    assert acc.result()["miou"] == pytest.approx((3 / 4 + 0) / 2)


def test_box_iou_hand_computed():
    r = compute("single_detection", np.array([0, 0, 0.5, 0.5]), np.array([0, 0, 0.5, 1.0]))
    assert r["box_miou"] == pytest.approx(0.5)
    assert masks.box_iou(np.zeros(4), np.zeros(4))[0, 0] == 1.0  # identical degenerate boxes


def test_panoptic_quality_hand_computed():
    truth = np.array([[1, 1, 2, 2], [0, 0, 0, 0]])
    pred = np.array([[5, 5, 5, 0], [0, 0, 0, 7]])  # 5 ~ 1 (IoU 2/3), 7 is a false positive
    r = compute("panoptic", pred, truth)
    # TP 1 (IoU 2/3), FP 1 (segment 7), FN 1 (segment 2: IoU 1/4 with 5)
    assert r["pq"] == pytest.approx((2 / 3) / 2) and r["sq"] == pytest.approx(2 / 3)
    assert r["rq"] == pytest.approx(0.5)


def test_video_segmentation_j_and_f():
    truth = np.zeros((2, 8, 8), int)
    truth[0, 2:6, 2:6] = 4  # object 4 in frame 0 only
    perfect = np.where(truth == 4, 9, 0)  # other id: matched by assignment
    r = compute("video_segmentation", perfect, truth)
    assert r == {"j_and_f": 1.0, "j": 1.0, "f": 1.0}
    r = compute("video_segmentation", np.zeros_like(truth), truth)
    assert r["j"] == pytest.approx(0.5) and r["f"] == pytest.approx(0.5)  # frame 1: both empty


def _line(col, value=1.0, n=32):
    m = np.zeros((n, n))
    m[4:24, col] = value
    return m


def test_edges_hand_computed():
    truth = _line(10) > 0
    assert compute("edges", _line(10), truth) == {"ods_f": 1.0, "ois_f": 1.0}
    assert compute("edges", _line(11), truth)["ods_f"] == 1.0  # within the 1.5 px tolerance
    assert compute("edges", _line(14), truth)["ods_f"] == 0.0
    half = _line(10)
    half[14:24] = 0
    # P 1; R 11/20 (true rows 4..14: row 14 is 1 px from the predicted end at row 13)
    assert compute("edges", half, truth)["ods_f"] == pytest.approx(2 * 0.55 / 1.55)
    assert compute("edges", np.zeros((32, 32)), truth)["ods_f"] == 0.0


def test_edges_ods_vs_ois_over_two_images():
    # image A: a true edge at 0.85; image B: its true edge at 0.25 and a false one at 0.65
    acc = Accumulator("edges")
    acc.add(_line(10, 0.85), _line(10) > 0)
    acc.add(_line(10, 0.25) + _line(25, 0.65), _line(10) > 0)
    r = acc.result()
    # one threshold <= 0.25 for both: matched pred 40 / 60, recall 40 / 40 -> F = 0.8
    assert r["ods_f"] == pytest.approx(0.8)
    # per-image best: A F 1 (20/20), B F 2/3 at <= 0.25 -> summed counts give F = 0.8
    assert r["ois_f"] == pytest.approx(0.8)


def test_edge_nms_thins_a_blurred_line_and_keeps_clean_maps():
    clean = _line(10)
    np.testing.assert_array_equal(masks.edge_nms(clean), clean)
    blurred = _line(9, 0.5) + _line(10, 1.0) + _line(11, 0.5)
    thin = masks.edge_nms(blurred)
    assert (thin[6:22, 10] == 1.0).all() and (thin[6:22, 9] == 0).all()
    assert (thin[6:22, 11] == 0).all()


# ---- detection / pose ------------------------------------------------------------------------
def test_detection_ap_hand_computed():
    truth = {"boxes": np.array([[0, 0, .2, .2], [.5, .5, .8, .8]]), "classes": np.array([1, 1])}
    pred = {"boxes": np.array([[0, 0, .2, .2], [.3, 0, .4, .1], [.5, .5, .8, .8]]),
            "classes": np.array([1, 1, 1]), "scores": np.array([.9, .8, .7])}
    r = compute("detection", pred, truth)
    # PR points (R .5, P 1), (.5, .5), (1, 2/3): 51 recall points at P 1, 50 at P 2/3
    ap = (51 * 1 + 50 * 2 / 3) / 101
    assert r["map"] == pytest.approx(ap) and r["ap50"] == pytest.approx(ap)


def test_detection_iou_thresholds_and_classes():
    truth = {"boxes": np.array([[0, 0, 1, 1], [0, 0, .5, .5]]), "classes": np.array([0, 3])}
    pred = {"boxes": np.array([[0, 0, 1, .72]]), "classes": np.array([0]),
            "scores": np.array([1.0])}
    r = compute("detection", pred, truth)
    # class 0: IoU 0.72 matches at thresholds .50 .. .70 (5 of 10); class 3: nothing found
    assert r["map"] == pytest.approx((0.5 + 0) / 2) and r["ap50"] == pytest.approx(0.5)


def test_pose_oks_ap_and_pck_hand_computed():
    truth = np.array([[[.2, .2, 1], [.4, .4, 1], [.9, .9, 0]]])  # 2 visible, box .2 x .2
    exact = truth.copy()
    exact[0, 2] = [0, 0, 0]
    assert compute("pose", exact, truth) == {"oks_ap": 1.0, "pck": 1.0}
    off = exact.copy()
    off[0, 1, 0] += 0.03  # d = .03: exp(-.0009 / (2 * .04 * (2 * .07)^2)) = 0.5633
    oks = (1 + math.exp(-0.0009 / (2 * 0.04 * 0.14 ** 2))) / 2
    assert detection.oks(off[:, :, :], truth, np.full(3, .07), 1e-3)[0, 0] == pytest.approx(oks)
    r = compute("pose", off, truth)
    assert r["oks_ap"] == pytest.approx(0.6)  # OKS 0.78 passes .50 .. .75
    assert r["pck"] == pytest.approx(0.5)  # .03 > 0.1 x .2
    assert compute("pose", np.zeros((0, 3, 3)), truth) == {"oks_ap": 0.0, "pck": 0.0}


# ---- images --------------------------------------------------------------------------------
def test_psnr_ssim_mse_hand_computed():
    t = np.random.default_rng(0).uniform(0.2, 0.8, (24, 24, 3)).astype(np.float32)
    r = compute("denoising", t + 0.1, t)
    assert r["mse"] == pytest.approx(0.01, rel=1e-4) and r["psnr"] == pytest.approx(20, abs=1e-3)
    same = compute("denoising", t, t)
    assert same == {"psnr": image.PSNR_CAP, "ssim": pytest.approx(1.0), "mse": 0.0}
    # uint8 is read as [0, 255]; SSIM agrees with scikit-image's Gaussian SSIM
    from skimage.metrics import structural_similarity
    noisy = np.clip(t + np.random.default_rng(1).normal(0, .1, t.shape), 0, 1).astype(np.float32)
    ref = structural_similarity(noisy, t, channel_axis=-1, data_range=1.0, gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False)
    assert compute("denoising", noisy, t)["ssim"] == pytest.approx(ref, abs=0.03)
    u8 = compute("denoising", np.uint8(t * 255), np.uint8(t * 255))
    assert u8["mse"] == 0.0


def test_video_image_metrics_are_per_frame_means():
    t = np.full((2, 16, 16, 3), 0.5, np.float32)
    p = t.copy()
    p[1] += 0.1  # frame 0 perfect (capped), frame 1 PSNR 20
    r = compute("frame_prediction", p, t)
    assert r["psnr"] == pytest.approx((image.PSNR_CAP + 20) / 2, abs=1e-3)
    assert r["fvd"] is None


def test_perceptual_metrics_skip_without_weights_and_run_with_them():
    acc = Accumulator("colorization")
    assert "lpips" in acc.skipped and "nothing is downloaded" in acc.skipped["lpips"]
    t = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    acc.add(t[0], t[0])
    assert acc.result()["lpips"] is None and acc.result()["mse"] == 0.0
    # a tiny FeatureNet with LPIPS heads (random weights): LPIPS(x, x) = 0 < LPIPS(x, y)
    from lavin_jax.objectives.perceptual import FeatureNet
    rng = np.random.default_rng(0)
    arrays = {"features.0.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
              "features.0.bias": np.zeros(4, np.float32),
              "features.5.weight": rng.normal(size=(6, 4, 3, 3)).astype(np.float32),
              "features.5.bias": np.zeros(6, np.float32),
              "lin0.model.1.weight": np.ones((1, 4, 1, 1), np.float32),
              "lin1.model.1.weight": np.ones((1, 6, 1, 1), np.float32)}
    net = FeatureNet.from_arrays(arrays)
    nets = metrics.Nets(lpips=net, features=image.pooled_features(net))
    assert compute("colorization", t[0], t[0], nets=nets)["lpips"] == pytest.approx(0, abs=1e-6)
    assert compute("colorization", t[0], t[1], nets=nets)["lpips"] > 0


def test_frechet_distance_hand_computed():
    # 1-D embedding = mean pixel value: pred {0, 2} (mean 1, var 2), truth {1, 3} (mean 2, var 2)
    nets = metrics.Nets(features=lambda x: x.mean((1, 2, 3))[:, None])
    acc = Accumulator("inpainting", nets=nets)
    for p, t in ((0.0, 0.25), (0.5, 0.75)):  # pixel values x4 -> embeddings as above / 4
        acc.add(np.full((8, 8, 3), p, np.float32), np.full((8, 8, 3), t, np.float32))
    # (1/4)^2 * (1 + 2 + 2 - 2 * 2) = 1/16
    assert acc.result()["fid"] == pytest.approx(1 / 16, abs=1e-9)
    a = image.gaussian_stats(np.random.default_rng(0).normal(size=(50, 3)))
    assert image.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


# ---- accumulating / merging ------------------------------------------------------------------
def test_merged_shards_equal_one_pass():
    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 3, (6, 6)) for _ in range(4)]
    preds = [np.where(rng.random((6, 6)) < .8, t, 0) for t in truths]
    one, a, b = Accumulator("panoptic"), Accumulator("panoptic"), Accumulator("panoptic")
    for i, (p, t) in enumerate(zip(preds, truths)):
        one.add(p, t)
        (a if i % 2 else b).add(p, t)
    a.merge(b)
    assert a.result() == pytest.approx(one.result()) and a.count == 4


# ---- decoders on clean targets ---------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes():
    return [render_example(s, 64) for s in range(2)], [render_clip(0, 32, 5)]


def _clean(name, examples, **opts):
    task = get_task(name, **opts)
    acc, base = Accumulator(task), Accumulator(task)
    for i, ex in enumerate(examples):
        c = task.choose(ex, np.random.default_rng(i))
        ctx, truth = task.context(ex, c), task.truth(ex, c)
        acc.add(task.decode(task.draw(ex, c)[1], ctx), truth, ctx)
        base.add(task.baseline(ex, c), truth, ctx)
    return acc.result(), base.result()


@pytest.mark.parametrize("name,perfect", [
    ("edges", {"ods_f": 1.0, "ois_f": 1.0}),
    ("foreground", {"miou": 1.0}),
    ("single_detection", {"box_miou": 1.0}),
    ("panoptic", {"pq": 1.0, "sq": 1.0, "rq": 1.0}),
    ("denoising", {"psnr": image.PSNR_CAP, "ssim": 1.0, "mse": 0.0}),
    ("depth_to_image", {"psnr": image.PSNR_CAP}),
])
def test_clean_targets_score_perfectly(scenes, name, perfect):
    got, base = _clean(name, scenes[0])
    for k, v in perfect.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
        assert base[k] != pytest.approx(v), k  # the trivial baseline is not perfect


def test_clean_dense_targets_within_quantisation(scenes):
    got, _ = _clean("depth", scenes[0])
    bound = max(relative_error_bound(*get_task("depth").context(e)["depth_range"])
                for e in scenes[0])
    assert got["abs_rel"] <= bound and got["delta1"] == 1.0
    got, _ = _clean("normals", scenes[0])
    assert got["mean_angle"] < 0.5 and got["within_11_25"] == 1.0
    got, _ = _clean("video_normals", scenes[1])
    assert got["median_angle"] < 0.5
    got, _ = _clean("video_segmentation", scenes[1])
    assert got == {"j_and_f": 1.0, "j": 1.0, "f": 1.0}
    got, _ = _clean("optical_flow", scenes[1])
    assert got["epe"] < 0.01 * float(np.abs(scenes[1][0]["flow"]).max() * 1.5)


def test_clean_detection_and_pose_drawings_score_perfectly():
    img = np.zeros((128, 128, 3), np.uint8)
    ex = {"image": img, "boxes": np.array([[.1, .1, .4, .4], [.5, .55, .9, .95]]),
          "box_classes": np.array([1, 3])}
    assert _clean("detection", [ex])[0] == {"map": 1.0, "ap50": 1.0}
    kp = np.array([[.15, .5], [.25, .5], [.27, .4], [.4, .35], [.5, .3], [.27, .6], [.4, .65],
                   [.5, .7], [.55, .45], [.7, .43], [.85, .42], [.55, .55], [.7, .57],
                   [.85, .58]])
    ex = {"image": img, "keypoints": np.concatenate([kp, np.ones((14, 1))], 1)[None]}
    assert _clean("pose", [ex])[0] == {"oks_ap": 1.0, "pck": 1.0}
