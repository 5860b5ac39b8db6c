"""In-context evaluation: task identification (oracle = 1.0, constant = chance, a task-swapping
predictor = 0 with the swap in the confusion matrix), the metric-vs-context-length table,
held-out tasks in reports, the demo table, and the in-training hook on tiny models."""

from __future__ import annotations

import json
import logging

import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import TINY, tiny_eval_config

from configs.lavin_dit import DEMO_TASKS, get_config
from lavin_jax import eval_incontext, eval_periodic, evaluate
from lavin_jax.data import episodes
from lavin_jax.data.render import render_example
from lavin_jax.metrics import image, report
from lavin_jax.models.jdit import JDiT, JDiTConfig
from lavin_jax.models.stvae import STVAE, STVAEConfig

RES = 32
COMMON = dict(jdit=None, vae=None, step=4)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_eval_config(RES)
    # A fixed training mixture (the demo's changes over time): 6 maps + 4 restorations.
    cfg.data.tasks = {t: 1.0 for t in ("depth", "normals", "panoptic", "detection", "pose",
                                       "edges", "colorization", "inpainting", "gaussian_deblur",
                                       "motion_deblur")}
    sources = {"mem_images": [render_example(s, RES) for s in range(8)]}
    return cfg, sources


def _settings(cfg, **over):
    return evaluate.eval_settings(cfg, {**dict(num_examples=3, num_pairs=2, batch_size=4,
                                               num_steps=2, grid="uniform"), **over})


class Oracle:
    """Predicts the rendered query target of the episode's own task."""

    batch = 4

    def __call__(self, items, first_index):
        return np.stack([it[-1] for it in items])


class Constant(Oracle):
    def __call__(self, items, first_index):
        return np.full((len(items), *items[0][-1].shape), 90, np.uint8)


class NextTask(Oracle):
    """Predicts the truth of the next task (items come query-major, K tasks each)."""

    def __init__(self, k):
        self.k = k

    def __call__(self, items, first_index):
        k = self.k
        return np.stack([items[f - f % k + (f % k + 1) % k][-1] for f in range(len(items))])


def test_default_task_set_drops_tasks_with_the_same_target(setup):
    cfg, sources = setup
    entries, dropped = eval_incontext.ti_tasks(cfg, None, dict(sources), _settings(cfg))
    names = [e.name for e in entries]
    # the four restoration tasks all target the clean image
    assert names == ["colorization", "depth", "detection", "edges", "normals", "panoptic", "pose"]
    assert dropped == {t: "same target image as colorization"
                       for t in ("gaussian_deblur", "inpainting", "motion_deblur")}
    with pytest.raises(ValueError, match="one source"):
        eval_incontext.ti_tasks(cfg, ["depth", "video_depth"], dict(sources), _settings(cfg))
    with pytest.raises(ValueError, match=">= 2 tasks"):
        eval_incontext.ti_tasks(cfg, ["depth"], dict(sources), _settings(cfg))


def test_task_identification_oracle_constant_and_swapped(setup, tmp_path):
    cfg, sources = setup
    s = _settings(cfg, num_examples=4)
    run = lambda p, **kw: eval_incontext.task_identification(  # noqa: E731
        cfg, str(tmp_path), settings=s, sources=sources, predict=p, **COMMON, **kw)
    r = run(Oracle())
    k = len(r["tasks"])
    assert r["accuracy"] == 1.0 and r["chance"] == pytest.approx(1 / k)
    np.testing.assert_array_equal(r["confusion"], 4 * np.eye(k, dtype=int))
    assert r["num_queries"] == 4 and set(r["per_task_accuracy"].values()) == {1.0}
    on_disk = json.loads((tmp_path / "eval" / "task_identification" / "step_4.json").read_text())
    assert on_disk == r and r["schema"] == eval_incontext.TI_SCHEMA
    text = eval_incontext.format_confusion(r)
    assert "accuracy 1.000" in text and len(text.splitlines()) == k + 3  # + the dropped line
    # a constant image is nearest one task per query: right for exactly 1 of the K contexts
    r = run(Constant())
    assert r["accuracy"] == pytest.approx(1 / k)
    assert all(sum(row) == 4 for row in r["confusion"])
    # the next task's truth: always wrong, and the confusion matrix shows the swap
    r = run(NextTask(k))
    assert r["accuracy"] == 0.0
    np.testing.assert_array_equal(r["confusion"], 4 * np.roll(np.eye(k, dtype=int), 1, 1))
    # tasks with identical targets are not rivals: colorization / inpainting both score
    r = run(Oracle(), tasks=["colorization", "inpainting", "depth", "foreground"])
    assert r["accuracy"] == 1.0 and r["held_out"] == ["foreground"]


