"""Run checkpoints: the train state, the data-iterator state and the config, saved atomically.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Orbax writes each step to a temporary
directory and renames it when complete, so a kill at any moment (also mid-save) leaves only
complete steps behind; restart resumes from the newest complete one.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lavin_jax.checkpoint import absolute_path, tree_mismatches
from lavin_jax.checkpoint_writer import (
    WRITER_PRIORITIES,
    WRITERS,
    WriterProcess,
    lower_thread_priority,
)

log = logging.getLogger(__name__)


def _state_name() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def check_data_state(directory: epath.Path) -> None:
    """A clear error when ``directory`` (a checkpoint's ``data`` item) has no iterator state for
    this process: the checkpoint was written by a different number of processes.

    Each process saves its own pipeline position (its slice of the data), and the slices of N
    processes do not map onto those of M != N processes, so the position cannot follow.
    """
    path = directory / _state_name()
    if path.exists():
        return
    found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    counts = sorted({n.rsplit("-of-", 1)[-1].removesuffix(".json") for n in found
                     if n.startswith("process_") and "-of-" in n})
    raise ValueError(
        f"data-iterator state {path} not found: the checkpoint was written by "
        f"{' or '.join(counts) or 'an unknown number of'} process(es) ({found}), this run has "
        f"{jax.process_count()}, and the data position cannot follow a change of process count; "
        f"resume with the same process count, or set --config.data_restore=False to restore the "
        f"model and optimizer and restart the data from its beginning")


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves ``iterator.get_state()`` as JSON, one file per process."""

    def save(self, directory: epath.Path, args: DataSave) -> None:
        (directory / _state_name()).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataRestore) -> Any:
        check_data_state(directory)
        args.iterator.set_state(json.loads((directory / _state_name()).read_text()))
        return args.iterator

    def structure(self, directory: epath.Path) -> Any:
        return None

    def metadata(self, directory: epath.Path) -> Any:
        return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
class DataSave(ocp.args.CheckpointArgs):
    """An iterator's position (``iterator.get_state()``, taken when the save is issued: it may
    be written later, after the iterator moved on)."""

    def __init__(self, state: dict):
        self.state = state


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
class DataRestore(ocp.args.CheckpointArgs):
    def __init__(self, iterator: Any):
        self.iterator = iterator


def checkpoints_dir(workdir: str | os.PathLike) -> epath.Path:
    """``workdir/checkpoints`` as an absolute path (local or gs://)."""
    return absolute_path(workdir) / "checkpoints"


@jax.jit
def snapshot_copy(tree: Any) -> Any:
    # jnp.copy is kept by XLA (new buffers, the operands' shardings), unlike an identity.
    return jax.tree.map(jnp.copy, tree)


def snapshot_bytes(state: Any) -> dict[Any, int]:
    """Bytes a copy of ``state`` takes on each of this process's devices."""
    need: dict[Any, int] = {}
    for x in jax.tree.leaves(state):
        if isinstance(x, jax.Array):
            n = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for d in x.sharding.addressable_devices:
                need[d] = need.get(d, 0) + n
    return need


def snapshot_shortfall(need: dict[Any, int]) -> str | None:
    """None when ``need`` (``snapshot_bytes``) fits on every device beside the step's peak
    (``peak_bytes_in_use``: the copy lives while the next steps run) with a tenth of the free
    memory to spare (allocator fragmentation), else why not. Devices without memory statistics
    (CPUs: host memory, where Orbax copies to anyway) always fit."""
    for d, n in need.items():
        stats = d.memory_stats()
        if not stats or "bytes_limit" not in stats:
            continue
        free = stats["bytes_limit"] - stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))
        if n > 0.9 * free:
            return (f"{d}: the copy needs {n / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free at "
                    f"the step's peak")
    return None


def _in_place_registry() -> Any:
    """Orbax's standard type handlers, numpy arrays written without a deep copy first (Orbax's
    guard against the caller changing them mid-save); None where this Orbax lacks the option
    or the registry API (the default registry then copies, as before)."""
    th = ocp.type_handlers
    try:
        numpy = th.NumpyHandler(deepcopy_host_arrays=False)
        return th.create_type_handler_registry(*[
            (t, numpy if t is np.ndarray else th.get_type_handler(t))
            for t in th.supported_types()])
    except (TypeError, AttributeError, ValueError):
        return None


