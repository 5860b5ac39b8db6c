"""Checkpoint writing off the training process: Orbax's save in a child process.

Why: Orbax's save runs ~1.7-1.9 ms of Python per state array (asyncio bookkeeping, path
building; BENCHMARKS.md). In a writer thread that Python holds the training process's GIL, so a
loop whose step is host-bound (a small model on a GPU) loses 0.3-1.4 s per save, and a
low-priority writer thread preempted while it holds the GIL stalls the loop (priority
inversion). Here the training process only copies the (snapshot of the) state into a shared
memory buffer, a memcpy per array with the GIL released, and a child process, at the writer's
CPU priority, runs Orbax on it.

Protocol (two pipes, pickled messages): the parent stages the state's arrays in the buffer (a
memfd; an unlinked temporary file where there is none) and sends the step, the tree's
skeleton, the arrays' offsets, the data position and the config; the child writes the step
with its own CheckpointManager on the same directory and options (so it also applies the keep
policy), synchronously, and replies. The layout on disk is Orbax's, as a thread writes it
(the arrays recorded as host arrays: they restore to any sharding). Single-process runs only:
Orbax's multi-host commit runs inside the JAX processes.

The child dies with the parent and not otherwise: it ignores SIGINT and SIGTERM (a preemption
signal sent to the process group must not kill the final save) and exits as soon as its
command pipe closes without a ``close`` message (the parent was killed, e.g. -9); a step it was
writing then stays a temporary directory, which the next run's manager deletes.

Kept light at import (stdlib, numpy): the child lowers its priority before importing JAX.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WRITERS = ("thread", "process")
WRITER_PRIORITIES = ("normal", "low", "idle")
_ALIGN = 64


def lower_thread_priority(priority: str, every_thread: bool = False) -> None:
    """Lowers the calling thread's CPU priority (Linux: per thread, inherited by the threads it
    starts), and every existing tensorstore worker thread's, which Orbax writes with
    (``every_thread``: all of this process's threads).

    ``low``: nice 19. ``idle``: SCHED_IDLE, i.e. the thread runs only on CPU time no normal
    thread wants (a waking train-step thread preempts it at once; nice 19 still gets a share).
    Best effort: a no-op where the OS does not allow it.
    """
    if priority == "normal" or not hasattr(os, "setpriority"):
        return
    tids = [threading.get_native_id()]
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        try:  # a thread may exit while we look
            with open(f"/proc/self/task/{tid}/comm") as f:
                if every_thread or f.read().strip() == "ts_pool_worker":
                    tids.append(int(tid))
        except OSError:
            pass
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < 19:
                os.setpriority(os.PRIO_PROCESS, tid, 19)
            if priority == "idle" and hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass


def _shared_fd(size: int) -> int:
    """A file descriptor of ``size`` zeroed bytes no path names (nothing leaks if killed)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("lavin_ckpt_state", 0)
    else:
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, max(size, 1))
    return fd


