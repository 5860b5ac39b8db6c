"""Optimizers from config: AdamW, warmup + cosine/constant schedule, clipping, decay mask.

Every optimizer built here ends with :func:`record_lr`, so its state holds the learning rate the
last update used (``current_lr``): the trainer logs it per group without knowing the schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

DEFAULTS = dict(
    lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
    schedule="constant", decay_steps=0, min_lr_ratio=0.0, grad_clip=1.0,
)


def default_config(**overrides: Any) -> ml_collections.ConfigDict:
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"optimizer config has unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    return ml_collections.ConfigDict({**DEFAULTS, **overrides})


def schedule(o: Mapping[str, Any]) -> optax.Schedule:
    """Linear warmup from 0, then constant or cosine decay to ``min_lr_ratio * lr``."""
    lr, warm = float(o["lr"]), int(o["warmup_steps"])
    if o["schedule"] == "constant":
        after = optax.constant_schedule(lr)
    elif o["schedule"] == "cosine":
        steps = int(o["decay_steps"])
        if steps <= 0:
            raise ValueError("optimizer.decay_steps must be > 0 for schedule='cosine'")
        after = optax.cosine_decay_schedule(lr, steps, alpha=float(o["min_lr_ratio"]))
    else:
        raise ValueError(f"optimizer.schedule={o['schedule']!r}; use 'constant' or 'cosine'")
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices/kernels only; norms, biases and embeddings vectors are exempt."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


class LrState(NamedTuple):
    count: jax.Array  # int32[]: updates made
    learning_rate: jax.Array  # float32[]: the schedule's value at the last update (at init: step 0)


def record_lr(sched: optax.Schedule) -> optax.GradientTransformation:
    """Identity on the updates; keeps ``sched(count)`` of the update just made in its state.

    Chained next to the AdamW that uses the same schedule, its count moves in step with AdamW's
    (the trainer keeps or drops the whole optimizer state of a step together).
    """

    def init(params: Any) -> LrState:
        del params
        return LrState(jnp.zeros([], jnp.int32), jnp.asarray(sched(0), jnp.float32))

    def update(updates: Any, state: LrState, params: Any = None) -> tuple[Any, LrState]:
        del params
        lr = jnp.asarray(sched(state.count), jnp.float32)
        return updates, LrState(optax.safe_increment(state.count), lr)

    return optax.GradientTransformation(init, update)


def current_lr(opt_state: Any) -> jax.Array | None:
    """The learning rate :func:`record_lr` kept in ``opt_state``, or None if it has none."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LrState))
             if isinstance(s, LrState)]
    return found[0].learning_rate if found else None


def make_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW with the schedule above and global-norm clipping (``grad_clip`` <= 0 disables),
    then :func:`record_lr` (state: ``(clip state,) adamw state, LrState``)."""
    o = {**DEFAULTS, **dict(cfg)}
    unknown = sorted(set(o) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"optimizer config has unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    sched = schedule(o)
    adam = optax.adamw(
        sched, b1=o["b1"], b2=o["b2"], eps=o["eps"],
        weight_decay=o["weight_decay"], mask=decay_mask,
    )
    clip = float(o["grad_clip"])
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    return optax.chain(*parts, adam, record_lr(sched))