def make_manager(directory: str | os.PathLike, *, max_to_keep: int, async_save: bool,
                 compression: bool, in_place: bool = False) -> ocp.CheckpointManager:
    """The run's CheckpointManager (items state, data, config); the writer process makes the
    same one on the same directory with ``in_place``: host arrays written without Orbax's copy
    of each (17-40% of an isolated save's CPU, BENCHMARKS.md), only for a caller that leaves
    them unchanged until the save is committed."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    registry = {}
    if in_place and (r := _in_place_registry()) is not None:
        registry["type_handler_registry"] = r
    return ocp.CheckpointManager(
        directory,
        # Every item's handler named: a manager that has not saved yet (a resumed run, the
        # writer process's parent) reads their metadata without guessing.
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_compression=compression,
                                                            **registry),
                       "data": DataIteratorHandler(), "config": ocp.JsonCheckpointHandler()},
        options=options,
    )


class RunCheckpointer:
    """Orbax CheckpointManager for a training run in ``workdir/checkpoints``.

    A save has three parts, so the train step is held up as little as possible:
    1. the caller's thread captures the data position and the config and, with ``snapshot``,
       dispatches a copy of the state on its own devices (an async XLA copy; the next step may
       then donate the originals);
    2. a writer thread reads the finiteness flag (a non-finite state is never written), then
       either (``writer="process"``) copies the state into shared memory and has the writer
       process (lavin_jax.checkpoint_writer) run Orbax's save and commit at
       ``writer_priority``, or (``"thread"``) runs Orbax's save call itself (device-to-host
       copy, metadata) at ``writer_priority``;
    3. (thread) Orbax's async commit serialises, writes and renames the step directory.
    With ``snapshot`` the caller returns after 1 and training runs on; without it the caller
    also waits for the host copy (the next, donating step must not free buffers the save still
    reads: on a GPU, for a thread writer, that is Orbax's device-to-host copy plus its Python,
    0.13-0.4 s a save for 5-100M-parameter states, BENCHMARKS.md). A snapshot costs one state
    copy of device memory until it is read: ``snapshot=None`` (auto) turns it on at the first
    save when it fits beside the step's peak memory on every device (``snapshot_shortfall``;
    always on CPU hosts, where the copy goes to that same memory anyway).
    ``writer=None`` (auto, what ``from_config`` passes for an unset ``checkpoint_writer``):
    the process where this run is one process (Orbax's Python, ~1.8 ms per state array, then
    never holds the loop's GIL), else the thread (Orbax's multi-host commit runs in the JAX
    processes); the constructor's own default is the thread. A ``low``/``idle`` writer
    priority lets the write take only the CPU the step leaves idle (a saturated few-core host).
    ``compression``: zstd on the state's chunks (Orbax's default). A freshly initialised state
    (zero moments, zero-init layers) shrinks ~3x, a trained float32 one only ~8-14%, where
    zstd costs up to 3x the writer's CPU; ``False`` trades disk for that CPU.
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
                 writer_priority: str = "normal", snapshot: bool | None = False,
                 compression: bool = True, writer: str | None = "thread"):
        if writer_priority not in WRITER_PRIORITIES:
            raise ValueError(f"writer_priority={writer_priority!r}: use one of "
                             f"{WRITER_PRIORITIES}")
        if writer not in (None, *WRITERS):
            raise ValueError(f"writer={writer!r}: use one of {WRITERS} or None (auto)")
        if writer is None:
            writer = "process" if jax.process_count() == 1 else "thread"
        if writer == "process" and jax.process_count() > 1:
            raise ValueError("checkpoint_writer='process' needs a single-process run (Orbax's "
                             "multi-host commit runs in the JAX processes): use 'thread', or "
                             "leave it unset")
        self.directory = checkpoints_dir(workdir)
        self.writer = writer if async_save else "thread"
        self.snapshot_mode = snapshot if async_save else False  # True | False | None = auto
        self.compression = compression
        self.writer_priority = writer_priority if async_save else "normal"
        self._writer = None
        self._process = None
        self._pending: list[concurrent.futures.Future] = []
        if self.writer == "process":
            self._process = WriterProcess(self.directory, max_to_keep=max_to_keep,
                                          compression=compression, priority=writer_priority)
            # Only copies and waits: at normal priority (a preempted low-priority thread
            # holding the GIL would stall the loop).
            self._writer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="ckpt_stager")
        elif async_save and (writer_priority != "normal" or self.snapshot_mode is not False):
            self._writer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="ckpt_writer", initializer=lower_thread_priority,
                initargs=(writer_priority,))
        self.manager = make_manager(
            self.directory, max_to_keep=max_to_keep,
            async_save=async_save and self.writer == "thread", compression=compression)

    @property
    def snapshot(self) -> bool:
        """Whether saves take a snapshot (auto: False until the first save decides)."""
        return self.snapshot_mode is True

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid (None: a thread writes, or no save started it yet)."""
        return self._process.pid if self._process else None

    @classmethod
    def from_config(cls, workdir: str, cfg: ml_collections.ConfigDict,
                    max_to_keep: int | None = None) -> RunCheckpointer:
        """The run's checkpointer as the config sets it (keep_checkpoints, async_checkpointing,
        checkpoint_writer: None = auto, checkpoint_writer_priority, checkpoint_compression,
        checkpoint_snapshot: None = auto, i.e. whenever the copy fits in device memory)."""
        keep = cfg.get("keep_checkpoints", 3) if max_to_keep is None else max_to_keep
        snapshot = cfg.get("checkpoint_snapshot")
        return cls(workdir, max_to_keep=keep, async_save=cfg.get("async_checkpointing", True),
                   writer_priority=cfg.get("checkpoint_writer_priority", "normal"),
                   snapshot=None if snapshot is None else bool(snapshot),
                   compression=bool(cfg.get("checkpoint_compression", True)),
                   writer=cfg.get("checkpoint_writer"))

    def latest_step(self) -> int | None:
        self._drain()
        self._reload()
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator: Any | None, cfg: ml_collections.ConfigDict,
             *, force: bool = False, finite: Any = None) -> concurrent.futures.Future:
        """Saves ``state`` as step ``step`` (see the class doc for what runs where).

        ``finite``: a scalar bool array (e.g. dispatched, not yet computed); when False the
        step is not written (logged). Returns a future of whether it was written: done unless
        the save runs on after this call returns. First waits for the save before it (so at
        most one is in flight, as Orbax allows) and raises its error, if any.
        """
        self._drain()
        config = json.loads(cfg.to_json_best_effort())
        data = None if iterator is None else iterator.get_state()
        self._decide_snapshot(state)
        if self.snapshot:
            state = snapshot_copy(state)
        staged = None
        if self._process and not self.snapshot:  # the next step may donate what it reads
            staged = self._process.stage(state)

        def write() -> bool:
            if finite is not None and not bool(jax.device_get(finite)):
                log.error("step %d: parameters are not finite; checkpoint NOT written", step)
                return False
            if self._process:
                return self._process.save(step, staged or self._process.stage(state), data,
                                          config, force)
            items = {"config": ocp.args.JsonSave(config)}
            if data is not None:
                items["data"] = DataSave(data)
            return self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), **items), force=force)

        if self._writer is None:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(write())
        else:
            future = self._writer.submit(write)
            if self.snapshot or self._process:
                self._pending.append(future)  # drained by the next save / wait / close
            else:
                future.result()
        return future

    def _decide_snapshot(self, state: Any) -> None:
        """Auto: decided at the first save, when the steps so far set the memory peak; later
        peaks would count this run's own snapshots."""
        if self.snapshot_mode is None:
            short = snapshot_shortfall(snapshot_bytes(state))
            if short:
                log.warning("checkpoint snapshot off (%s): each save waits for its "
                            "device-to-host copy", short)
            self.snapshot_mode = short is None

    def saving(self) -> bool:
        """Whether a save is still being issued or written."""
        return (any(not f.done() for f in self._pending)
                or self.manager.is_saving_in_progress())

    def _drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def _reload(self) -> None:
        if self._process:  # the writer process's steps (and its keep policy's deletions)
            self.manager.reload()

    def restore(self, step: int, abstract_state: Any, iterator: Any | None) -> Any:
        """The train state of ``step``; ``iterator`` (if given) is set to its saved position."""
        self._drain()
        self._reload()
        problems = tree_mismatches(abstract_state, self.manager.item_metadata(step)["state"].tree)
        if problems:  # before Orbax starts reading (its own error is one per array)
            raise ValueError(
                f"checkpoint {self.directory / str(step)} does not fit this run's state (was "
                f"the model or optimizer config changed?): {'; '.join(problems[:6])}"
                f"{f' (+{len(problems) - 6} more)' if len(problems) > 6 else ''}; resume with "
                f"the config saved in its config/ item, or start a new --workdir (with "
                f"--config.init_from for its parameters only)")
        items = {"state": ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
        if iterator is not None:
            check_data_state(self.directory / str(step) / "data")  # before reading the state
            items["data"] = DataRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Until every save is issued and written (errors raised)."""
        self._drain()
        self._reload()
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._drain()
        finally:
            if self._process:
                self._process.close()
            self.manager.close()
            if self._writer:
                self._writer.shutdown()


def restore_params(workdir: str, group: str, abstract: Any, *, step: int | None = None,
                   prefer_ema: bool = True) -> tuple[Any, dict, int, str]:
    """Reads one group's parameters (EMA if kept and ``prefer_ema``) from a run, without the
    optimizer state: -> (params, run config dict, step, "ema" | "params").

    ``abstract`` is the group's pure-dict param tree of ShapeDtypeStructs (optionally sharded),
    or a function of the run config dict returning it.
    """
    directory = checkpoints_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints/ folder in {workdir} (train first)")
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    mngr = ocp.CheckpointManager(directory, item_handlers=handlers,
                                 options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = mngr.latest_step() if step is None else step
        if step is None or step not in mngr.all_steps():
            raise FileNotFoundError(f"{workdir}: no checkpoint step "
                                    f"{'' if step is None else step} (have {mngr.all_steps()})")
        cfg = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        tree = mngr.item_metadata(step)["state"].tree
        which = "ema" if prefer_ema and group in (tree.get("ema") or {}) else "params"
        if group not in (tree.get(which) or {}):
            raise ValueError(f"{workdir} step {step} has no parameter group {group!r} "
                             f"(have {sorted(tree.get('params') or {})})")
        if callable(abstract):
            abstract = abstract(cfg)
        want = {which: {group: abstract}}
        args = ocp.args.PyTreeRestore(
            item=want, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(want))
        params = mngr.restore(step, args=ocp.args.Composite(state=args))["state"][which][group]
    finally:
        mngr.close()
    return params, cfg, step, which
