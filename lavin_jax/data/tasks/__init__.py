"""Vision tasks as "input frames -> target frames" RGB renderings, a registry by name.

A task turns one source example (a dict of arrays, see below) into uint8 RGB frames the model
sees: ``inputs`` [Tin, H, W, 3] and ``targets`` [Tout, H, W, 3], drawn with the paper's
conventions (depth gray and near = bright, normals (n+1)/2, boxes/sticks/edges on black, ...).
It also says how to read a predicted target image back into task space (``decode``), what the
ground truth in that space is (``truth``), and a trivial prediction to report next to the model
(``baseline``). Metric implementations live in the eval code; a task only names its metrics.

Randomness is split from drawing so that eval can reproduce it: ``choose(example, rng)`` draws
every random choice of one rendering (a palette, the foreground class, a degradation strength,
a temporal crop, a noise seed) into a small dict, and ``draw(example, choice)`` is deterministic.
``render(example, rng) == draw(example, choose(example, rng))``. A pipeline may also build a
choice itself (e.g. ``{"cls": 7}`` so that every context pair of foreground segmentation shows
the same class).

Source example keys (a source provides a subset; a task lists what it needs in ``requires``):
  image: "image" uint8 [H,W,3]; "depth" float32 [H,W] metres (+ optional "valid" [H,W]);
  "normals" float32 [H,W,3] unit, camera frame; "semantic" uint8 [H,W] (0 = background);
  "instance" int32 [H,W] (0 = background); "boxes" float32 [N,4] (ymin,xmin,ymax,xmax in [0,1]);
  "box_classes" int32 [N]; "keypoints" float32 [N,K,3] (y, x in [0,1], visibility);
  "edges" uint8 [H,W] in {0,255}.
  clip: "frames" uint8 [T,H,W,3]; "depth" [T,H,W]; "normals" [T,H,W,3]; "instance" [T,H,W];
  "semantic" [T,H,W]; "flow" float32 [T,H,W,2] (dy, dx) pixels, frame t -> t+1.

Predictions passed to ``decode`` are [T,H,W,3] (or [H,W,3] for one frame): uint8 in [0,255] or
float in [0,1] (told apart by dtype). ``decode(pred, ctx)`` takes ``ctx = task.context(example,
choice)`` (tasks whose decoding needs no side information accept None; image tasks also accept
the raw example).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

# Modules that register tasks; imported on first registry use.
_FAMILIES = (
    "depth", "normals", "segmentation", "detection", "pose", "edges", "restoration",
    "generation", "video",
)
_REGISTRY: dict[str, type[Task]] = {}


class Task:
    """Base class; subclasses set the class fields and implement ``draw``/``truth``/``decode``."""

    name: ClassVar[str] = ""
    requires: tuple[str, ...] = ()  # example keys it reads (set per instance if options matter)
    is_video: ClassVar[bool] = False
    frames: tuple[int, int] = (1, 1)  # (input frames, target frames) of one rendering
    metrics: ClassVar[tuple[str, ...]] = ()  # metric names, the main one first
    higher_is_better: ClassVar[bool] = True  # of the main metric

    def __init__(self, **options: Any):
        unknown = set(options) - set(self.default_options())
        if unknown:
            raise ValueError(
                f"task {self.name!r}: unknown option(s) {sorted(unknown)}; "
                f"known: {sorted(self.default_options())}"
            )
        self.options = {**self.default_options(), **options}

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {}

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    # ---- the API -------------------------------------------------------------------------
    def choose(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Every random choice of one rendering (deterministic given ``rng``'s state)."""
        return {}

    def draw(self, example: Mapping[str, Any], choice: Mapping[str, Any]):
        """(inputs uint8 [Tin,H,W,3], targets uint8 [Tout,H,W,3]) for fixed choices."""
        raise NotImplementedError

    def render(self, example: Mapping[str, Any], rng: np.random.Generator):
        self.check(example)
        return self.draw(example, self.choose(example, rng))

    def context(self, example: Mapping[str, Any], choice: Mapping[str, Any] | None = None):
        """What ``decode`` needs besides the image (e.g. the depth range); small, picklable."""
        return dict(choice or {})

    def truth(self, example: Mapping[str, Any], choice: Mapping[str, Any] | None = None):
        """The ground truth in task space (what a decoded prediction is scored against)."""
        raise NotImplementedError

    def decode(self, pred: np.ndarray, ctx: Mapping[str, Any] | None = None):
        """A predicted target image [T,H,W,3] (or [H,W,3]) -> task-space prediction."""
        raise NotImplementedError

    def baseline(self, example: Mapping[str, Any], choice: Mapping[str, Any] | None = None):
        """A trivial task-space prediction, reported next to the model."""
        raise NotImplementedError

    # ---- helpers -------------------------------------------------------------------------
    def check(self, example: Mapping[str, Any]) -> None:
        missing = [k for k in self.requires if k not in example]
        if missing:
            raise ValueError(
                f"task {self.name!r} needs example key(s) {missing} (example has "
                f"{sorted(example)}); pair it with a source that provides them"
            )

    def default_choice(self, example: Mapping[str, Any], choice: Mapping[str, Any] | None):
        """``choice`` or the one a fixed seed (0) gives, for truth/baseline called without one."""
        if choice is not None:
            return dict(choice)
        return self.choose(example, np.random.default_rng(0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.options})"


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``get_task(cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no task name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    for fam in _FAMILIES:
        importlib.import_module(f"{__name__}.{fam}")


def get_task(name: str, **options: Any) -> Task:
    """A new task instance ``name`` with ``options`` (see the task class's default_options)."""
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; use one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](**options)


def all_tasks() -> tuple[str, ...]:
    """Every registered task name, sorted."""
    _load()
    return tuple(sorted(_REGISTRY))
