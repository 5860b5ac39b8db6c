"""The training job: resume is bit-exact, guards skip non-finite steps, config errors are clear."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_run_config

from configs import lavin_dit
from lavin_jax import optim, sharding, train, train_state
from lavin_jax.data.batches import make_iterator
from lavin_jax.objectives import get_objective
from lavin_jax.run_config import ConfigError, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(total_steps: int = 4) -> ml_collections.ConfigDict:
    return tiny_run_config.get_config(str(total_steps))


def _params(state):
    return jax.tree.map(np.asarray, jax.device_get(state["params"]))


def test_resume_is_bit_exact_and_lr_is_logged(tmp_path):
    def cfg(steps):
        c = tiny_config(steps)
        c.optim.warmup_steps = 3  # lr 0, 1e-4, 2e-4, then 3e-4
        return c

    full_cfg = cfg(4)
    full_cfg.log_every_steps = 1
    sigterm = signal.getsignal(signal.SIGTERM)
    full = train.train(full_cfg, str(tmp_path / "full"))
    assert signal.getsignal(signal.SIGTERM) is sigterm  # the loop's handler is gone with it
    half = train.train(cfg(2), str(tmp_path / "split"))
    assert half["step"] == 2
    resumed = train.train(cfg(4), str(tmp_path / "split"))
    assert resumed["step"] == 4
    jax.tree.map(np.testing.assert_array_equal, _params(full["state"]), _params(resumed["state"]))
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == ["2", "4"]
    # The rate each step used, logged with the other scalars: schedule(step - 1).
    sched = optim.schedule(full_cfg.optim)
    assert [s for s, _ in full["history"]] == [1, 2, 3, 4]
    for s, logged in full["history"]:
        assert logged["lr"] == pytest.approx(float(sched(s - 1)), rel=1e-6, abs=1e-12)
        assert "model/loss" in logged
    assert [h["lr"] for _, h in full["history"]] == pytest.approx([0, 1e-4, 2e-4, 3e-4])
    assert [(s, h["lr"]) for s, h in resumed["history"]] == [(4, pytest.approx(3e-4))]


class _TwoOptimizers:
    """Two groups with their own schedules (like the VAE's generator and discriminator)."""

    groups = ("a", "b")

    def build(self, rngs):
        from flax import nnx

        return {g: nnx.Linear(6, 2, rngs=rngs) for g in self.groups}

    def optimizer(self, group):
        if group == "a":
            return optim.make_optimizer(optim.default_config(lr=1e-3, warmup_steps=4))
        return optim.make_optimizer(optim.default_config(lr=5e-4, schedule="cosine",
                                                         decay_steps=3))

    def loss(self, group, modules, batch, rng, step, aux):
        loss = jnp.mean((modules[group](batch["x"]) - batch["y"]) ** 2)
        return loss, ({}, {})


def test_lr_per_optimizer_group():
    cfg = tiny_config()
    mesh = sharding.make_mesh(cfg)
    obj = _TwoOptimizers()
    tr, state = train_state.create(obj, seed=0, mesh=mesh, rules=cfg.sharding.rules)
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((8, 6), np.float32),
             "y": rng.standard_normal((8, 2), np.float32)}
    step = jax.jit(lambda s, b: train_state.train_step(tr, s, b))
    scheds = {"a": optim.schedule(optim.default_config(lr=1e-3, warmup_steps=4)),
              "b": optim.schedule(optim.default_config(lr=5e-4, schedule="cosine",
                                                       decay_steps=3))}
    for i in range(3):
        state, logs = step(state, batch)
        assert "lr" not in logs
        for g in obj.groups:
            assert float(logs[f"lr/{g}"]) == pytest.approx(float(scheds[g](i)), rel=1e-6), (g, i)
    assert float(logs["lr/a"]) != float(logs["lr/b"])
    # The ST-VAE objective's two optimizers come from optim.make_optimizer too: both record it.
    from configs import stvae

    vae = get_objective("vae", stvae.get_config())
    for g in vae.groups:
        assert optim.current_lr(vae.optimizer(g).init({"w": jnp.zeros((2, 2))})) is not None