def layout(leaves: list[Any]) -> tuple[list[tuple[int, tuple[int, ...], np.dtype]], int]:
    """Each array's (offset, shape, dtype) in the buffer, 64-byte aligned, and its size."""
    specs, off = [], 0
    for x in leaves:
        dtype = np.dtype(x.dtype)
        specs.append((off, tuple(x.shape), dtype))
        off += -(-math.prod(x.shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return specs, off


def _view(buf: mmap.mmap, spec: tuple[int, tuple[int, ...], np.dtype]) -> np.ndarray:
    off, shape, dtype = spec
    return np.ndarray(shape, dtype, buffer=buf, offset=off)


def host_copies(leaves: list[Any], pinned: bool | None = None) -> list[Any]:
    """Starts every leaf's device-to-host copy before any is waited on: -> the leaves to read
    (``np.asarray``) in their place.

    ``pinned`` (None: on GPUs, as Orbax's own GPU saves do) sends the copies to the devices'
    ``pinned_host`` memory in one batched ``device_put``, DMA the GPU runs beside the step's
    kernels; otherwise ``copy_to_host_async`` into pageable memory, which the driver stages
    through a bounce buffer with the host's CPU (~2.7 GB/s, jax-ml/jax#21438). Why: on an
    H200 a save of the 0.1b's 1.6 GB state slowed its device-bound steps 19.7% in flight with
    pageable copies, 1.2% with pinned ones (the thread writer: 4.8%; BENCHMARKS.md, session
    12). Cost: JAX's pinned-host pool keeps about a state's bytes of host memory after the
    first save (as with Orbax's thread writer).
    """
    import jax

    arrays = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    if pinned is None and arrays:
        dev = next(iter(leaves[arrays[0]].devices()))
        pinned = dev.platform == "gpu" and any(
            m.kind == "pinned_host" for m in dev.addressable_memories())
    if not pinned:
        for i in arrays:
            leaves[i].copy_to_host_async()
        return leaves
    moved = jax.device_put([leaves[i] for i in arrays],
                           [leaves[i].sharding.with_memory_kind("pinned_host") for i in arrays])
    out = list(leaves)
    for i, x in zip(arrays, moved):
        out[i] = x
    return out


class WriterProcess:
    """The parent's side: stages a state in shared memory, has the child write it.

    ``stage`` and ``save`` are called by one thread at a time (the checkpointer keeps at most
    one save in flight): ``stage`` may overwrite the buffer only after the previous ``save``
    has returned (the child reads the buffer until it replies).
    """

    def __init__(self, directory: str, *, max_to_keep: int, compression: bool, priority: str):
        self.options = dict(directory=str(directory), max_to_keep=max_to_keep,
                            compression=compression, priority=priority)
        self._proc: subprocess.Popen | None = None
        self._buf: mmap.mmap | None = None
        self._size = -1
        self._send: Connection | None = None
        self._recv: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _start(self, size: int) -> None:
        """A child for a buffer of ``size`` bytes (started at the first save; again only if
        the state's size changed)."""
        self.close()
        fd = _shared_fd(size)
        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        # The child imports what this process can (its sys.path, e.g. a script's additions),
        # and never the accelerator: the parent holds it (a TPU admits one process).
        path = [p or os.getcwd() for p in sys.path]
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "lavin_jax.checkpoint_writer", str(cmd_r), str(rep_w),
                 str(fd)], pass_fds=(cmd_r, rep_w, fd), env=env)
            self._buf = mmap.mmap(fd, max(size, 1))
        except OSError as e:
            if self._proc is not None:  # started, but its buffer could not be mapped
                self._proc.kill()
                self._proc = None
            os.close(cmd_w)
            os.close(rep_r)
            raise RuntimeError(f"could not start the checkpoint writer process ({e}); set "
                               "--config.checkpoint_writer=thread to write from a thread") from e
        finally:
            for f in (cmd_r, rep_w, fd):
                os.close(f)
        self._send = Connection(cmd_w, readable=False)
        self._recv = Connection(rep_r, writable=False)
        self._size = size
        self._post(self.options)

    def stage(self, state: Any) -> tuple[Any, list]:
        """Copies ``state``'s arrays (device -> host where needed) into the buffer:
        -> (skeleton: the state's tree with each array replaced by its index, specs)."""
        import jax  # the parent has it loaded; the child must not import it before its priority

        leaves, treedef = jax.tree.flatten(state)
        specs, size = layout(leaves)
        if self._proc is not None and self._proc.poll() is not None:
            log.warning("checkpoint writer process exited (status %s) between saves; starting "
                        "a new one", self._proc.returncode)
            self._proc = None
        if size != self._size or self._proc is None:
            self._start(size)
        for x, spec in zip(host_copies(leaves), specs):
            np.copyto(_view(self._buf, spec), np.asarray(x))  # numpy drops the GIL to copy
        return jax.tree.unflatten(treedef, list(range(len(leaves)))), specs

    def save(self, step: int, staged: tuple[Any, list], data: dict | None, config: dict,
             force: bool) -> bool:
        """Has the child write ``staged`` as ``step``; blocks until it is committed. -> whether
        Orbax wrote it (its save policy may decline a step that is not forced)."""
        skeleton, specs = staged
        self._post(dict(op="save", step=step, skeleton=skeleton, specs=specs, data=data,
                        config=config, force=force))
        return bool(self._reply(step)["written"])

    def _post(self, msg: dict) -> None:
        with contextlib.suppress(OSError):  # a dead child: its reply's EOF says so
            self._send.send(msg)

    def _reply(self, step: int) -> dict:
        try:
            msg = self._recv.recv()
        except (EOFError, OSError):
            code = self._proc.wait() if self._proc else None
            self.close()  # the next save starts a new child
            raise RuntimeError(f"checkpoint writer process exited (status {code}) before step "
                               f"{step} was written; its error is in this run's stderr") from None
        if "error" in msg:
            raise RuntimeError(f"checkpoint writer process: step {step} failed:\n{msg['error']}")
        return msg

    def close(self, timeout: float = 60.0) -> None:
        """Stops the child (after the save it is writing, which the caller waited for)."""
        if self._send is None:
            return
        self._post(dict(op="close"))
        for c in (self._send, self._recv):
            c.close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._buf.close()
        self._proc = self._buf = self._send = self._recv = None
        self._size = -1