def test_prefix_sampler_nests_contexts_on_one_query(setup):
    cfg, sources = setup
    entry = evaluate.task_entry(cfg, "depth")
    sampler = evaluate.task_sampler(entry, _settings(cfg, num_pairs=4), 8)
    task = entry.make()
    for i in range(3):
        full = sampler.spec(i)
        outs = [eval_incontext.PrefixSampler(sampler, n).spec(i) for n in (1, 2, 4)]
        for n, sp in zip((1, 2, 4), outs):
            assert sp.n_pairs == n and sp.examples == full.examples[:n] + full.examples[-1:]
            assert sp.seed == full.seed
            items = episodes.render_episode(sp, task, sources["mem_images"])["items"]
            assert len(items) == 2 * n + 2
            ref = episodes.render_episode(full, task, sources["mem_images"])["items"]
            np.testing.assert_array_equal(items[-1], ref[-1])  # the same query target
            np.testing.assert_array_equal(items[:2 * n], ref[:2 * n])  # nested context
    with pytest.raises(ValueError, match="context length 5"):
        eval_incontext.PrefixSampler(sampler, 5).spec(0)


def test_context_length_table(setup, tmp_path):
    cfg, sources = setup
    r = eval_incontext.context_length_table(
        cfg, str(tmp_path), "gaussian_deblur", [4, 1, 2, 2], settings=_settings(cfg),
        sources=sources, predict=Oracle(), **COMMON)
    names = ["psnr", "ssim", "mse"]
    assert [row["num_pairs"] for row in r["rows"]] == [1, 2, 4]
    assert all(list(row["metrics"]) == names for row in r["rows"])
    assert all(row["metrics"]["psnr"] == image.PSNR_CAP for row in r["rows"])
    assert r["baseline"]["psnr"] < image.PSNR_CAP and r["num_examples"] == 3
    assert r["settings"]["num_pairs"] == [1, 2, 4] and r["settings"]["held_out"] is False
    p = tmp_path / "eval" / "context_length" / "gaussian_deblur" / "step_4.json"
    assert json.loads(p.read_text()) == r
    text = eval_incontext.format_context_table(r)
    assert len(text.splitlines()) == 2 + 3 + 1 and "psnr" in text


def test_held_out_tasks_are_marked(setup, tmp_path):
    cfg, sources = setup
    s = _settings(cfg)
    reps = evaluate.evaluate(cfg, str(tmp_path), ["foreground", "depth"], settings=s,
                             sources=sources, predict=Oracle(), **COMMON)
    assert reps["foreground"]["settings"]["held_out"] is True
    assert reps["depth"]["settings"]["held_out"] is False
    assert report.read_report(tmp_path / "eval" / "foreground" / "step_4.json")[
        "settings"]["held_out"] is True
    bad = ml_collections.ConfigDict(cfg.to_dict())
    bad.data.held_out_tasks = ["depth"]
    with pytest.raises(ValueError, match="both name 'depth'"):
        evaluate.held_out(bad, "depth")


