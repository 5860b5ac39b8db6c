"""The checkpoint writer process: what it writes, how it fails, and that it lives and dies
with the training process (lavin_jax/checkpoint_writer.py)."""

import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lavin_jax import checkpoint_writer, train, train_checkpoint
from lavin_jax.run_config import ConfigError, base_config, validate_config
from lavin_jax.train_checkpoint import RunCheckpointer

CFG = ml_collections.ConfigDict({"x": 1})


class _Position:
    def __init__(self, index=0):
        self.index = index

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def _state():
    """Sharded over 8 devices, bf16, optax namedtuples (with empty ones), scalars."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    params = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4), shard),
              "b": jnp.linspace(0, 1, 5).astype(jnp.bfloat16)}
    return {"step": jnp.int32(7), "rng": jnp.array([1, 2], jnp.uint32), "params": params,
            "opt": optax.adamw(1e-3).init(params)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_process_writer_writes_what_a_thread_writes(tmp_path):
    """Steps written by the process restore, to the run's shardings and dtypes, exactly as the
    thread's; the data position of save time and the config are saved with them; the keep
    policy applies; the child runs at the writer priority, the trainer's thread keeps its own."""
    state = _state()
    want = jax.tree.map(np.asarray, state)
    ck = RunCheckpointer(str(tmp_path / "p"), writer="process", writer_priority="idle",
                         snapshot=True, max_to_keep=2)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    pos = _Position(3)
    for step in (1, 2, 3):
        train._save(ck, step, state, pos, CFG)
        pos.index += 1  # the loop moves on before the write
    ck.wait()
    pid = ck._process.pid
    assert os.getpriority(os.PRIO_PROCESS, pid) == 19
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert os.getpriority(os.PRIO_PROCESS, 0) == nice
    assert ck.latest_step() == 3 and ck.manager.all_steps() == [2, 3]
    restored = _Position()
    got = ck.restore(3, _abstract(state), restored)
    ck.close()
    assert not _alive(pid)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), want)
    assert jax.tree.map(lambda a, b: a.dtype == b.dtype and a.sharding == b.sharding,
                        got, state) == jax.tree.map(lambda _: True, state)
    assert restored.index == 5  # step 3 was saved at position 5
    thread = RunCheckpointer(str(tmp_path / "t"), writer="thread")
    thread.save(3, state, None, CFG)
    thread.wait()
    a = ck.manager.item_metadata(3)["state"].tree
    b = thread.manager.item_metadata(3)["state"].tree
    thread.close()
    assert jax.tree.map(lambda m: (m.shape, m.dtype), a) == jax.tree.map(
        lambda m: (m.shape, m.dtype), b)


def test_writer_auto_and_config_checks():
    """Unset = the process for one-process runs; bad values and 'process' across processes
    are config lines."""
    ck = RunCheckpointer.from_config("/tmp/unused_writer_auto", CFG)
    assert ck.writer == "process"
    ck.close()
    assert RunCheckpointer("/tmp/unused_writer_auto", async_save=False,
                           writer="process").writer == "thread"
    cfg = base_config()
    cfg.checkpoint_writer = "fork"
    with pytest.raises(ConfigError, match=r"config.checkpoint_writer='fork' must be one of"):
        validate_config(cfg, 1)
    cfg.checkpoint_writer = "process"
    with pytest.raises(ConfigError, match=r"'process' needs a single-process run \(this one "
                                          r"has 2"):
        validate_config(cfg, 2, num_processes=2)
    with pytest.raises(ValueError, match="writer='fork'"):
        RunCheckpointer("/tmp/unused_writer_auto", writer="fork")


def test_non_finite_state_and_writer_errors_surface(tmp_path, caplog):
    """The finiteness gate holds with the process. A child that dies while it writes (here:
    killed while it still starts) fails that save, raised at the trainer's next call with its
    exit status; one that died between saves is replaced (logged) and the save goes ahead."""
    ck = RunCheckpointer(str(tmp_path), writer="process", snapshot=True)
    ck.save(1, {"w": jnp.ones(4)}, None, CFG)
    for _ in range(200):  # the staging thread starts the child
        if ck._process._proc is not None:
            break
        time.sleep(0.01)
    ck._process._proc.kill()
    with pytest.raises(RuntimeError, match=r"writer process exited \(status -9\) before step 1"):
        ck.wait()
    train._save(ck, 2, {"params": {"w": jnp.ones(4)}}, None, CFG)
    train._save(ck, 3, {"params": {"w": jnp.array([1.0, jnp.nan, 0.0, 1.0])}}, None, CFG)
    ck.wait()
    assert ck.manager.all_steps() == [2]
    ck._process._proc.kill()
    ck._process._proc.wait()
    with caplog.at_level("WARNING", logger=checkpoint_writer.__name__):
        ck.save(4, {"w": jnp.ones(4)}, None, CFG)
        ck.wait()
    assert "exited (status -9) between saves; starting a new one" in caplog.text
    assert ck.manager.all_steps() == [2, 4]
    ck.close()


