"""Evaluation: the query's truth lines up with the rendered episode, oracle predictions score
perfectly, the end-to-end run (tiny models, 8 fake devices) writes schema-valid reports."""

import json
import math

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import TINY, tiny_eval_config

from configs.lavin_dit import get_config
from lavin_jax import evaluate, metrics
from lavin_jax.data import episodes
from lavin_jax.data.render import render_clip, render_example
from lavin_jax.metrics import image, report
from lavin_jax.models.jdit import JDiT, JDiTConfig
from lavin_jax.models.stvae import STVAE, STVAEConfig

RES = 32


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_eval_config(RES)
    sources = {"mem_images": [render_example(s, RES) for s in range(6)],
               "mem_clips": [render_clip(s, RES, 9) for s in range(3)]}
    return cfg, sources


def _settings(cfg, **over):
    base = dict(num_examples=3, num_pairs=2, batch_size=2, num_steps=3, grid="uniform")
    return evaluate.eval_settings(cfg, {**base, **over})


def test_settings_precedence(setup):
    cfg, _ = setup
    s = evaluate.eval_settings(cfg, {"num_pairs": 3})
    assert s["num_pairs"] == 3 and s["num_examples"] == 64 and s["resolution"] == [RES, RES]
    assert s["cfg_scale"] == cfg.sample.cfg_scale and s["num_steps"] == cfg.sample.num_steps
    cfg2 = ml_collections.ConfigDict(cfg.to_dict())
    cfg2.eval = {"num_examples": 7, "cfg_scale": 2.0, "tasks": ["depth"]}
    s = evaluate.eval_settings(cfg2, {"cfg_scale": 3.0})
    assert s["num_examples"] == 7 and s["cfg_scale"] == 3.0 and "tasks" not in s
    with pytest.raises(ValueError, match="--num_examples=0"):
        evaluate.eval_settings(cfg, {"num_examples": 0})


@pytest.mark.parametrize("name", ["depth", "foreground", "panoptic", "video_depth",
                                  "frame_prediction", "denoising"])
def test_query_choice_reproduces_the_rendered_target(setup, name):
    cfg, sources = setup
    entry = evaluate.task_entry(cfg, name)
    sampler = evaluate.task_sampler(entry, _settings(cfg), len(sources[entry.source]))
    task = entry.make()
    for i in range(3):
        spec = sampler.spec(i)
        assert spec.n_pairs == 2 and spec.resolution == (RES, RES)
        items = episodes.render_episode(spec, task, sources[entry.source])["items"]
        query, choice = evaluate.query_choice(task, spec, sources[entry.source])
        np.testing.assert_array_equal(task.draw(query, choice)[1], items[-1])


class Oracle:
    """A stand-in predictor that returns the rendered query targets."""

    batch = 2

    def __call__(self, items, first_index):
        return np.stack([it[-1] for it in items])


@pytest.mark.parametrize("name,perfect", [
    ("edges", {"ods_f": 1.0}), ("foreground", {"miou": 1.0}), ("panoptic", {"pq": 1.0}),
    ("denoising", {"psnr": image.PSNR_CAP}), ("video_segmentation", {"j_and_f": 1.0}),
    ("frame_prediction", {"psnr": image.PSNR_CAP}),
])
def test_oracle_predictions_score_perfectly(setup, name, perfect):
    cfg, sources = setup
    s = _settings(cfg)
    entry = evaluate.task_entry(cfg, name)
    src = sources[entry.source]
    acc, base = evaluate.evaluate_task(Oracle(), entry.make(), evaluate.task_sampler(
        entry, s, len(src)), src, s)
    assert acc.count == base.count == 3
    for k, v in perfect.items():
        assert acc.result()[k] == pytest.approx(v), k
        assert base.result()[k] != pytest.approx(v), k


def test_oracle_depth_within_quantisation_and_resized_evaluation(setup):
    cfg, sources = setup
    s = _settings(cfg)
    entry = evaluate.task_entry(cfg, "depth")
    src = sources[entry.source]
    acc, _ = evaluate.evaluate_task(Oracle(), entry.make(), evaluate.task_sampler(
        entry, s, len(src)), src, s)
    assert acc.result()["abs_rel"] < 0.01 and acc.result()["delta1"] == 1.0
    # at half the source's size the prediction is resized back to the truth's size
    s16 = _settings(cfg, resolution=16)
    acc, base = evaluate.evaluate_task(Oracle(), entry.make(), evaluate.task_sampler(
        entry, s16, len(src)), src, s16)
    assert acc.result()["abs_rel"] < base.result()["abs_rel"]
    with pytest.raises(ValueError, match="aspect ratio"):
        evaluate._to_truth_size(np.zeros((1, 16, 8, 3), np.uint8), src[0], (16, 8))