def test_demo_table_rows(setup, tmp_path):
    cfg, sources = setup
    rows = evaluate.demo_table(cfg, str(tmp_path), ["edges", "foreground"],
                               flags=dict(num_examples=2, num_pairs=1, batch_size=4),
                               models=(None, None, {"step": 9, "params": "ema"}),
                               sources=sources, predict=Oracle())
    assert [r["task"] for r in rows] == ["edges", "foreground"]
    assert set(rows[0]) == {"task", "metric", "value", "baseline", "higher_is_better",
                            "beats_baseline", "held_out"}
    assert rows[0]["metric"] == "ods_f" and rows[0]["value"] == 1.0 and rows[0]["beats_baseline"]
    assert rows[1]["held_out"] and rows[1]["metric"] == "miou"
    assert (tmp_path / "eval" / "edges" / "step_9.json").exists()
    text = evaluate.format_table(rows)
    assert "foreground (held out)" in text and len(text.splitlines()) == 3


class FakeTr:
    ema_decay = 0.5

    def __init__(self, jdit):
        self.jdit = jdit

    def modules(self, state, params):
        self.used = params
        return {"model": self.jdit}


class Writer:
    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        self.scalars[step] = dict(scalars)


def test_periodic_eval_off_without_a_vae(caplog, tmp_path):
    cfg = get_config("demo")
    # the config's in-training settings are valid (checked when the hook is built)
    assert eval_periodic.PeriodicEval(cfg, str(tmp_path)).settings["num_examples"] == 8
    bad = ml_collections.ConfigDict(cfg.to_dict())
    bad.eval.in_training.grid = "official"  # 10 steps: no official grid
    with pytest.raises(ValueError, match="official grid"):
        eval_periodic.PeriodicEval(bad, str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert eval_periodic.PeriodicEval.create(cfg, "/tmp/x") is None  # no vae_checkpoint
    assert "in-training eval off" in caplog.text
    cfg.data.vae_checkpoint = "toy"
    assert eval_periodic.PeriodicEval.create(cfg, "/tmp/x") is None
    cfg.eval_every_steps = 0
    assert eval_periodic.PeriodicEval.create(cfg, "/tmp/x") is None


def test_periodic_eval_on_tiny_models(setup, tmp_path, caplog):
    cfg, sources = setup
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.data.tasks = {"edges": 1.0, "depth": 1.0, "colorization": 1.0}
    cfg.eval_every_steps = 5
    cfg.eval.in_training = dict(num_examples=2, num_pairs=1, batch_size=4, num_steps=2,
                                grid="uniform", task_identification=True)
    with nnx.use_eager_sharding(False):
        jdit = JDiT(JDiTConfig(**TINY), rngs=nnx.Rngs(0))
        vae = STVAE(STVAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1,
                                latent_channels=4, norm_num_groups=2, spatial_norm_groups=2,
                                tile_sample_size=32, tile_sample_frames=5), rngs=nnx.Rngs(1))
    writer = Writer()
    pe = eval_periodic.PeriodicEval(cfg, str(tmp_path), writer)
    pe._vae, pe._sources = vae, dict(sources)
    tr, state = FakeTr(jdit), {"params": {"model": "P"}, "ema": {"model": "E"}}
    assert pe(4, tr, state) is None and not writer.scalars  # not an eval step
    out = pe(10, tr, state)
    assert tr.used == {"model": "E"}  # the EMA once 10 * (1 - 0.5) >= 3
    assert writer.scalars[10] == out
    for t in ("edges", "depth", "colorization"):
        r = report.read_report(tmp_path / "eval" / t / "step_10.json")
        assert r["num_examples"] == 2 and r["settings"]["params"] == "ema"
        assert r["settings"]["num_steps"] == 2 and r["settings"]["in_training"] is True
        m = r["main_metric"]
        assert out[f"eval/{t}/{m}"] == r["metrics"][m]
        assert out[f"eval/{t}/baseline/{m}"] == r["baseline"][m]
    assert 0 <= out["eval/task_identification/accuracy"] <= 1
    predict = pe._predict
    pe(5, tr, {"params": {"model": "P"}, "ema": {"model": "E"}})
    assert tr.used == {"model": "P"} and pe._predict is predict  # early: raw params; reused
    # a failing evaluation is logged, not raised
    pe._predict = None
    pe._vae = "not a model"
    with caplog.at_level(logging.ERROR):
        assert pe(15, tr, state) is None
    assert "in-training eval at step 15 failed" in caplog.text