def test_nonfinite_step_is_skipped_and_counted():
    cfg = tiny_config()
    mesh = sharding.make_mesh(cfg)
    tr, state = train_state.create(get_objective("flow", cfg), seed=0, mesh=mesh,
                                   rules=cfg.sharding.rules)
    batch = next(make_iterator(cfg))
    before = _params(state)
    bad = dict(batch, x=np.full_like(batch["x"], np.nan))
    step = jax.jit(lambda s, b: train_state.train_step(tr, s, b))
    state, logs = step(state, bad)
    assert int(state["skipped"]) == 1 and int(state["streak"]) == 1 and int(state["step"]) == 1
    jax.tree.map(np.testing.assert_array_equal, before, _params(state))
    state, logs = step(state, batch)
    assert int(state["streak"]) == 0 and int(state["skipped"]) == 1
    assert bool(train_state.all_finite(state["params"]))


class _Regression:
    """A deterministic one-group objective: mean squared error of a linear map."""

    groups = ("lin",)

    def build(self, rngs):
        from flax import nnx

        return {"lin": nnx.Linear(6, 2, rngs=rngs)}

    def optimizer(self, group):
        import optax

        return optax.sgd(0.1)

    def loss(self, group, modules, batch, rng, step, aux):
        err = modules["lin"](batch["x"]) - batch["y"]
        loss = jnp.mean(err**2)
        return loss, ({"mse": loss}, {"err": err})


def test_microbatches_equal_full_batch_update():
    cfg = tiny_config()
    mesh = sharding.make_mesh(cfg)
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((8, 6), np.float32),
             "y": rng.standard_normal((8, 2), np.float32)}
    results = []
    for k in (1, 4):
        tr, state = train_state.create(_Regression(), seed=0, mesh=mesh,
                                       rules=cfg.sharding.rules, microbatches=k)
        state, logs = jax.jit(lambda s, b, tr=tr: train_state.train_step(tr, s, b))(state, batch)
        results.append((_params(state), float(logs["lin/loss"])))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 results[0][0], results[1][0])
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


def _episodes_config(tmp_path) -> ml_collections.ConfigDict:
    """A valid demo-like episodes config (mode "render" with the toy encoder: no files)."""
    cfg = tiny_config()
    cfg.data = lavin_dit.data_config("demo")
    cfg.data.update(mode="render", vae_checkpoint="toy", global_batch=8,
                    cache_dir=str(tmp_path / "latents"))
    return cfg


def _problems(cfg, devices: int = 8, processes: int = 1) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, devices, processes)
    head, *lines = str(e.value).split("\n")
    assert head == "invalid config:"
    return [ln.strip() for ln in lines]


def test_config_errors_are_one_line_each(tmp_path):
    validate_config(_episodes_config(tmp_path), 8)  # the baseline is valid
    cases = [  # (change, the one line's start, words of the fix)
        (lambda c: c.data.tasks.update(telepathy=1.0),
         "config.data.tasks: unknown task 'telepathy'", "depth"),
        (lambda c: c.data.sources.update(image="imagenet9000/64"),
         "config.data.sources.image='imagenet9000/64': unknown dataset", "synthetic_scenes"),
        (lambda c: c.data.update(mode="cache", vae_checkpoint=""),
         "config.data.cache_dir=", "config.data.vae_checkpoint (empty now)"),
        (lambda c: c.data.update(mode="online", vae_checkpoint=""),
         "config.data.mode='online' encodes with config.data.vae_checkpoint", "ST-VAE"),
        (lambda c: c.mesh.update(data=3, fsdp=1), "config.mesh", "make the product match"),
        (lambda c: c.data.update(global_batch=6), "config.data.global_batch=6",
         "change the batch or the mesh"),
        (lambda c: c.update(init_from=str(tmp_path / "nowhere")), "config.init_from=",
         "does not exist"),
        (lambda c: c.data.task_options.update(depth={"colour": 1}),
         "config.data.task_options.depth", "unknown option"),
        (lambda c: c.flow.update(t_dist="beta"), "config.flow.t_dist='beta'", "uniform"),
        (lambda c: c.update(checkpoint_writer_priority="lowest"),
         "config.checkpoint_writer_priority='lowest'", "idle"),
        (lambda c: c.model.update(embed_bias_init=-1.0), "model.embed_bias_init=-1.0", ">= 0"),
    ]
    for change, start, fix in cases:
        cfg = _episodes_config(tmp_path)
        change(cfg)
        lines = _problems(cfg)
        assert len(lines) == 1 and lines[0].startswith(start) and fix in lines[0], lines
    # Several problems: every line in one error, before anything is built or compiled.
    cfg = _episodes_config(tmp_path)
    for change, _, _ in cases[:3] + cases[5:7]:
        change(cfg)
    cfg.objective.name = "gan"
    lines = _problems(cfg)
    assert len(lines) == 6, lines
    assert any(ln.startswith("config.objective.name='gan'") for ln in lines)
    with pytest.raises(ConfigError):
        train.train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    # Global batch vs processes, and the model's own checks.
    cfg = tiny_config()
    cfg.model.hidden_size = 64
    assert any("head_dim" in ln for ln in _problems(cfg))
    cfg = tiny_config()
    assert _problems(cfg, 8, 3)[0].startswith("config.data.global_batch=8 must be a multiple of "
                                              "the 3 processes")


