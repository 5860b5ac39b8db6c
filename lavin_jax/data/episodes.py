"""Episodes: a task, N context pairs and a query of that task, at one resolution.

Everything about episode ``i`` is drawn from ``np.random.default_rng([seed, i])``, so any episode
can be regenerated from its index alone (the latent cache stores indices, eval re-renders them):
the task (by the mixture weights), N (by the pair-count weights), the resolution (by the
resolution weights), the N + 1 source examples (context first, the query last) and the seed of
the task's random choices. Rendering (:func:`render_episode`) turns a spec into uint8 frames,
``items`` = [in_1, tgt_1, ..., in_N, tgt_N, query_in, query_tgt], each [T, H, W, 3]: the J-DiT's
cond frames are every item but the last, the target is the last.

Config (``cfg.data``): ``tasks`` {name: weight}, ``task_options`` {name: {option: value}},
``sources`` {"image": "NAME[/CONFIG]", "video": ...} (the source a task of that kind reads;
``task_sources`` {name: source} overrides), ``pairs`` weights for N = 1, 2, ...,
``resolutions`` (square sizes or [h, w]) with ``resolution_weights``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from lavin_jax.data.tasks import Task, get_task

SPARES = 8  # extra example draws per episode (foreground: context examples showing the class)


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    name: str
    source: str
    weight: float
    options: tuple[tuple[str, Any], ...] = ()

    def make(self) -> Task:
        return get_task(self.name, **dict(self.options))


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    index: int
    task_id: int
    task: str
    source: str
    n_pairs: int
    resolution: tuple[int, int]  # (H, W) pixels
    examples: tuple[int, ...]  # N context examples, then the query
    spares: tuple[int, ...]  # replacements for context examples that cannot show the choice
    seed: int  # the task's random choices


def _weights(w: Sequence[float], what: str) -> np.ndarray:
    w = np.asarray([float(v) for v in w], np.float64)
    if w.size == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"config.data.{what}={list(w)}: need non-negative weights, sum > 0")
    return w / w.sum()


def _resolution(r: Any) -> tuple[int, int]:
    if isinstance(r, int | np.integer):
        return int(r), int(r)
    h, w = (int(v) for v in r)
    return h, w


def task_entries(data: ml_collections.ConfigDict) -> list[TaskEntry]:
    """The mixture in task-name order (the task id is the position) with each task's source."""
    entries = []
    overrides = dict(data.get("task_sources", {}) or {})
    options = dict(data.get("task_options", {}) or {})
    for name, weight in sorted(dict(data.tasks).items()):
        opts = tuple(sorted(dict(options.get(name, {})).items()))
        task = get_task(name, **dict(opts))
        kind = "video" if task.is_video else "image"
        source = overrides.get(name) or dict(data.sources).get(kind)
        if not source:
            raise ValueError(f"config.data.tasks: {name!r} is a {kind} task but config.data."
                             f"sources has no {kind!r} entry; add one or set task_sources.{name}")
        entries.append(TaskEntry(name, str(source), float(weight), opts))
    if not entries:
        raise ValueError("config.data.tasks is empty: name at least one task with a weight")
    return entries