def test_cli_modes(tmp_path, monkeypatch, capsys):
    """The CLI's three modes write their files and print their tables (model and data
    stand-ins: flag plumbing only; the model path is covered above)."""
    src = [render_example(s, 64) for s in range(6)]
    monkeypatch.setattr(evaluate, "load_run_models", lambda *a: (None, None, {"step": 3}))
    monkeypatch.setattr(evaluate, "Predictor", lambda *a, **k: Oracle())
    monkeypatch.setattr(evaluate, "open_source", lambda cfg, name, split: src)
    base = ["--config=configs/lavin_dit.py:demo", f"--workdir={tmp_path}", "--num_examples=2",
            "--num_pairs=1"]
    assert evaluate.main([*base, "--task=edges", "--task=single_detection"]) == 0
    out = capsys.readouterr().out
    assert "single_detection (held out)" in out and json.loads(out.splitlines()[-1])["edges"][
        "value"] == 1.0
    assert (tmp_path / "eval" / "edges" / "step_3.png").exists()
    assert evaluate.main([*base, "--task_identification"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["accuracy"] == 1.0
    r = json.loads((tmp_path / "eval" / "task_identification" / "step_3.json").read_text())
    assert len(r["tasks"]) == len(DEMO_TASKS) and r["num_queries"] == 2
    assert evaluate.main([*base, "--task=depth", "--context_lengths=1,2"]) == 0
    assert "pairs" in capsys.readouterr().out
    r = json.loads((tmp_path / "eval" / "context_length" / "depth" / "step_3.json").read_text())
    assert [row["num_pairs"] for row in r["rows"]] == [1, 2]
    with pytest.raises(SystemExit):
        evaluate.main([*base, "--context_lengths=0,2"])


@pytest.mark.slow
def test_training_loop_runs_the_in_training_eval(tmp_path, monkeypatch):
    """The real loop (8 fake devices, sharded params under the training rules) calls the hook
    every eval_every_steps: reports, task identification and TensorBoard scalars."""
    import tiny_run_config

    from lavin_jax import checkpoint, train

    vc = STVAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
                     norm_num_groups=2, spatial_norm_groups=2, tile_sample_size=32,
                     tile_sample_frames=5)
    with nnx.use_eager_sharding(False):
        vae = STVAE(vc, rngs=nnx.Rngs(1))
    checkpoint.save_params(tmp_path / "vae", {"stvae": nnx.to_pure_dict(nnx.state(
        vae, nnx.Param))}, {"configs": {"stvae": vc}})
    cfg = tiny_run_config.get_config("4")
    cfg.eval_every_steps = 2
    with cfg.data.ignore_type():
        cfg.data.vae_checkpoint = str(tmp_path / "vae")
        cfg.data.tasks = {"edges": 1.0, "depth": 1.0}  # the eval's tasks (the rows are synthetic)
        cfg.data.sources = {"image": "mem"}
        cfg.data.resolutions = [32]
    cfg.eval.in_training = dict(num_examples=2, num_pairs=1, batch_size=8, num_steps=2,
                                grid="uniform", task_identification=True)
    src = [render_example(s, 32) for s in range(6)]
    monkeypatch.setattr(evaluate, "open_source", lambda cfg, name, split: src)
    train.train(cfg, str(tmp_path / "run"))
    for step in (2, 4):
        for t in ("edges", "depth"):
            r = report.read_report(tmp_path / "run" / "eval" / t / f"step_{step}.json")
            assert r["num_examples"] == 2 and r["settings"]["devices"] == 8
        assert (tmp_path / "run" / "eval" / "task_identification" / f"step_{step}.json").exists()
    import tensorflow as tf

    tags = {(e.step, v.tag) for f in (tmp_path / "run").glob("events.out.tfevents.*")
            for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value}
    for step in (2, 4):
        assert {(step, "eval/edges/ods_f"), (step, "eval/depth/baseline/abs_rel"),
                (step, "eval/task_identification/accuracy")} <= tags
