"""In-context behaviour, measured: task identification and metrics vs context length.

Task identification (``python -m lavin_jax.evaluate ... --task_identification``): the same
query examples are given with context pairs of each of K tasks that read the same source; a
prediction counts as right when it is nearer to the query's ground truth of the context's task
than to the query's ground truths of the other tasks. Nearness is the mean squared difference
of the *decoded prediction* and each task's *rendered query target* (uint8 RGB at the eval
resolution, compared in [0, 1]): every task renders its truth as an image of the same size, so
pixel space is the one space all tasks share (task spaces differ: a depth map, boxes, an
image), it is what the user sees, and it does not depend on the ST-VAE's latent scaling (the
latent space would also favour whatever the VAE encodes loudly). Tasks whose targets are the
same image (the restoration tasks all target the clean image) cannot be told apart: the default
set keeps the first of each such group, and for any set a task whose truth equals the
context task's truth for a query is not counted as a rival. Output: accuracy, per-task accuracy
and the confusion matrix (rows: context task, columns: nearest truth) in
WORKDIR/eval/task_identification/step_<N>.json.

Context length (``--context_lengths=1,2,4,8``): the task's metrics for each number of pairs on
the same queries with nested contexts (the n-pair context is the first n pairs of the largest
one), -> WORKDIR/eval/context_length/<task>/step_<N>.json and a printed table.

Held-out tasks need nothing special: lavin_jax/evaluate.py evaluates any task given as context
and marks tasks outside config.data.tasks ``held_out`` in the report settings.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lavin_jax import evaluate
from lavin_jax.data import episodes
from lavin_jax.metrics import distributed, higher_is_better

log = logging.getLogger(__name__)

TI_SCHEMA = "lavin_jax.task_identification/1"
CL_SCHEMA = "lavin_jax.context_length/1"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _write_json(path: pathlib.Path, obj: Mapping[str, Any]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _open(cfg, entry, s, sources: dict) -> Any:
    if entry.source not in sources:
        sources[entry.source] = evaluate.open_source(cfg, entry.source, s["split"])
    return sources[entry.source]


# ---- context length --------------------------------------------------------------------------
class PrefixSampler:
    """Episodes of ``sampler`` (drawn with the most pairs) cut to their first ``n`` pairs: the
    same query, query choice (same seed) and a nested context for every n."""

    def __init__(self, sampler: episodes.EpisodeSampler, n: int):
        self.sampler, self.n = sampler, int(n)

    def spec(self, index: int) -> episodes.EpisodeSpec:
        sp = self.sampler.spec(index)
        if self.n > sp.n_pairs:
            raise ValueError(f"context length {self.n} > the {sp.n_pairs} pairs drawn")
        return dataclasses.replace(sp, n_pairs=self.n,
                                   examples=sp.examples[:self.n] + sp.examples[-1:])


def context_length_table(cfg, workdir: str, task: str, lengths: Sequence[int], *, jdit, vae,
                         step: int, settings: Mapping[str, Any], provenance: Mapping = (),
                         sources: Mapping[str, Any] | None = None, predict=None,
                         devices=None, write: bool = True) -> dict[str, Any]:
    """``task``'s metrics for each number of context pairs in ``lengths`` on the same
    ``settings["num_examples"]`` queries; process 0 writes the JSON."""
    t0 = time.time()
    lengths = sorted({int(n) for n in lengths})
    s = {**dict(settings), "num_pairs": lengths[-1]}
    opened = dict(sources or {})
    entry = evaluate.task_entry(cfg, task)
    src = _open(cfg, entry, s, opened)
    sampler, t = evaluate.task_sampler(entry, s, len(src)), entry.make()
    predict = predict or evaluate.Predictor(jdit, vae, s, devices)
    pidx, pcount = distributed.process_info()
    rows, baseline, count = [], None, 0
    for n in lengths:
        acc, base = evaluate.evaluate_task(
            predict, t, PrefixSampler(sampler, n), src, {**s, "num_pairs": n},
            indices=distributed.shard_range(int(s["num_examples"]), pidx, pcount))
        distributed.gather_accumulators([acc, base])
        rows.append({"num_pairs": n, "metrics": _finite(acc.result())})
        baseline, count = _finite(base.result()), acc.count  # the same queries for every n
    out = {"schema": CL_SCHEMA, "task": task, "step": int(step), "main_metric": t.metrics[0],
           "higher_is_better": {m: higher_is_better(m) for m in t.metrics},
           "rows": rows, "baseline": baseline, "num_examples": count,
           "settings": {**dict(provenance), **s, "num_pairs": lengths, "source": entry.source,
                        "held_out": evaluate.held_out(cfg, task), "processes": pcount},
           "seconds": round(time.time() - t0, 3), "created": _now()}
    if write and pidx == 0:
        _write_json(pathlib.Path(workdir) / "eval" / "context_length" / task /
                    f"step_{int(step)}.json", out)
    return out


def _finite(d: Mapping[str, Any]) -> dict[str, float | None]:
    return {k: (float(v) if v is not None and np.isfinite(v) else None) for k, v in d.items()}


def format_context_table(r: Mapping[str, Any]) -> str:
    """A context_length_table result as text: one row per number of pairs."""
    names = list(r["higher_is_better"])
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    head = f"{r['task']} (step {r['step']}, {r['num_examples']} queries)\n{'pairs':>5} " + \
        " ".join(f"{n:>10}" for n in names)
    lines = [head] + [f"{row['num_pairs']:>5} " + " ".join(
        f"{fmt(row['metrics'][n]):>10}" for n in names) for row in r["rows"]]
    lines.append(f"{'base':>5} " + " ".join(f"{fmt(r['baseline'][n]):>10}" for n in names))
    return "\n".join(lines)


# ---- task identification ---------------------------------------------------------------------
def ti_tasks(cfg, tasks: Sequence[str] | None, sources: dict, s: Mapping[str, Any]
             ) -> tuple[list[episodes.TaskEntry], dict[str, str]]:
    """The entries to compare (one shared source) and {dropped task: why}.

    Default: the training image tasks on config.data.sources.image, keeping the first (in name
    order) of tasks whose rendered targets of the first query are the same image."""
    dropped: dict[str, str] = {}
    if tasks:
        entries = [evaluate.task_entry(cfg, t) for t in tasks]
        other = [e.name for e in entries if e.source != entries[0].source]
        if other:
            raise ValueError(f"task identification needs tasks of one source; {other} do not "
                             f"read {entries[0].source!r} as {entries[0].name!r} does")
    else:
        image_src = dict(cfg.data.sources).get("image")
        entries = []
        for t in sorted(dict(cfg.data.tasks)):
            e = evaluate.task_entry(cfg, t)
            if e.source == image_src and not e.make().is_video:
                entries.append(e)
        src = _open(cfg, entries[0], s, sources) if entries else None
        kept: list[tuple[episodes.TaskEntry, np.ndarray]] = []
        for e in entries:
            spec = evaluate.task_sampler(e, s, len(src)).spec(0)
            tgt = episodes.render_episode(spec, e.make(), src)["items"][-1]
            same = [k.name for k, tk in kept if np.array_equal(tk, tgt)]
            if same:
                dropped[e.name] = f"same target image as {same[0]}"
            else:
                kept.append((e, tgt))
        entries = [e for e, _ in kept]
    if len(entries) < 2:
        raise ValueError(f"task identification needs >= 2 tasks with distinct targets; got "
                         f"{[e.name for e in entries]} (dropped: {dropped})")
    return entries, dropped


def identify(predict, entries: Sequence[episodes.TaskEntry], sampler, source,
             indices: range) -> np.ndarray:
    """Confusion counts int64 [K, K] (rows: context task, columns: the task whose query truth
    is nearest the prediction) over the queries of episodes ``indices`` of ``sampler``."""
    tasks = [e.make() for e in entries]
    k = len(tasks)
    conf = np.zeros((k, k), np.int64)
    per_call = max(1, predict.batch // k)  # queries per predictor call (K episodes each)
    for q0 in range(indices.start, indices.stop, per_call):
        qs = range(q0, min(indices.stop, q0 + per_call))
        items = []
        for q in qs:
            ref = sampler.spec(q)  # one query, its examples and seed for every task
            items += [episodes.render_episode(dataclasses.replace(ref, task=t.name), t, source)
                      ["items"] for t in tasks]
        preds = np.asarray(predict(items, q0 * k), np.float32) / 255.0
        for j in range(len(qs)):
            truths = [np.asarray(items[j * k + c][-1], np.float32) / 255.0 for c in range(k)]
            for c in range(k):
                pred = preds[j * k + c]
                rivals = [o for o in range(k)
                          if o == c or not np.array_equal(truths[o], truths[c])]
                dist = {o: float(np.mean((pred - truths[o]) ** 2)) for o in rivals}
                # strict: a tie with a rival counts as wrong
                conf[c, min(rivals, key=lambda o: (dist[o], o == c))] += 1
        log.info("task identification: %d/%d queries", qs.stop - indices.start, len(indices))
    return conf


def task_identification(cfg, workdir: str, tasks: Sequence[str] | None = None, *, jdit, vae,
                        step: int, settings: Mapping[str, Any], provenance: Mapping = (),
                        sources: Mapping[str, Any] | None = None, predict=None, devices=None,
                        write: bool = True) -> dict[str, Any]:
    """Task identification over ``tasks`` (see the module doc) on ``settings["num_examples"]``
    queries -> the result dict; process 0 writes WORKDIR/eval/task_identification/step_N.json.
    """
    t0 = time.time()
    s = dict(settings)
    opened = dict(sources or {})
    entries, dropped = ti_tasks(cfg, tasks, opened, s)
    src = _open(cfg, entries[0], s, opened)
    sampler = evaluate.task_sampler(entries[0], s, len(src))
    predict = predict or evaluate.Predictor(jdit, vae, s, devices)
    pidx, pcount = distributed.process_info()
    mine = identify(predict, entries, sampler, src,
                    distributed.shard_range(int(s["num_examples"]), pidx, pcount))
    conf = sum(distributed.gather_objects(mine))
    names = [e.name for e in entries]
    rows = conf.sum(1)
    out = {"schema": TI_SCHEMA, "step": int(step), "tasks": names,
           "accuracy": float(np.trace(conf) / max(1, conf.sum())), "chance": 1.0 / len(names),
           "per_task_accuracy": {n: float(conf[i, i] / max(1, rows[i]))
                                 for i, n in enumerate(names)},
           "confusion": conf.tolist(), "num_queries": int(rows[0]), "dropped": dropped,
           "held_out": [n for n in names if evaluate.held_out(cfg, n)],
           "space": "pixels: MSE of the decoded prediction to each task's rendered query target",
           "settings": {**dict(provenance), **s, "source": entries[0].source,
                        "processes": pcount},
           "seconds": round(time.time() - t0, 3), "created": _now()}
    if write and pidx == 0:
        _write_json(pathlib.Path(workdir) / "eval" / "task_identification" /
                    f"step_{int(step)}.json", out)
    log.info("task identification step %d: accuracy %.3f over %s (chance %.3f)", step,
             out["accuracy"], names, out["chance"])
    return out


def run_task_identification(cfg, workdir: str, tasks: Sequence[str] | None = None, *,
                            step: int | None = None, vae_checkpoint: str = "",
                            flags: Mapping[str, Any] = (), models=None, **kw) -> dict[str, Any]:
    """:func:`task_identification` of the run in ``workdir`` (the demo's entry; arguments as
    lavin_jax.evaluate.demo_table)."""
    s = evaluate.eval_settings(cfg, dict(flags))
    jdit, vae, prov = models or evaluate.load_run_models(
        workdir, step, vae_checkpoint or str(cfg.data.get("vae_checkpoint", "") or ""))
    return task_identification(cfg, workdir, tasks, jdit=jdit, vae=vae,
                               step=int(prov.get("step", step or 0)), settings=s,
                               provenance=prov, **kw)


def format_confusion(r: Mapping[str, Any]) -> str:
    """The confusion matrix as text (rows: context task, columns: nearest truth)."""
    names = r["tasks"]
    label = "context \\ nearest"
    w = max(len(label), *(len(n) for n in names))
    lines = [f"task identification, step {r['step']}: accuracy {r['accuracy']:.3f} "
             f"(chance {r['chance']:.3f}, {r['num_queries']} queries per task)",
             f"{label:<{w}} " + " ".join(f"{n[:8]:>8}" for n in names)]
    lines += [f"{n:<{w}} " + " ".join(f"{v:>8d}" for v in row)
              for n, row in zip(names, r["confusion"])]
    if r.get("dropped"):
        lines.append(f"dropped: {r['dropped']}")
    return "\n".join(lines)