def test_config_objective_block_is_checked_before_any_compile(tmp_path):
    """The objective's own block (built in validate_config): an image too small for the
    discriminator (was a traceback from inside the first trace) and unknown keys. The train
    binary prints the lines alone (no traceback) and exits non-zero."""
    from configs import stvae

    cfg = stvae.get_config("demo")
    validate_config(cfg, 1)
    cfg.data.image_size = 16
    cfg.objective.disc.n_layers = 3
    assert _problems(cfg, 1) == [
        "config.data.image_size=16 is too small for the discriminator's 3 layers (needs >= 24); "
        "raise it or lower config.objective.disc.n_layers"]
    cfg.objective.disc.n_layers = 2  # 16 px leaves a 2x2 patch grid
    validate_config(cfg, 1)
    cfg.objective.l3_weight = 1.0
    (line,) = _problems(cfg, 1)
    assert line.startswith("config.objective has unknown keys ['l3_weight']")
    proc = subprocess.run(
        [sys.executable, "-m", "lavin_jax.train", "--config=configs/stvae.py:demo",
         "--config.data.image_size=16", f"--workdir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("lavin_jax.train: invalid config:\n  config.data.image_size=16 is too small"
            in proc.stderr), proc.stderr[-2000:]


def test_config_init_from_unreadable_url_is_one_line(tmp_path, monkeypatch):
    """A gs:// init_from the backend cannot reach (no network or credentials) is one error
    line naming the field and the backend's first line, not the backend's traceback."""
    from etils.epath import gpath

    def unreachable(self):
        raise RuntimeError("could not resolve host\nretrying ...")

    monkeypatch.setattr(gpath.PosixGPath, "exists", unreachable)
    cfg = _episodes_config(tmp_path)
    cfg.init_from = "gs://bucket/params"
    lines = _problems(cfg)
    assert len(lines) == 1 and lines[0].startswith(
        "config.init_from='gs://bucket/params' cannot be read (RuntimeError: could not resolve "
        "host); point it at a params checkpoint"), lines


def test_config_cache_mode_checks_the_cache(tmp_path):
    cfg = _episodes_config(tmp_path)
    cfg.data.update(mode="cache", vae_checkpoint="")
    cache = tmp_path / "latents"
    cache.mkdir()
    (cache / "latents-00000-of-00001.array_record").write_bytes(b"")
    validate_config(cfg, 8)  # a cache is there: no encoder needed
    (cache / "cache.json").write_text(json.dumps({"tasks": ["depth"]}))
    (line,) = _problems(cfg)
    assert line.startswith("config.data.tasks=") and "re-run the cache job" in line
    cfg.data.cache_dir = ""
    (line,) = _problems(cfg)
    assert line.startswith("config.data.cache_dir is empty")


def test_init_from_loads_params_only(tmp_path):
    from lavin_jax import checkpoint

    cfg = tiny_config()
    mesh = sharding.make_mesh(cfg)
    obj = get_objective("flow", cfg)
    tr, state = train_state.create(obj, seed=0, mesh=mesh, rules=cfg.sharding.rules,
                                   ema_decay=0.9)
    _, other = train_state.create(obj, seed=1, mesh=mesh, rules=cfg.sharding.rules)
    saved = jax.tree.map(np.asarray, jax.device_get(other["params"]["model"]))
    checkpoint.save_params(tmp_path / "p", {"jdit": saved})
    before = jax.tree.map(np.asarray, jax.device_get({k: state[k] for k in ("opt", "step")}))
    new = train._init_from(str(tmp_path / "p"), tr, state)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, saved,
                                                _params(state)["model"])))  # seeds differ
    jax.tree.map(np.testing.assert_array_equal, saved, _params(new)["model"])
    jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(new["ema"]["model"]))
    jax.tree.map(np.testing.assert_array_equal, before["opt"], jax.device_get(new["opt"]))
    assert int(new["step"]) == 0
    jax.tree.map(lambda a, b: a.sharding == b.sharding or pytest.fail("sharding"),
                 new["params"], state["params"])

    # Through the binary's entry: lr 0 keeps the loaded values through a step.
    cfg.init_from, cfg.total_steps, cfg.optim.lr = str(tmp_path / "p"), 1, 0.0
    out = train.train(cfg, str(tmp_path / "run"))
    jax.tree.map(np.testing.assert_array_equal, saved, _params(out["state"])["model"])

    checkpoint.save_params(tmp_path / "vae", {"stvae": {"w": np.zeros(3, np.float32)}})
    with pytest.raises(ValueError, match=r"config.init_from=.* holds \['stvae'\], none of"):
        train._init_from(str(tmp_path / "vae"), tr, state)
    checkpoint.save_params(tmp_path / "bad", {"jdit": {**saved, "extra": np.zeros(3)}})
    with pytest.raises(ValueError, match=r"does not fit .*unexpected extra"):
        train._init_from(str(tmp_path / "bad"), tr, state)


