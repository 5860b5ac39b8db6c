"""The evaluation JSON: one file per (task, step), ``WORKDIR/eval/<task>/step_<N>.json``.

Schema ``lavin_jax.eval/1`` (every key required; numbers that are undefined or not computed,
e.g. NaN or a metric without its network, are ``null``; the file is strict JSON)::

    {
      "schema": "lavin_jax.eval/1",
      "task": "depth",                       # lavin_jax.data.tasks name
      "step": 2000,                          # training step of the evaluated params
      "main_metric": "abs_rel",              # the task's first metric
      "higher_is_better": {"abs_rel": false, "delta1": true, "rmse": false},
      "metrics":  {"abs_rel": 0.081, "delta1": 0.93, "rmse": 0.41},   # the model
      "baseline": {"abs_rel": 0.45, "delta1": 0.24, "rmse": 3.99},    # task.baseline
      "skipped":  {},                        # metric -> why it is null (e.g. no weights given)
      "num_examples": 64,                    # query examples scored
      "settings": {...},                     # how: see REQUIRED_SETTINGS (+ anything else)
      "seconds": 12.3,                       # wall time of this task's evaluation
      "created": "2025-01-01T00:00:00+00:00"
    }

``metrics``, ``baseline`` and ``higher_is_better`` have the same keys, the task's metric names
in declared order (lavin_jax/metrics). Ratios are fractions in [0, 1], angles in degrees.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

SCHEMA = "lavin_jax.eval/1"
REQUIRED_SETTINGS = ("params", "num_pairs", "resolution", "source", "split", "seed", "cfg_scale",
                     "num_steps", "grid", "method", "metric_options")
_KEYS = ("schema", "task", "step", "main_metric", "higher_is_better", "metrics", "baseline",
         "skipped", "num_examples", "settings", "seconds", "created")


def _finite_or_none(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def make_report(task, step: int, metrics: Mapping[str, Any], baseline: Mapping[str, Any],
                skipped: Mapping[str, str], num_examples: int, settings: Mapping[str, Any],
                seconds: float) -> dict[str, Any]:
    """A schema-valid report dict for ``task`` (a Task; its declared metrics are the keys)."""
    from lavin_jax.metrics import higher_is_better

    names = list(task.metrics)
    out = {
        "schema": SCHEMA, "task": task.name, "step": int(step), "main_metric": names[0],
        "higher_is_better": {n: higher_is_better(n) for n in names},
        "metrics": {n: _finite_or_none(metrics.get(n)) for n in names},
        "baseline": {n: _finite_or_none(baseline.get(n)) for n in names},
        "skipped": dict(skipped), "num_examples": int(num_examples), "settings": dict(settings),
        "seconds": round(float(seconds), 3),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    validate_report(out)
    return out


def validate_report(r: Mapping[str, Any]) -> None:
    """Raises ValueError listing every way ``r`` departs from the schema."""
    errs = [f"missing key {k!r}" for k in _KEYS if k not in r]
    errs += [f"unexpected key {k!r}" for k in r if k not in _KEYS]
    if errs:
        raise ValueError("eval report: " + "; ".join(errs))
    if r["schema"] != SCHEMA:
        errs.append(f"schema {r['schema']!r} != {SCHEMA!r}")
    names = list(r["higher_is_better"])
    if not names or r["main_metric"] != names[0]:
        errs.append(f"main_metric {r['main_metric']!r} must be the first metric of {names}")
    for k in ("metrics", "baseline"):
        if list(r[k]) != names:
            errs.append(f"{k} keys {list(r[k])} != metric names {names}")
        bad = [n for n, v in r[k].items() if v is not None and
               (not isinstance(v, int | float) or not math.isfinite(v))]
        if bad:
            errs.append(f"{k}: values of {bad} must be finite numbers or null")
    if not all(isinstance(v, bool) for v in r["higher_is_better"].values()):
        errs.append("higher_is_better values must be booleans")
    if set(r["skipped"]) - set(names):
        errs.append(f"skipped names unknown metrics {sorted(set(r['skipped']) - set(names))}")
    missing = [k for k in REQUIRED_SETTINGS if k not in r["settings"]]
    if missing:
        errs.append(f"settings lack {missing}")
    for k in ("step", "num_examples"):
        if not isinstance(r[k], int) or r[k] < 0:
            errs.append(f"{k}={r[k]!r} must be a non-negative integer")
    if errs:
        raise ValueError("eval report: " + "; ".join(errs))


def report_path(workdir: str | os.PathLike, task: str, step: int) -> pathlib.Path:
    return pathlib.Path(workdir) / "eval" / task / f"step_{int(step)}.json"


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> pathlib.Path:
    """Validates and writes strict JSON atomically (temporary file, then rename)."""
    validate_report(report)
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    tmp.replace(p)
    return p


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    r = json.loads(pathlib.Path(path).read_text())
    validate_report(r)
    return r
