"""Evaluation: sample held-out episodes of each task, decode, score, write one JSON per task.

    python -m lavin_jax.evaluate --config=configs/lavin_dit.py:demo --workdir=runs/demo \
        [--task=depth --task=edges ...] [--step=N] [--num_examples=64] [--num_pairs=4] \
        [--split=test] [--resolution=64] [--batch_size=8] [--seed=1234] \
        [--lpips_weights=F --fid_weights=F] [--metric_option=depth_align=scale_shift ...] \
        [--task_identification | --context_lengths=1,2,4,8]

For every task: episodes 0..num_examples-1 of a one-task sampler (``--num_pairs`` context
pairs, one resolution, the eval ``--split`` of the task's source, ``--seed``; see
lavin_jax/data/episodes.py) are rendered; every item is encoded alone by the ST-VAE, the query
target is sampled (lavin_jax/sample.py: CFG ODE, noise keyed by episode index) and decoded,
``task.decode`` reads it back, and lavin_jax/metrics scores it against ``task.truth`` next to
``task.baseline``. Batches are split over the local devices (models replicated). The report
(schema: lavin_jax/metrics/report.py) goes to WORKDIR/eval/<task>/step_<N>.json, a grid of the
first episodes (query | prediction | truth) to step_<N>.png.
Models: the J-DiT of the run's checkpoint (EMA when kept; ``--checkpoint`` = a params
directory instead), the ST-VAE from ``--vae_checkpoint`` or ``config.data.vae_checkpoint``.
Defaults come from ``config.eval`` when the config has one (keys as the flags), then
``config.sample`` for the sampler. Multi-process: every process scores a contiguous block of
the episodes on its local devices; the metric statistics are gathered and process 0 writes
(lavin_jax/metrics/distributed.py). Also: ``--task_identification`` and ``--context_lengths=1,2,
4,8`` (lavin_jax/eval_incontext.py), :func:`demo_table` for the demo, in-training evaluation in
lavin_jax/eval_periodic.py. Tasks outside config.data.tasks are marked ``held_out`` in settings.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from lavin_jax import metrics, sample
from lavin_jax.data import episodes
from lavin_jax.data.tasks import Task
from lavin_jax.data.tasks.drawing import image_of
from lavin_jax.metrics import distributed, report

log = logging.getLogger(__name__)

GRID_ROWS = 8  # episodes shown in WORKDIR/eval/<task>/step_<N>.png
EVAL_DEFAULTS = {"num_examples": 64, "num_pairs": 4, "split": "test", "resolution": None,
                 "batch_size": 8, "seed": 1234}


def eval_settings(cfg: ml_collections.ConfigDict, flags: Mapping[str, Any]) -> dict[str, Any]:
    """Eval and sampler settings: flags over config.eval over config.sample over defaults."""
    out = {**EVAL_DEFAULTS, **sample.DEFAULT_SAMPLE}
    for block in (cfg.get("sample"), cfg.get("eval")):
        out.update({k: v for k, v in dict(block or {}).items() if k in out})
    out.update({k: v for k, v in flags.items() if v is not None})
    if out["resolution"] is None:
        out["resolution"] = list(cfg.data.resolutions)[0]
    h, w = episodes._resolution(out["resolution"])
    out["resolution"] = [h, w]
    for k in ("num_examples", "num_pairs", "batch_size"):
        if int(out[k]) < 1:
            raise ValueError(f"--{k}={out[k]} must be >= 1")
    return out


def task_entry(cfg, task: str) -> episodes.TaskEntry:
    """``task`` with its configured source and options (config.data), weight 1."""
    data = ml_collections.ConfigDict(cfg.data.to_dict())
    data.tasks = {task: 1.0}
    return episodes.task_entries(data)[0]


def task_sampler(entry: episodes.TaskEntry, s: Mapping[str, Any], source_size: int):
    """EpisodeSampler over ``entry`` alone with N = num_pairs at one resolution."""
    pairs = [0.0] * (int(s["num_pairs"]) - 1) + [1.0]
    return episodes.EpisodeSampler([entry], {entry.source: source_size}, pairs,
                                   [s["resolution"]], None, int(s["seed"]))


def query_choice(task: Task, spec: episodes.EpisodeSpec, source) -> tuple[Any, dict]:
    """The query example and its random choice, as render_episode draws it (first from the
    episode's rng), so truth / context match the rendered query target."""
    query = source[spec.examples[-1]]
    return query, task.choose(query, np.random.default_rng(spec.seed))


def _to_truth_size(pred: np.ndarray, query, res: tuple[int, int]) -> np.ndarray:
    """A predicted target [T, h, w, 3] at the eval resolution -> the query's own size."""
    h0, w0 = image_of(query).shape[1:3]
    if (h0, w0) == tuple(res):
        return pred
    if h0 * res[1] != w0 * res[0]:
        raise ValueError(f"query examples are {h0}x{w0} but --resolution={list(res)} has "
                         "another aspect ratio: evaluate at the source's aspect ratio")
    return episodes.resize_frames(pred, (h0, w0))


class Predictor:
    """Episodes' items -> predicted query targets (uint8), batched over local devices."""

    def __init__(self, jdit, vae, s: Mapping[str, Any], devices: Sequence[Any] | None = None):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devs = list(devices or jax.local_devices())
        self.num_devices = len(devs)
        self.batch = -(-int(s["batch_size"]) // len(devs)) * len(devs)
        mesh = Mesh(np.asarray(devs), ("batch",))
        sharding = NamedSharding(mesh, PartitionSpec("batch")) if len(devs) > 1 else None
        if sharding is not None:
            jdit, vae = sample.replicate(jdit, mesh), sample.replicate(vae, mesh)
        self.jdit, self.codec, self.sharding = jdit, sample.Codec(vae, sharding), sharding
        sample.check_size(*s["resolution"], jdit, vae)
        self.opts = {k: s[k] for k in sample.DEFAULT_SAMPLE}
        self.seed = int(s["seed"])

    def __call__(self, items: list[list[np.ndarray]], first_index: int) -> np.ndarray:
        """items[b] = [in_1, tgt_1, ..., query_in, query_tgt] -> uint8 [B, T, H, W, 3]."""
        lat = [self.codec.encode(np.stack([it[k] for it in items]), self.batch)
               for k in range(len(items[0]))]
        cond = np.concatenate(lat[:-1], axis=1)
        z = sample.sample_targets(self.jdit, cond, lat[-1].shape[1], seed=self.seed,
                                  first_index=first_index, batch_size=self.batch,
                                  sharding=self.sharding, **self.opts)
        return self.codec.decode(z, self.batch)


def evaluate_task(predict: Predictor, task: Task, sampler, source, s: Mapping[str, Any],
                  nets: metrics.Nets | None = None, metric_options: Mapping[str, Any] = (),
                  indices: range | None = None, grid: list | None = None):
    """(model Accumulator, baseline Accumulator) over episodes ``indices`` (default: 0 ..
    ``s["num_examples"]`` - 1, a contiguous range: the episode index keys the noise).

    ``grid``: a list that gets [query input, prediction, truth] uint8 [H, W, 3] rows (first
    frames) of the first GRID_ROWS episodes."""
    opts = dict(metric_options)
    names = set(task.metrics)
    opts = {k: v for k, v in opts.items() if k in metrics.options_of(names)}
    acc = metrics.Accumulator(task, nets, **opts)
    base = metrics.Accumulator(task, nets, **opts)
    idx = range(int(s["num_examples"])) if indices is None else indices
    for start in range(idx.start, idx.stop, predict.batch):
        specs = [sampler.spec(i) for i in range(start, min(idx.stop, start + predict.batch))]
        items = [episodes.render_episode(sp, task, source)["items"] for sp in specs]
        preds = predict(items, start)
        for sp, it, pred in zip(specs, items, preds):
            query, choice = query_choice(task, sp, source)
            ctx, truth = task.context(query, choice), task.truth(query, choice)
            acc.add(task.decode(_to_truth_size(pred, query, sp.resolution), ctx), truth, ctx)
            base.add(task.baseline(query, choice), truth, ctx)
            if grid is not None and len(grid) < GRID_ROWS:
                grid.append([it[-2][-1], pred[0], it[-1][0]])
        log.info("%s: %d/%d episodes", task.name, start + len(specs) - idx.start, len(idx))
    return acc, base


def open_source(cfg, name: str, split: str):
    from lavin_jax.data import prepare

    prepare.ensure_prepared(name, cfg.data.data_dir)
    return prepare.load_source(name, cfg.data.data_dir, split)


def held_out(cfg, task: str) -> bool:
    """True when ``task`` is not in the training mixture (config.data.tasks): it is seen only
    as context at eval time (config.data.held_out_tasks lists such tasks explicitly)."""
    listed = task in list(cfg.data.get("held_out_tasks") or ())
    if listed and task in dict(cfg.data.tasks):
        raise ValueError(f"config.data.held_out_tasks and config.data.tasks both name {task!r}; "
                         "remove it from one of them")
    return task not in dict(cfg.data.tasks)


def evaluate(cfg: ml_collections.ConfigDict, workdir: str, tasks: Sequence[str], *, jdit, vae,
             step: int, settings: Mapping[str, Any], provenance: Mapping[str, Any] = (),
             nets: metrics.Nets | None = None, metric_options: Mapping[str, Any] = (),
             sources: Mapping[str, Any] | None = None, write: bool = True,
             devices: Sequence[Any] | None = None, predict: Predictor | None = None
             ) -> dict[str, dict]:
    """Evaluates ``tasks`` -> {task: report}; process 0 writes WORKDIR/eval/<task>/step_<step>
    .json and .png. Every process scores its block of the examples on its local devices
    (``devices``, default all local ones); the statistics are gathered (a collective: every
    process calls this with the same arguments). ``sources`` ({source name: examples})
    replaces opening the configured ones (tests); ``predict`` replaces the model (tests)."""
    s = dict(settings)
    predict = predict or Predictor(jdit, vae, s, devices)
    opened = dict(sources or {})
    pidx, pcount = distributed.process_info()
    out = {}
    for name in tasks:
        t0 = time.time()
        entry = task_entry(cfg, name)
        if entry.source not in opened:
            opened[entry.source] = open_source(cfg, entry.source, s["split"])
        src = opened[entry.source]
        sampler, task = task_sampler(entry, s, len(src)), entry.make()
        grid: list = []
        acc, base = evaluate_task(predict, task, sampler, src, s, nets, metric_options,
                                  distributed.shard_range(int(s["num_examples"]), pidx, pcount),
                                  grid)
        distributed.gather_accumulators([acc, base])
        used = {k: v for k, v in dict(metric_options).items()
                if k in metrics.options_of(task.metrics)}
        settings_out = {**dict(provenance), **s, "source": entry.source,
                        "task_options": dict(entry.options), "held_out": held_out(cfg, name),
                        "devices": getattr(predict, "num_devices", 1) * pcount,
                        "processes": pcount,
                        "metric_options": {**metrics.options_of(task.metrics), **used},
                        "nets": dict(nets.describe) if nets else {}}
        settings_out.setdefault("params", "params")
        rep = report.make_report(task, step, acc.result(), base.result(), acc.skipped,
                                 acc.count, settings_out, time.time() - t0)
        if write and pidx == 0:
            path = report.write_report(report.report_path(workdir, name, step), rep)
            if grid:
                write_grid(path.with_suffix(".png"), grid)
        out[name] = rep
        log.info("%s step %d: %s (baseline %s)", name, step, rep["metrics"], rep["baseline"])
    return out


def write_grid(path, rows: list[list[np.ndarray]]) -> None:
    """Rows of uint8 [H, W, 3] tiles (query | prediction | truth) -> one PNG."""
    from PIL import Image

    Image.fromarray(sample.make_grid(rows)).save(path)


# ---- the demo's table ------------------------------------------------------------------------
def load_run_models(workdir: str, step: int | None = None, vae_checkpoint: str = "",
                    checkpoint: str = "", dtype: str = ""):
    """(jdit, vae, provenance) of a J-DiT run (EMA params when kept) or a params checkpoint."""
    margs = argparse.Namespace(workdir="" if checkpoint else str(workdir), step=step,
                               checkpoint=checkpoint, vae_checkpoint=vae_checkpoint, dtype=dtype)
    jdit, vae, _, prov = sample.load_models(margs)
    return jdit, vae, prov


def demo_table(cfg: ml_collections.ConfigDict, workdir: str, tasks: Sequence[str] | None = None,
               *, step: int | None = None, vae_checkpoint: str = "",
               flags: Mapping[str, Any] = (), models=None, **kw) -> list[dict[str, Any]]:
    """Evaluates ``tasks`` (default: config.eval.tasks, else the training tasks) of the run in
    ``workdir`` and returns one row per task: {task, metric (the main one), value, baseline,
    higher_is_better, beats_baseline, held_out}. ``flags`` override config.eval
    (num_examples, ...); ``models`` = (jdit, vae, provenance) skips loading; ``kw`` goes to
    :func:`evaluate` (sources, devices, ...)."""
    s = eval_settings(cfg, dict(flags))
    jdit, vae, prov = models or load_run_models(
        workdir, step, vae_checkpoint or str(cfg.data.get("vae_checkpoint", "") or ""))
    tasks = list(tasks or default_tasks(cfg))
    reps = evaluate(cfg, workdir, tasks, jdit=jdit, vae=vae, settings=s, provenance=prov,
                    step=int(prov.get("step", step or 0)), **kw)
    return [table_row(r) for r in reps.values()]


def table_row(rep: Mapping[str, Any]) -> dict[str, Any]:
    """A report's main metric as a demo-table row; when it has no value (FID without the
    user's network weights) the first metric that has one stands in."""
    m = rep["main_metric"]
    if rep["metrics"].get(m) is None:
        m = next((k for k, v in rep["metrics"].items() if v is not None), m)
    v, b, hib = rep["metrics"][m], rep["baseline"][m], rep["higher_is_better"][m]
    beats = None if v is None or b is None else bool(v > b if hib else v < b)
    return {"task": rep["task"], "metric": m, "value": v, "baseline": b, "higher_is_better": hib,
            "beats_baseline": beats, "held_out": bool(rep["settings"].get("held_out", False))}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """demo_table rows as an aligned text table."""
    def num(v):
        return "-" if v is None else f"{v:.4g}"

    lines = [f"{'task':<24} {'metric':<10} {'model':>10} {'baseline':>10}  better  beats"]
    for r in rows:
        mark = {True: "yes", False: "NO", None: "-"}[r.get("beats_baseline")]
        name = r["task"] + (" (held out)" if r.get("held_out") else "")
        better = "higher" if r["higher_is_better"] else "lower"
        lines.append(f"{name:<24} {r['metric']:<10} {num(r['value']):>10} "
                     f"{num(r['baseline']):>10}  {better:<6}  {mark}")
    return "\n".join(lines)


def default_tasks(cfg) -> list[str]:
    """config.eval.tasks, else the training tasks (config.data.tasks)."""
    return list((cfg.get("eval") or {}).get("tasks") or sorted(dict(cfg.data.tasks)))


def task_identification_accuracy(cfg, workdir: str, **kw) -> float:
    """Task identification accuracy of the run (see lavin_jax/eval_incontext.py)."""
    from lavin_jax import eval_incontext

    return eval_incontext.run_task_identification(cfg, workdir, **kw)["accuracy"]


def _option(text: str) -> tuple[str, Any]:
    key, eq, val = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"--metric_option={text!r}: use NAME=VALUE")
    try:
        return key, ast.literal_eval(val)
    except (ValueError, SyntaxError):
        return key, val


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavin_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="FILE.py:VARIANT (configs/lavin_dit.py:demo)")
    p.add_argument("--workdir", required=True, help="run directory (reports go to WORKDIR/eval)")
    p.add_argument("--task", action="append", default=[], help="task (repeatable; default: "
                   "config.eval.tasks, else config.data.tasks)")
    p.add_argument("--step", type=int, default=None, help="run step (default: latest)")
    p.add_argument("--checkpoint", default="", help="params dir to evaluate instead of the run's")
    p.add_argument("--vae_checkpoint", default="", help="default: config.data.vae_checkpoint")
    for k in ("num_examples", "num_pairs", "batch_size", "seed", "num_steps"):
        p.add_argument(f"--{k}", type=int, default=None)
    for k in ("cfg_scale", "shift"):
        p.add_argument(f"--{k}", type=float, default=None)
    for k in ("split", "grid", "method"):
        p.add_argument(f"--{k}", default=None)
    p.add_argument("--resolution", type=int, default=None, help="square eval size in pixels")
    p.add_argument("--dtype", default="", help="J-DiT compute dtype override")
    p.add_argument("--lpips_weights", default="", help="LPIPS FeatureNet file (.npz/.safetensors)")
    p.add_argument("--fid_weights", default="", help="feature network for FID/FVD (same format)")
    p.add_argument("--metric_option", type=_option, action="append", default=[],
                   help="NAME=VALUE metric option, e.g. depth_align=scale_shift")
    p.add_argument("--task_identification", action="store_true", help="task identification "
                   "accuracy over --task (default: the training image tasks with distinct "
                   "targets) -> WORKDIR/eval/task_identification/step_<N>.json")
    p.add_argument("--context_lengths", type=_ints, default=None, help="e.g. 1,2,4,8: metrics "
                   "vs number of context pairs per --task -> WORKDIR/eval/context_length/")
    return p


