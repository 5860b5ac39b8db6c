"""Task metrics on decoded predictions: a registry keyed by the metric names tasks declare.

Every task (lavin_jax/data/tasks) names its metrics, main one first; a *family* computes a group
of them from one (prediction, truth) pair in task space, i.e. what ``task.decode`` and
``task.truth`` return. Families keep per-example *statistics* that add up across examples,
devices and hosts (:func:`merge`) and turn the total into numbers at the end, so dataset-level
metrics (mAP, PQ, ODS F, pooled median angle, FID) are exact and not averages of per-image
values::

    acc = Accumulator("depth")              # or a Task instance
    for pred, truth, ctx in examples:
        acc.add(pred, truth, ctx)
    acc.result()  # {"abs_rel": ..., "delta1": ..., "rmse": ...}
    compute("depth", pred, truth)          # one example

Conventions: ratios (delta1, within_*, IoUs, AP, PQ, F) are fractions in [0, 1]; angles in
degrees; images in [0, 1] (PSNR capped at ``image.PSNR_CAP`` dB). A metric that needs a network
(LPIPS, FID, FVD) is computed only when ``nets`` provides it (nothing is downloaded); otherwise
its value is None and ``acc.skipped[name]`` says why. Video tasks score every frame as its
image counterpart does (see each family). Options (``Accumulator(task, depth_align=...)``) are
listed by :func:`options_of`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np


@dataclasses.dataclass
class Nets:
    """User-given networks for the perceptual metrics (see lavin_jax/metrics/image.py).

    ``lpips``: an objectives.perceptual.FeatureNet (with LPIPS heads); ``features``: images
    float [N, H, W, 3] in [0, 1] -> embeddings [N, D] for FID / FVD (FVD embeds a clip as the
    mean of its frames' embeddings). ``describe`` is recorded in eval JSON settings.
    """

    lpips: Any = None
    features: Callable[[np.ndarray], np.ndarray] | None = None
    describe: dict[str, str] = dataclasses.field(default_factory=dict)


class Family:
    """A group of metrics computed together. Subclasses set ``names``/``higher`` and implement
    ``stats`` (one example -> mergeable statistics) and ``reduce`` (totals -> {name: float})."""

    names: ClassVar[tuple[str, ...]] = ()
    higher: ClassVar[dict[str, bool]] = {}  # higher is better, per name
    options: ClassVar[dict[str, Any]] = {}  # option name -> default

    def __init__(self, nets: Nets | None = None, **options: Any):
        self.nets = nets or Nets()
        self.opts = {**self.options, **options}

    def missing(self) -> str | None:
        """Why this family cannot run (e.g. no network given), or None."""
        return None

    def stats(self, pred: Any, truth: Any, ctx: Mapping[str, Any] | None) -> dict[str, Any]:
        raise NotImplementedError

    def reduce(self, stats: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError


def merge(a: Any, b: Any) -> Any:
    """Adds two statistics trees: arrays and numbers add, lists concatenate, dicts merge by key."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        return {k: merge(a.get(k), b.get(k)) for k in {**a, **b}}
    if isinstance(a, list):
        return a + list(b)
    return np.asarray(a) + np.asarray(b)


def _families() -> list[type[Family]]:
    from lavin_jax.metrics import dense, detection, image, masks

    return [*dense.FAMILIES, *masks.FAMILIES, *detection.FAMILIES, *image.FAMILIES]


def family_of(name: str) -> type[Family]:
    """The family that computes metric ``name``."""
    for fam in _families():
        if name in fam.names:
            return fam
    known = sorted(n for f in _families() for n in f.names)
    raise KeyError(f"no metric named {name!r}; known metrics: {known}")


def higher_is_better(name: str) -> bool:
    return family_of(name).higher[name]


def options_of(names) -> dict[str, Any]:
    """Every option (with its default) of the families computing ``names``."""
    out: dict[str, Any] = {}
    for n in names:
        out.update(family_of(n).options)
    return out


def _task(task):
    if isinstance(task, str):
        from lavin_jax.data.tasks import get_task

        return get_task(task)
    return task


class Accumulator:
    """Adds up the statistics of a task's metrics over examples; ``result()`` gives numbers."""

    def __init__(self, task, nets: Nets | None = None, names: tuple[str, ...] | None = None,
                 **options: Any):
        self.task = _task(task)
        self.names = tuple(names or self.task.metrics)
        if not self.names:
            raise ValueError(f"task {self.task.name!r} declares no metrics")
        unknown = set(options) - set(options_of(self.names))
        if unknown:
            raise ValueError(f"unknown metric option(s) {sorted(unknown)} for task "
                             f"{self.task.name!r}; known: {options_of(self.names)}")
        self.families: list[Family] = []
        for n in self.names:
            cls = family_of(n)
            if not any(type(f) is cls for f in self.families):
                own = {k: v for k, v in options.items() if k in cls.options}
                self.families.append(cls(nets, **own))
        self.skipped = {n: f.missing() for f in self.families for n in f.names
                        if f.missing() and n in self.names}
        self.state: list[Any] = [None] * len(self.families)
        self.count = 0

    def add(self, pred: Any, truth: Any, ctx: Mapping[str, Any] | None = None) -> None:
        """Scores one example (task-space prediction and truth; ``ctx`` = task.context)."""
        for i, f in enumerate(self.families):
            if f.missing() is None:
                self.state[i] = merge(self.state[i], f.stats(pred, truth, ctx))
        self.count += 1

    def merge(self, other: Accumulator) -> None:
        """Folds in another accumulator's examples (another shard / host)."""
        self.state = [merge(a, b) for a, b in zip(self.state, other.state)]
        self.count += other.count

    def result(self) -> dict[str, float | None]:
        """{metric name: value} in the declared order; None for skipped or empty."""
        out: dict[str, float | None] = {}
        for f, s in zip(self.families, self.state):
            if s is not None:
                out.update({k: float(v) for k, v in f.reduce(s).items()})
        return {n: out.get(n) for n in self.names}


def compute(task, prediction: Any, truth: Any, ctx: Mapping[str, Any] | None = None,
            nets: Nets | None = None, **options: Any) -> dict[str, float | None]:
    """The task's declared metrics of one example, {name: value} (main metric first)."""
    acc = Accumulator(task, nets, **options)
    acc.add(prediction, truth, ctx)
    return acc.result()