def test_child_ignores_sigterm_and_dies_with_its_parent(tmp_path):
    """A SIGTERM to the job's processes (a preemption notice) must not kill the final save:
    the child ignores it. When the trainer is killed (-9) the child exits too, and the next
    run's manager removes the step it left half written."""
    script = textwrap.dedent(f"""
        import os, sys, time
        import jax.numpy as jnp, ml_collections
        from lavin_jax.train_checkpoint import RunCheckpointer
        ck = RunCheckpointer({str(tmp_path)!r}, writer="process", snapshot=True)
        ck.save(1, {{"w": jnp.ones(4)}}, None, ml_collections.ConfigDict({{"x": 1}}))
        ck.wait()
        os.kill(ck._process.pid, 15)
        time.sleep(0.5)
        ck.save(2, {{"w": jnp.ones(4)}}, None, ml_collections.ConfigDict({{"x": 1}}))
        ck.wait()
        print(ck._process.pid, ck.manager.all_steps(), flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid, steps = proc.stdout.readline().split(" ", 1)
        assert steps.strip() == "[1, 2]"
        pid = int(pid)
        assert _alive(pid)
        proc.kill()
        proc.wait()
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        proc.kill()


def test_layout_aligns_each_array():
    leaves = [np.zeros(3, np.float32), np.zeros((2, 2), jnp.bfloat16), np.zeros((), np.int32)]
    specs, size = checkpoint_writer.layout(leaves)
    assert [s[0] for s in specs] == [0, 64, 128] and size == 192
    assert specs[1][2] == jnp.bfloat16 and specs[1][1] == (2, 2)


def test_trainer_state_round_trip_via_make_manager(tmp_path):
    """The child's manager is ``make_manager``'s: a thread-less synchronous one on the same
    items reads the process's steps."""
    ck = RunCheckpointer(str(tmp_path), writer="process")
    state = {"w": jnp.arange(5.0)}
    ck.save(1, state, _Position(9), CFG)
    ck.close()
    mngr = train_checkpoint.make_manager(ck.directory, max_to_keep=3, async_save=False,
                                         compression=True)
    assert mngr.all_steps() == [1]
    mngr.close()


@pytest.mark.parametrize("in_place", [False, True])
def test_in_place_manager_writes_host_arrays_without_copying_them(tmp_path, monkeypatch,
                                                                   in_place):
    """The writer process's manager (``in_place``) skips Orbax's deep copy of each numpy array
    (its buffer is unchanged until the save's reply) and writes the same step."""
    import copy

    import orbax.checkpoint as ocp

    copied = []
    deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: (
        copied.append(x) if isinstance(x, np.ndarray) else None) or deepcopy(x, *a))
    state = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3),
             "b": np.ones(4, jnp.bfloat16), "step": np.array(3, np.int32)}
    mngr = train_checkpoint.make_manager(tmp_path, max_to_keep=2, async_save=False,
                                         compression=True, in_place=in_place)
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    got = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    mngr.close()
    assert len(copied) == (0 if in_place else 3)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k


@pytest.mark.parametrize("pinned", [None, True])
def test_host_copies_pinned_or_pageable(tmp_path, monkeypatch, pinned):
    """The stager's device-to-host copies: pageable in place on CPU devices (auto), or the
    GPU path (forced here: CPU devices have a pinned_host memory too) to ``pinned_host`` with
    each array's own sharding; either way the written step restores bit-exact."""
    state = _state()
    leaves = jax.tree.leaves(state) + [np.arange(3)]
    got = checkpoint_writer.host_copies(leaves, pinned=pinned)
    for a, b in zip(leaves, got):
        if not isinstance(a, jax.Array):
            assert b is a
        elif pinned:
            assert b.sharding == a.sharding.with_memory_kind("pinned_host")
        else:
            assert b is a
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    real = checkpoint_writer.host_copies
    monkeypatch.setattr(checkpoint_writer, "host_copies", lambda x: real(x, pinned=pinned))
    ck = RunCheckpointer(str(tmp_path), writer="process", snapshot=False)
    ck.save(1, state, None, CFG)
    restored = ck.restore(1, _abstract(state), None)
    ck.close()
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored),
                 jax.tree.map(np.asarray, state))
