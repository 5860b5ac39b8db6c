"""The run checkpointer: snapshot saves that let training run on, the writer thread's CPU
priority, the finiteness gate and the data position captured at save time."""

import os
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lavin_jax import train, train_checkpoint
from lavin_jax.train_checkpoint import RunCheckpointer, checkpoints_dir

CFG = ml_collections.ConfigDict({"x": 1})


class _Counter:
    def __init__(self):
        self.index = 0

    def __next__(self):
        self.index += 1
        return self.index

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def _thread_sched() -> tuple[int, int]:
    tid = threading.get_native_id()
    return os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid)


@pytest.mark.parametrize("priority,policy", [("low", os.SCHED_OTHER), ("idle", os.SCHED_IDLE)])
def test_writer_thread_priority(tmp_path, priority, policy):
    """The writer runs at nice 19 (``idle``: SCHED_IDLE too; Orbax's threads inherit it); the
    training thread keeps its own priority; what it writes restores unchanged."""
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
    before = _thread_sched()
    ck = RunCheckpointer(str(tmp_path), writer_priority=priority)
    assert ck._writer.submit(_thread_sched).result() == (19, policy)
    assert _thread_sched() == before
    assert ck.save(3, state, None, CFG).result()
    ck.wait()
    got = ck.restore(3, jax.tree.map(jnp.zeros_like, state), None)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(state["w"]))
    ck.close()
    assert RunCheckpointer(str(tmp_path), writer_priority="normal")._writer is None
    with pytest.raises(ValueError, match="writer_priority='nice'"):
        RunCheckpointer(str(tmp_path), writer_priority="nice")