def _report(**over):
    task = evaluate.task_entry(get_config("demo"), "depth").make()
    settings = dict.fromkeys(report.REQUIRED_SETTINGS, 0)
    r = report.make_report(task, 5, {"abs_rel": 0.1, "delta1": float("nan"), "rmse": 2},
                           {"abs_rel": 0.4, "delta1": 0.2, "rmse": math.inf}, {}, 3, settings,
                           1.5)
    r.update(over)
    return r


def test_report_schema(tmp_path):
    r = _report()
    assert r["main_metric"] == "abs_rel" and r["higher_is_better"]["delta1"] is True
    assert r["metrics"]["delta1"] is None and r["baseline"]["rmse"] is None  # non-finite -> null
    p = report.write_report(report.report_path(tmp_path, "depth", 5), r)
    assert p == tmp_path / "eval" / "depth" / "step_5.json"
    assert report.read_report(p) == json.loads(p.read_text()) == r
    for bad, msg in [({"main_metric": "rmse"}, "main_metric"),
                     ({"metrics": {"abs_rel": 1.0}}, "metrics keys"),
                     ({"baseline": {"abs_rel": "x", "delta1": 1, "rmse": 1}}, "finite numbers"),
                     ({"settings": {}}, "settings lack"), ({"step": -1}, "step=-1"),
                     ({"extra": 1}, "unexpected key")]:
        with pytest.raises(ValueError, match=msg):
            report.validate_report(_report(**bad))


def test_evaluate_end_to_end_on_tiny_models(setup, tmp_path):
    cfg, sources = setup
    with nnx.use_eager_sharding(False):
        jdit = JDiT(JDiTConfig(**TINY), rngs=nnx.Rngs(0))
        vae = STVAE(STVAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1,
                                latent_channels=4, norm_num_groups=2, spatial_norm_groups=2,
                                tile_sample_size=32, tile_sample_frames=5), rngs=nnx.Rngs(1))
    s = _settings(cfg, num_examples=3)
    # a video task: multi-frame context items and a 5-frame target, batches over 2 devices
    name = "frame_prediction"
    reps = evaluate.evaluate(cfg, str(tmp_path), [name], jdit=jdit, vae=vae, step=5,
                             settings=s, provenance={"params": "ema"},
                             metric_options={"depth_align": "scale_shift"}, sources=sources,
                             devices=jax.devices()[:2])
    r = report.read_report(tmp_path / "eval" / name / "step_5.json")
    assert r == reps[name] and r["num_examples"] == 3 and r["step"] == 5
    assert r["settings"]["devices"] == 2 and r["settings"]["params"] == "ema"
    assert r["settings"]["num_pairs"] == 2 and r["settings"]["source"] == "mem_clips"
    assert r["settings"]["metric_options"] == {}  # depth_align is not this task's option
    assert r["metrics"]["fvd"] is None and "fvd" in r["skipped"]
    assert 0 < r["metrics"]["psnr"] < image.PSNR_CAP
    # the baseline is the task's trivial prediction on the same queries
    entry = evaluate.task_entry(cfg, name)
    task, src = entry.make(), sources[entry.source]
    sampler = evaluate.task_sampler(entry, s, len(src))
    base = metrics.Accumulator(task)
    for i in range(3):
        q, c = evaluate.query_choice(task, sampler.spec(i), src)
        base.add(task.baseline(q, c), task.truth(q, c), task.context(q, c))
    assert r["baseline"]["psnr"] == pytest.approx(base.result()["psnr"])


def test_cli_reports_a_missing_run_clearly(tmp_path, capsys):
    rc = evaluate.main(["--config=configs/lavin_dit.py:demo", f"--workdir={tmp_path}",
                        "--task=depth", "--metric_option=depth_align='scale'"])
    assert rc == 2 and "no checkpoints/ folder" in capsys.readouterr().err
    assert evaluate._option("edge_thresholds=33") == ("edge_thresholds", 33)
    assert evaluate._option("depth_align=scale") == ("depth_align", "scale")


def test_table_row_falls_back_when_the_main_metric_has_no_value():
    from lavin_jax.evaluate import table_row

    rep = {"task": "inpainting", "main_metric": "fid", "settings": {},
           "metrics": {"fid": None, "psnr": 21.0, "ssim": 0.7},
           "baseline": {"fid": None, "psnr": 17.0, "ssim": 0.6},
           "higher_is_better": {"fid": False, "psnr": True, "ssim": True}}
    row = table_row(rep)
    assert row["metric"] == "psnr" and row["beats_baseline"] is True
    rep["metrics"]["fid"], rep["baseline"]["fid"] = 30.0, 40.0
    assert table_row(rep)["metric"] == "fid" and table_row(rep)["beats_baseline"] is True