class EpisodeSampler:
    """index -> EpisodeSpec, a pure function of (seed, index)."""

    def __init__(self, tasks: Sequence[TaskEntry], source_sizes: Mapping[str, int],
                 pairs: Sequence[float], resolutions: Sequence[Any],
                 resolution_weights: Sequence[float] | None = None, seed: int = 0):
        self.tasks = list(tasks)
        self.task_p = _weights([t.weight for t in self.tasks], "tasks")
        self.pairs_p = _weights(pairs, "pairs")
        self.resolutions = [_resolution(r) for r in resolutions]
        self.res_p = _weights(resolution_weights or [1.0] * len(self.resolutions),
                              "resolution_weights")
        if len(self.res_p) != len(self.resolutions):
            raise ValueError(f"config.data.resolution_weights has {len(self.res_p)} entries for "
                             f"{len(self.resolutions)} resolutions")
        for t in self.tasks:
            if source_sizes.get(t.source, 0) < 1:
                raise ValueError(f"source {t.source!r} (task {t.name!r}) has no examples")
        self.source_sizes = dict(source_sizes)
        self.seed = int(seed)

    @classmethod
    def from_config(cls, data: ml_collections.ConfigDict, source_sizes: Mapping[str, int]
                    ) -> EpisodeSampler:
        return cls(task_entries(data), source_sizes, data.pairs, data.resolutions,
                   data.get("resolution_weights"), data.seed)

    @property
    def max_pairs(self) -> int:
        return int(np.nonzero(self.pairs_p)[0].max()) + 1

    def spec(self, index: int) -> EpisodeSpec:
        rng = np.random.default_rng([self.seed, int(index)])
        tid = int(rng.choice(len(self.tasks), p=self.task_p))
        n = int(rng.choice(len(self.pairs_p), p=self.pairs_p)) + 1
        res = self.resolutions[int(rng.choice(len(self.resolutions), p=self.res_p))]
        task = self.tasks[tid]
        size = self.source_sizes[task.source]
        k = n + 1 + SPARES
        ex = rng.choice(size, size=k, replace=size < k)
        return EpisodeSpec(
            index=int(index), task_id=tid, task=task.name, source=task.source, n_pairs=n,
            resolution=res, examples=tuple(int(e) for e in ex[: n + 1]),
            spares=tuple(int(e) for e in ex[n + 1:]), seed=int(rng.integers(2**63)),
        )


# ------------------------------------------------------------------------------------------
# Rendering.


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, h, w, 3]: centre crop to the aspect ratio, then bicubic
    (antialiased when shrinking, like the release's preprocessing)."""
    h, w = size
    t, fh, fw, _ = frames.shape
    if (fh, fw) == (h, w):
        return frames
    if fh * w != fw * h:  # crop the longer side
        ch, cw = (fh, fh * w // h) if fw * h > fh * w else (fw * h // w, fw)
        y0, x0 = (fh - ch) // 2, (fw - cw) // 2
        frames = frames[:, y0:y0 + ch, x0:x0 + cw]
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i] = np.asarray(Image.fromarray(frames[i]).resize((w, h), Image.BICUBIC))
    return out


def _shared_key(task: Task) -> tuple[str, str] | None:
    """(choice key, example key) a whole episode must agree on, if any: foreground
    segmentation shows the query's class (or instance) in every context pair."""
    if task.name == "foreground":
        return task._pick, task._key
    return None


def render_episode(spec: EpisodeSpec, task: Task, source: Sequence[Mapping[str, Any]]
                   ) -> dict[str, Any]:
    """Renders ``spec`` -> {"items": [in_1, tgt_1, ..., query_in, query_tgt] uint8 [T,H,W,3],
    "examples": the example indices used (context, then query)}."""
    rng = np.random.default_rng(spec.seed)
    shared = _shared_key(task)
    query = source[spec.examples[-1]]
    task.check(query)
    q_choice = task.choose(query, rng)
    spares = list(spec.spares)
    used, pairs = [], []
    for e in spec.examples[:-1]:
        ex = source[e]
        task.check(ex)
        choice = task.choose(ex, rng)
        if shared is not None:
            key, field = shared
            want = q_choice[key]
            while not np.any(np.asarray(ex[field]) == want) and spares:
                e = spares.pop(0)  # this example cannot show the query's class: take a spare
                ex = source[e]
            choice = {**choice, key: want}
        used.append(e)
        pairs.append(task.draw(ex, choice))
    pairs.append(task.draw(query, q_choice))
    used.append(spec.examples[-1])
    items = []
    for inp, tgt in pairs:
        items.append(resize_frames(np.asarray(inp, np.uint8), spec.resolution))
        items.append(resize_frames(np.asarray(tgt, np.uint8), spec.resolution))
    return {"items": items, "examples": used}


def item_frames(task: Task, n_pairs: int) -> list[int]:
    """Pixel frames of each item of an episode, in item order (from the task's frame counts)."""
    tin, tout = task.frames
    return [tin, tout] * (n_pairs + 1)