def test_snapshot_save_survives_donation_and_keeps_shardings(tmp_path):
    """With ``snapshot`` the save returns before it is written; the state's buffers may then be
    donated and overwritten at once (as the next train step does), and the checkpoint holds the
    values of save time, sharded as the originals (8 devices, fsdp-like split)."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    state = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4), shard),
             "b": jnp.ones(3), "step": jnp.int32(5)}
    want = jax.tree.map(np.asarray, state)
    data = _Counter()
    data.index = 5
    ck = RunCheckpointer(str(tmp_path), writer_priority="idle", snapshot=True)
    go = threading.Event()
    ck._writer.submit(go.wait)  # hold the writer: the save below runs only after the donation
    future = ck.save(5, state, data, CFG, finite=jnp.bool_(True))
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 - 1, s), donate_argnums=0)
    state = bump(state)  # deletes the saved arrays, reuses their buffers
    next(data)  # the loop moves on before the write
    assert not future.done()
    go.set()
    assert future.result() is True
    ck.wait()
    restored_data = _Counter()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    got = ck.restore(5, abstract, restored_data)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), want)
    assert got["w"].sharding == shard
    assert restored_data.index == 5  # the position at save time, not after next()
    ck.close()


def test_nonfinite_state_is_not_written_and_errors_surface(tmp_path):
    """The finiteness flag is read on the writer thread: a non-finite state never becomes a
    checkpoint (the trainer's path, train._save), and a failed background save raises at the
    next call."""
    ck = RunCheckpointer(str(tmp_path), writer_priority="idle", snapshot=True)
    good = {"params": {"w": jnp.ones(4)}}
    bad = {"params": {"w": jnp.array([1.0, jnp.nan, 0.0, 1.0])}}
    train._save(ck, 1, good, None, CFG)
    train._save(ck, 2, bad, None, CFG)
    ck.wait()
    assert ck.manager.all_steps() == [1]
    ck._pending.append(ck._writer.submit(lambda: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        ck.wait()
    ck.close()


def test_snapshot_auto_takes_one_when_it_fits(tmp_path, caplog):
    """``checkpoint_snapshot`` unset = auto: decided at the first save, on when the copy fits
    beside the step's peak on every device (CPU devices report no memory statistics: always);
    True/False force it."""
    state = {"w": jnp.ones((64, 64))}
    cfg = ml_collections.ConfigDict({"checkpoint_snapshot": None})
    ck = RunCheckpointer.from_config(str(tmp_path / "a"), cfg)
    assert ck.snapshot_mode is None and ck._writer is not None
    ck.save(1, state, None, CFG)
    assert ck.snapshot is True and ck.snapshot_mode is True
    ck.close()
    cfg.checkpoint_snapshot = False
    ck = RunCheckpointer.from_config(str(tmp_path / "b"), cfg)
    ck.save(1, state, None, CFG)
    assert ck.snapshot is False
    ck.close()
    cfg.checkpoint_snapshot = None  # a device without room: saved without, and said so once
    ck = RunCheckpointer.from_config(str(tmp_path / "c"), cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_checkpoint, "snapshot_shortfall", lambda need: "gpu:0: no room")
        with caplog.at_level("WARNING", logger=train_checkpoint.__name__):
            ck.save(1, state, None, CFG)
            ck.save(2, state, None, CFG)
    ck.wait()
    assert ck.snapshot is False and ck.manager.all_steps() == [1, 2]
    assert [r.message for r in caplog.records].count(
        "checkpoint snapshot off (gpu:0: no room): each save waits for its device-to-host "
        "copy") == 1
    ck.close()


class _Device:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats

    def __str__(self):
        return "cuda:0"


def test_snapshot_bytes_and_shortfall():
    """Per-device bytes of a copy (sharded arrays count their shard, replicated ones all of
    it) against ``bytes_limit - peak_bytes_in_use``."""
    mesh = jax.make_mesh((len(jax.devices()),), ("d",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    n = len(jax.devices())
    state = {"a": jax.device_put(jnp.zeros((8 * n, 4)), sh), "b": jnp.zeros((3,), jnp.bfloat16)}
    need = train_checkpoint.snapshot_bytes(state)
    assert need[jax.devices()[0]] == 8 * 4 * 4 + 3 * 2
    assert all(need[d] == 8 * 4 * 4 for d in jax.devices()[1:])
    gib = 2**30
    full = {_Device({"bytes_limit": 10 * gib, "peak_bytes_in_use": 9.5 * gib}): gib}
    assert train_checkpoint.snapshot_shortfall(full) == (
        "cuda:0: the copy needs 1.00 GiB, 0.50 GiB are free at the step's peak")
    assert train_checkpoint.snapshot_shortfall(
        {_Device({"bytes_limit": 10 * gib, "peak_bytes_in_use": 8 * gib}): gib}) is None
    assert train_checkpoint.snapshot_shortfall(  # a tenth of the free memory stays spare
        {_Device({"bytes_limit": 10 * gib, "peak_bytes_in_use": 8.95 * gib}): gib}) is not None
    assert train_checkpoint.snapshot_shortfall({_Device(None): 100 * gib}) is None


def _disk_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_compression_switch_and_either_way_restores(tmp_path):
    """``checkpoint_compression`` (default on, as Orbax has it) switches zstd: a zero 4 MB array
    shows it on disk, and each checkpointer reads the other's steps (the codec is in the array
    metadata)."""
    cfg = ml_collections.ConfigDict({"x": 1})
    ck = RunCheckpointer.from_config(str(tmp_path / "default"), cfg)
    assert ck.compression is True
    ck.close()
    state = {"w": jnp.zeros((1024, 1024)), "step": jnp.int32(2)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    sizes = {}
    for on in (True, False):
        cfg.checkpoint_compression = on
        ck = RunCheckpointer.from_config(str(tmp_path / str(on)), cfg)
        assert ck.compression is on
        ck.save(2, state, None, CFG)
        ck.wait()
        ck.close()
        sizes[on] = _disk_bytes(ck.directory / "2" / "state")
    assert sizes[False] > 4 * 2**20 > 40 * sizes[True], sizes
    for written in (True, False):  # read by the checkpointer with the other setting
        ck = RunCheckpointer(str(tmp_path / str(written)), compression=not written)
        got = ck.restore(2, abstract, None)
        ck.close()
        jax.tree.map(np.testing.assert_array_equal, got, state)


def test_loop_runs_with_a_frozen_heap():
    """The loop's objects-alive-at-start are out of the GC's sight (no multi-100 ms full
    collections holding the GIL mid-save), and collectable again afterwards."""
    import gc

    gc.unfreeze()
    with train.frozen_heap():
        assert gc.get_freeze_count() > 1000
    assert gc.get_freeze_count() == 0


def test_restore_into_a_changed_state_is_one_line(tmp_path):
    """Resuming with a changed model/optimizer config names what differs, in one line, before
    Orbax reads anything; namedtuple (optax) states compare by field names."""
    import optax

    opt = optax.adam(1e-3)
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    state = {"params": params, "opt": opt.init(params), "step": jnp.int32(1)}
    ck = RunCheckpointer(str(tmp_path), async_save=False)
    ck.save(1, state, None, CFG)
    abstract = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
    jax.tree.map(np.testing.assert_array_equal, ck.restore(1, abstract(state), None), state)
    bigger = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3), "c": jnp.zeros(1), "d": jnp.zeros(1)}
    changed = {"params": bigger, "opt": opt.init(bigger), "step": jnp.int32(1)}
    with pytest.raises(ValueError) as e:
        ck.restore(1, abstract(changed), None)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit this run's state" in msg, msg
    assert "params/w has shape (2, 3), needs (4, 3)" in msg and "missing opt/0/mu/c" in msg, msg
    assert "(+" in msg and "--config.init_from" in msg, msg  # more than 6 problems: counted
    ck.close()


def test_checkpoint_paths_local_relative_and_urls(tmp_path, monkeypatch):
    """Relative local paths become absolute (Orbax rejects them); gs:// URLs stay URLs (a
    pathlib path made them local, cwd-prefixed "gs:/..." folders): params checkpoints, run
    checkpoints and the VAE-checkpoint checks all resolve paths through the same helper."""
    from lavin_jax import checkpoint

    monkeypatch.chdir(tmp_path)
    assert str(checkpoint.absolute_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(checkpoints_dir("gs://bucket/run")) == "gs://bucket/run/checkpoints"
    assert checkpoint.absolute_path("rel/p") == tmp_path / "rel" / "p"
    out = checkpoint.save_params("rel/p", {"toy": {"w": np.arange(3, dtype=np.float32)}})
    assert str(out) == "rel/p/0"
    params, meta = checkpoint.load_params("rel/p")
    np.testing.assert_array_equal(params["toy"]["w"], np.arange(3))
    assert meta["items"] == ["toy"]