def _ints(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated integers") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need pair counts >= 1")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from lavin_jax import eval_incontext
    from lavin_jax.metrics.image import load_nets
    from lavin_jax.tools.bench_jdit import load_config

    try:
        cfg = load_config(args.config)
        flags = {k: getattr(args, k) for k in
                 (*EVAL_DEFAULTS, *sample.DEFAULT_SAMPLE) if getattr(args, k, None) is not None}
        s = eval_settings(cfg, flags)
        vae_dir = args.vae_checkpoint or str(cfg.data.get("vae_checkpoint", "") or "")
        jdit, vae, prov = load_run_models(args.workdir, args.step, vae_dir, args.checkpoint,
                                          args.dtype)
        step = int(prov.get("step", args.step or 0))
        common = dict(jdit=jdit, vae=vae, step=step, settings=s, provenance=prov)
        if args.task_identification:
            r = eval_incontext.task_identification(cfg, args.workdir, args.task or None, **common)
            print(eval_incontext.format_confusion(r))
            print(json.dumps({"accuracy": r["accuracy"], "chance": r["chance"]}))
            return 0
        tasks = args.task or default_tasks(cfg)
        if args.context_lengths:
            for t in tasks:
                r = eval_incontext.context_length_table(cfg, args.workdir, t,
                                                        args.context_lengths, **common)
                print(eval_incontext.format_context_table(r))
            return 0
        nets = load_nets(args.lpips_weights, args.fid_weights)
        reps = evaluate(cfg, args.workdir, tasks, nets=nets,
                        metric_options=dict(args.metric_option), **common)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table([table_row(r) for r in reps.values()]))
    print(json.dumps({t: {"main": r["main_metric"], "value": r["metrics"][r["main_metric"]],
                          "baseline": r["baseline"][r["main_metric"]]} for t, r in reps.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