@pytest.mark.slow
def test_sigkill_or_sigterm_then_rerun_matches_uninterrupted(tmp_path):
    """kill -9 mid-run (also possibly mid-save), rerun the same command: identical params.
    A SIGTERM (preemption notice) mid-run: the step it lands in is checkpointed, the run exits
    cleanly, and the rerun ends identical too."""
    script = textwrap.dedent("""
        import os, signal, sys, numpy as np, jax
        sys.path[:0] = [{repo!r}, {tests!r}]
        from test_train import tiny_config
        from lavin_jax import sharding, train
        cfg = tiny_config(8)
        cfg.checkpoint_every_steps = int(sys.argv[3])
        term_at, shard, calls = int(sys.argv[4]), sharding.shard_batch, []

        def shard_and_maybe_term(*a):  # a real SIGTERM, sent from inside at a known step
            calls.append(1)
            if len(calls) == term_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return shard(*a)

        sharding.shard_batch = shard_and_maybe_term
        r = train.train(cfg, sys.argv[1])
        np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(r["state"]["params"])])
        print("STEP", r["step"])
    """).format(repo=REPO, tests=os.path.join(REPO, "tests"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")

    def run(workdir, out, kill_after_ckpt=None, every=1, term_at=0):
        p = subprocess.Popen([sys.executable, "-c", script, str(workdir), str(out), str(every),
                              str(term_at)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        if kill_after_ckpt is None:
            stdout, _ = p.communicate(timeout=900)
            assert p.returncode == 0
            return int(stdout.split("STEP")[-1])
        ckpts = workdir / "checkpoints"
        deadline = time.time() + 900
        while time.time() < deadline and p.poll() is None:
            if ckpts.exists() and any(n.isdigit() and int(n) >= kill_after_ckpt
                                      for n in os.listdir(ckpts)):
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def same(x, y):
        a, b = np.load(x), np.load(y)
        assert len(a.files) == len(b.files) > 0
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])

    assert run(tmp_path / "a", tmp_path / "a.npz") == 8
    run(tmp_path / "b", tmp_path / "b.npz", kill_after_ckpt=3)
    assert run(tmp_path / "b", tmp_path / "b.npz") == 8
    same(tmp_path / "a.npz", tmp_path / "b.npz")
    # No periodic saves: the preemption save is the only checkpoint before the rerun.
    assert run(tmp_path / "c", tmp_path / "c.npz", every=100, term_at=4) == 4
    assert sorted(os.listdir(tmp_path / "c" / "checkpoints")) == ["4"]
    assert run(tmp_path / "c", tmp_path / "c.npz", every=100) == 8
    same(tmp_path / "a.npz", tmp_path / "c.npz")


def test_jit_step_donates_and_keeps_shardings():
    cfg = tiny_config()
    mesh = sharding.make_mesh(cfg)
    tr, state = train_state.create(get_objective("flow", cfg), seed=0, mesh=mesh,
                                   rules=cfg.sharding.rules)
    batch = next(make_iterator(cfg))
    shardings = jax.tree.map(lambda x: sharding.batch_sharding(mesh, cfg.sharding.rules,
                                                               np.ndim(x)), batch)
    step = train_state.jit_train_step(tr, shardings)
    gb = sharding.shard_batch(batch, mesh, cfg.sharding.rules)
    kernel = state["params"]["model"]["blocks"]["x"]["up"]["kernel"]
    new, _ = step(state, gb)
    assert kernel.is_deleted()  # donated
    assert new["params"]["model"]["blocks"]["x"]["up"]["kernel"].sharding == kernel.sharding
    assert new["opt"]["model"][1][0].mu["blocks"]["x"]["up"]["kernel"].sharding.spec == \
        kernel.sharding.spec
    assert jnp.issubdtype(new["step"].dtype, jnp.integer)


def test_latent_cache_must_be_local(tmp_path):
    """ArrayRecord opens local files only: a gs:// cache is one clear line in the config check
    and in the cache job (before its encoder loads), not a local 'gs:' folder."""
    from lavin_jax import encode

    cfg = _episodes_config(tmp_path)
    cfg.data.update(mode="cache", vae_checkpoint="", cache_dir="gs://bucket/latents")
    (line,) = _problems(cfg)
    assert line.startswith("config.data.cache_dir='gs://bucket/latents' is a URL") and (
        "gcsfuse" in line), line
    with pytest.raises(SystemExit, match=r"--cache_dir='gs://b/latents' is a URL"):
        encode.main(["--config", "configs/lavin_dit.py:demo", "--workdir", str(tmp_path),
                     "--cache_dir", "gs://b/latents", "--vae_checkpoint", "/nonexistent"])
    assert not os.path.exists("gs:")  # where pathlib would have put it (cwd)


@pytest.mark.slow
def test_vae_resume_across_the_gan_start_is_bit_exact(tmp_path):
    """The VAE objective (two optimizers, the discriminator, the GAN phase switched on by the
    step) resumes bit-exactly: 4 steps in one run == 2 + 2, with disc_start inside the second
    half, so the resumed run starts the GAN phase itself."""
    from configs import stvae

    def cfg(steps):
        c = stvae.get_config("demo")
        c.model.update(block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=4,
                       spatial_norm_groups=4)
        c.objective.disc.channels = 8
        c.objective.disc_start = 3
        c.data = ml_collections.ConfigDict(dict(kind="synthetic", global_batch=8,
                                                image_size=32, frames=1, seed=0))
        c.update(total_steps=steps, checkpoint_every_steps=2, log_every_steps=1,
                 eval_every_steps=0, sample_every_steps=0)
        return c

    full = train.train(cfg(4), str(tmp_path / "full"))
    assert train.train(cfg(2), str(tmp_path / "split"))["step"] == 2
    resumed = train.train(cfg(4), str(tmp_path / "split"))
    losses = dict(full["history"])
    assert losses[2]["disc/loss"] == 0 and losses[4]["disc/loss"] != 0  # the GAN phase ran
    step4 = dict(resumed["history"])[4]
    assert {k: v for k, v in step4.items() if "/" in k} == {
        k: v for k, v in losses[4].items() if "/" in k}  # every loss term, exactly
    host = lambda s: jax.tree.map(np.asarray, jax.device_get(s))  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, host(full["state"]), host(resumed["state"]))
