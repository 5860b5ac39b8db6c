"""Evaluation over several processes: disjoint example subsets, statistics gathered.

Each process scores a contiguous block of the eval examples (:func:`shard_range`; the episode
index keys everything random about an example, so the numbers do not depend on the process
count), then :func:`gather_accumulators` folds every process's metric statistics into one
:class:`lavin_jax.metrics.Accumulator` on every process (only process 0 writes reports).
Statistics are arbitrary trees (arrays, lists of per-example values, dicts) whose sizes differ
between processes, so they travel pickled as padded uint8 rows through
``jax.experimental.multihost_utils.process_allgather``.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# (uint8 / int64 array of this process) -> stacked [process_count, ...] array of all processes
AllGather = Callable[[np.ndarray], np.ndarray]


def shard_range(n: int, index: int, count: int) -> range:
    """Example indices of process ``index`` of ``count``: contiguous disjoint blocks that
    cover 0..n-1 in process order (late processes may get an empty block)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process index {index} out of range for {count} processes")
    per = -(-int(n) // count)
    return range(min(n, index * per), min(n, (index + 1) * per))


def process_info() -> tuple[int, int]:
    """(this process's index, process count)."""
    import jax

    return jax.process_index(), jax.process_count()


def _default_allgather() -> AllGather | None:
    import jax

    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    return lambda x: np.asarray(multihost_utils.process_allgather(x))


def gather_objects(obj: Any, allgather: AllGather | None = None) -> list[Any]:
    """``obj`` of every process, in process order (a collective: every process must call it).

    ``allgather`` defaults to ``process_allgather`` (multi-process) and to nothing (one
    process: ``[obj]``); tests pass their own."""
    allgather = allgather or _default_allgather()
    if allgather is None:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(allgather(np.asarray([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)  # same shape on every process
    buf[:data.size] = data
    rows = np.asarray(allgather(buf))
    return [pickle.loads(rows[i, :int(s)].tobytes()) for i, s in enumerate(sizes)]


def gather_accumulators(accs: Sequence[Any], allgather: AllGather | None = None) -> None:
    """Replaces each Accumulator's statistics by the sum over all processes (in place)."""
    from lavin_jax.metrics import merge

    per_process = gather_objects([(a.state, a.count) for a in accs], allgather)
    for i, acc in enumerate(accs):
        mine = [p[i] for p in per_process]
        acc.state = [functools.reduce(merge, [st[f] for st, _ in mine], None)
                     for f in range(len(acc.families))]
        acc.count = sum(c for _, c in mine)
