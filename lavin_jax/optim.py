"""Optimizers from config: AdamW, warmup + cosine/constant schedule, clipping, decay mask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
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


def make_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW with the schedule above and global-norm clipping (``grad_clip`` <= 0 disables)."""
    o = {**DEFAULTS, **dict(cfg)}
    unknown = sorted(set(o) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"optimizer config has unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    adam = optax.adamw(
        schedule(o), b1=o["b1"], b2=o["b2"], eps=o["eps"],
        weight_decay=o["weight_decay"], mask=decay_mask,
    )
    clip = float(o["grad_clip"])
    return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam
