"""Multi-process evaluation: disjoint example blocks, the gather of metric statistics (threads
stand in for processes, a barrier for the all-gather), a 2-"process" evaluate() that writes once
and equals the 1-process result, and the same with 2 real jax.distributed processes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from configs.lavin_dit import get_config
from lavin_jax import evaluate, metrics
from lavin_jax.data.render import render_example
from lavin_jax.metrics import distributed, report

RES = 32


class FakeHosts:
    """``n`` threads as processes; ``allgather`` stacks every thread's array (a collective)."""

    def __init__(self, n: int):
        self.n, self.barrier = n, threading.Barrier(n, timeout=60)
        self.slots: list = [None] * n
        self.local = threading.local()

    def index(self) -> int:
        return self.local.index

    def allgather(self, x):
        self.slots[self.index()] = np.asarray(x)
        self.barrier.wait()
        out = np.stack(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out

    def run(self, fn):
        results, errors = [None] * self.n, []

        def body(i):
            self.local.index = i
            try:
                results[i] = fn(i)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(i,)) for i in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shard_range_blocks_are_disjoint_contiguous_and_cover(count):
    for n in range(0, 12):
        blocks = [distributed.shard_range(n, i, count) for i in range(count)]
        flat = [i for b in blocks for i in b]
        assert flat == list(range(n))  # disjoint, complete, in process order
        assert all(b.step == 1 for b in blocks)  # contiguous: noise keys = episode indices
        assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= -(-n // count)
    with pytest.raises(ValueError, match="out of range"):
        distributed.shard_range(4, 2, 2)


def test_gather_objects_unequal_sizes_in_process_order():
    hosts = FakeHosts(3)
    objs = [{"p": 0}, list(range(100)), ("x" * 7, np.arange(5))]
    got = hosts.run(lambda i: distributed.gather_objects(objs[i], hosts.allgather))
    for g in got:
        assert g[0] == objs[0] and g[1] == objs[1] and g[2][0] == objs[2][0]
        np.testing.assert_array_equal(g[2][1], objs[2][1])
    assert distributed.gather_objects(5) == [5]  # one process: no collective


def _depth_examples(n):
    rng = np.random.default_rng(0)
    truth = [rng.uniform(1, 10, (8, 8)).astype(np.float32) for _ in range(n)]
    pred = [t * rng.uniform(0.8, 1.25, t.shape).astype(np.float32) for t in truth]
    return pred, truth


@pytest.mark.parametrize("name", ["depth", "panoptic"])
def test_gathered_accumulators_equal_the_single_process_totals(name):
    hosts, n = FakeHosts(3), 7
    if name == "depth":
        pred, truth = _depth_examples(n)
        ctx = [None] * n
    else:  # dataset-level PQ: the per-segment statistics must be merged, not averaged
        task = evaluate.task_entry(get_config("demo"), name).make()
        exs = [render_example(s, RES) for s in range(n)]
        ch = [task.default_choice(e, None) for e in exs]
        truth = [task.truth(e, c) for e, c in zip(exs, ch)]
        pred = [task.baseline(e, c) if i % 2 else t
                for i, (e, c, t) in enumerate(zip(exs, ch, truth))]
        ctx = [task.context(e, c) for e, c in zip(exs, ch)]
    whole = metrics.Accumulator(name)
    for p, t, c in zip(pred, truth, ctx):
        whole.add(p, t, c)

    def proc(i):
        acc = metrics.Accumulator(name)
        for k in distributed.shard_range(n, i, 3):
            acc.add(pred[k], truth[k], ctx[k])
        distributed.gather_accumulators([acc], hosts.allgather)
        return acc

    for acc in hosts.run(proc):
        assert acc.count == n
        for k, v in whole.result().items():
            assert acc.result()[k] == pytest.approx(v, rel=1e-6), k


class Oracle:
    batch = 2

    def __call__(self, items, first_index):
        return np.stack([it[-1] for it in items])


def panoptic_oracle_eval(workdir) -> dict:
    """evaluate() of panoptic on 5 in-memory examples with the oracle predictor: its report."""
    cfg = get_config("demo")
    cfg.data.sources = {"image": "mem_images", "video": "mem_clips"}
    cfg.data.resolutions = [RES]
    sources = {"mem_images": [render_example(s, RES) for s in range(6)]}
    s = evaluate.eval_settings(cfg, dict(num_examples=5, num_pairs=1, batch_size=2))
    return evaluate.evaluate(cfg, str(workdir), ["panoptic"], jdit=None, vae=None, step=3,
                             settings=s, sources=sources, predict=Oracle())["panoptic"]


def test_two_process_evaluate_writes_once_and_matches_one_process(tmp_path, monkeypatch):
    one = panoptic_oracle_eval(tmp_path / "one")
    hosts = FakeHosts(2)
    monkeypatch.setattr(distributed, "process_info", lambda: (hosts.index(), 2))
    monkeypatch.setattr(distributed, "_default_allgather", lambda: hosts.allgather)
    two = hosts.run(lambda i: panoptic_oracle_eval(tmp_path / f"two{i}"))
    for r in two:
        assert r["num_examples"] == 5 and r["settings"]["processes"] == 2
        assert r["metrics"] == one["metrics"] and r["baseline"] == one["baseline"]
    assert report.read_report(tmp_path / "two0" / "eval" / "panoptic" / "step_3.json")
    assert (tmp_path / "two0" / "eval" / "panoptic" / "step_3.png").exists()
    assert not (tmp_path / "two1").exists()  # only process 0 writes


def test_real_two_processes_evaluate_like_one(tmp_path):
    """The same evaluation in 2 real processes (jax.distributed on 127.0.0.1, gloo): each
    evaluates its block, the statistics are all-gathered, process 0 alone writes (~6 s)."""
    import json
    import sys

    from test_multiprocess import REPO, _free_port, _launch

    one = panoptic_oracle_eval(tmp_path / "one")
    port = _free_port()
    _launch([[sys.executable, f"{REPO}/tests/eval_2proc_driver.py", f"127.0.0.1:{port}", str(i),
              str(tmp_path / f"two{i}"), str(tmp_path / f"out{i}.json")] for i in range(2)],
            [str(tmp_path / f"proc{i}.log") for i in range(2)], devices=1)
    for i in range(2):
        r = json.loads((tmp_path / f"out{i}.json").read_text())
        assert r["num_examples"] == 5 and r["processes"] == 2
        assert r["metrics"] == one["metrics"] and r["baseline"] == one["baseline"]
    assert report.read_report(tmp_path / "two0" / "eval" / "panoptic" / "step_3.json")
    assert not (tmp_path / "two1").exists()  # only process 0 writes
