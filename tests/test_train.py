"""The training job: resume is bit-exact, guards skip non-finite steps, config errors are clear."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import lavin_dit
from lavin_jax import sharding, train, train_state
from lavin_jax.data.batches import make_iterator
from lavin_jax.objectives import get_objective
from lavin_jax.run_config import ConfigError, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(total_steps: int = 4) -> ml_collections.ConfigDict:
    cfg = lavin_dit.get_config("demo")
    cfg.model.update(hidden_size=48, depth=2, num_heads=4, kv_group=2, in_channels=4)
    cfg.data = ml_collections.ConfigDict(dict(
        kind="synthetic", global_batch=8, latent_size=8, cond_frames=3, episodes_per_row=2))
    cfg.total_steps = total_steps
    cfg.checkpoint_every_steps = 2
    cfg.log_every_steps = 2
    cfg.optim.warmup_steps = 0
    return cfg


def _params(state):
    return jax.tree.map(np.asarray, jax.device_get(state["params"]))


def test_resume_is_bit_exact(tmp_path):
    full = train.train(tiny_config(4), str(tmp_path / "full"))
    half = train.train(tiny_config(2), str(tmp_path / "split"))
    assert half["step"] == 2
    resumed = train.train(tiny_config(4), str(tmp_path / "split"))
    assert resumed["step"] == 4
    jax.tree.map(np.testing.assert_array_equal, _params(full["state"]), _params(resumed["state"]))
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == ["2", "4"]


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


def test_config_errors_are_one_line_each():
    cfg = tiny_config()
    cfg.mesh.update(data=3, fsdp=1)
    cfg.model.hidden_size = 64
    cfg.data.global_batch = 7
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, 8)
    msg = str(e.value)
    assert "config.mesh" in msg and "head_dim" in msg
    cfg = tiny_config()
    cfg.data.global_batch = 6
    with pytest.raises(ConfigError, match="global_batch=6"):
        validate_config(cfg, 8)
    cfg = tiny_config()
    cfg.objective.name = "gan"
    with pytest.raises(ConfigError, match="objective.name"):
        validate_config(cfg, 8)


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_matches_uninterrupted(tmp_path):
    """kill -9 mid-run (also possibly mid-save), rerun the same command: identical params."""
    script = (
        "import sys, numpy as np, jax; sys.path[:0] = [{repo!r}, {tests!r}];"
        "from test_train import tiny_config; from lavin_jax import train;"
        "cfg = tiny_config(8); cfg.checkpoint_every_steps = 1;"
        "r = train.train(cfg, sys.argv[1]);"
        "np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(r['state']['params'])])"
    ).format(repo=REPO, tests=os.path.join(REPO, "tests"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")

    def run(workdir, out, kill_after_ckpt=None):
        p = subprocess.Popen([sys.executable, "-c", script, str(workdir), str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill_after_ckpt is None:
            assert p.wait(timeout=900) == 0
            return
        ckpts = workdir / "checkpoints"
        deadline = time.time() + 900
        while time.time() < deadline and p.poll() is None:
            if ckpts.exists() and any(n.isdigit() and int(n) >= kill_after_ckpt
                                      for n in os.listdir(ckpts)):
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()

    run(tmp_path / "a", tmp_path / "a.npz")
    run(tmp_path / "b", tmp_path / "b.npz", kill_after_ckpt=3)
    run(tmp_path / "b", tmp_path / "b.npz")
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert len(a.files) == len(b.files) > 0
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


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