def _watch(recv: Connection, inbox: list, ready: threading.Condition) -> None:
    """The child's reader: queues the parent's messages; exits the process when the pipe
    closes without ``close`` (the parent died), whatever the main thread is writing."""
    while True:
        try:
            msg = recv.recv()
        except (EOFError, OSError):
            os._exit(1)
        with ready:
            inbox.append(msg)
            ready.notify()
        if msg.get("op") == "close":
            return


def main(argv: list[str]) -> None:
    """The child: ``python -m lavin_jax.checkpoint_writer CMD_FD REPLY_FD BUFFER_FD``."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    recv = Connection(int(argv[1]), writable=False)
    send = Connection(int(argv[2]), readable=False)
    buf_fd = int(argv[3])
    options = recv.recv()
    # Before JAX's and Orbax's threads start (they inherit it); every_thread: BLAS's, started
    # when numpy loaded.
    lower_thread_priority(options["priority"], every_thread=True)
    inbox: list[dict] = []
    ready = threading.Condition()
    threading.Thread(target=_watch, args=(recv, inbox, ready), daemon=True).start()

    import jax  # after the priority: the imports run at it too
    import orbax.checkpoint as ocp

    from lavin_jax import train_checkpoint

    # in_place (make_manager): the parent rewrites the buffer only after this save's reply.
    manager = train_checkpoint.make_manager(
        options["directory"], max_to_keep=options["max_to_keep"], async_save=False,
        compression=options["compression"], in_place=True)
    buf = mmap.mmap(buf_fd, os.fstat(buf_fd).st_size)

    def reply(msg: dict) -> None:
        try:
            send.send(msg)
        except OSError:  # the parent closed or died: nobody to write for
            os._exit(1)

    while True:
        with ready:
            ready.wait_for(lambda: inbox)
            msg = inbox.pop(0)
        if msg["op"] == "close":
            break
        try:
            arrays = [_view(buf, s) for s in msg["specs"]]
            state = jax.tree.map(arrays.__getitem__, msg["skeleton"])
            items = {"state": ocp.args.PyTreeSave(state),
                     "config": ocp.args.JsonSave(msg["config"])}
            if msg["data"] is not None:
                items["data"] = train_checkpoint.DataSave(msg["data"])
            written = manager.save(msg["step"], args=ocp.args.Composite(**items),
                                   force=msg["force"])
            manager.wait_until_finished()
            del arrays, state, items  # views of the buffer
        except Exception:  # noqa: BLE001  (reported to the parent, which raises it)
            reply(dict(error=traceback.format_exc()))
        else:
            reply(dict(written=bool(written)))
    manager.close()


if __name__ == "__main__":
    main(sys.argv)
