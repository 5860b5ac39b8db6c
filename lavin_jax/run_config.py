"""Keys every run config has, and validation that runs before anything is compiled.

``configs/*.py`` start from :func:`base_config` (mesh, sharding rules, trainer keys) and add
their model / objective / data blocks. :func:`validate_config` prints one line per problem.
"""

from __future__ import annotations

import importlib

import ml_collections

from lavin_jax import sharding


class ConfigError(ValueError):
    """Invalid run config; the message holds one line per problem."""


def base_config() -> ml_collections.ConfigDict:
    cfg = sharding.default_config()
    cfg.seed = 0
    cfg.total_steps = 1000
    cfg.log_every_steps = 50
    cfg.checkpoint_every_steps = 500
    cfg.eval_every_steps = 1000
    cfg.sample_every_steps = 0  # 0 = no sample grids
    cfg.keep_checkpoints = 3
    cfg.async_checkpointing = True
    cfg.init_from = ""  # params-only checkpoint (lavin_jax.checkpoint format) to start from
    cfg.ema_decay = 0.0  # EMA of the first objective group's params; 0 = off
    cfg.microbatches = 1  # gradient accumulation inside one step
    cfg.max_nonfinite_streak = 20  # halt after this many skipped (non-finite) steps in a row
    cfg.profile_steps = 0  # > 0: one profiler window of this many steps
    cfg.profile_first_step = 10
    cfg.objective = ml_collections.ConfigDict({"name": ""})
    return cfg


def _check(errors: list[str], fn) -> None:
    try:
        fn()
    except (ValueError, KeyError, TypeError) as e:
        errors.extend(str(e).split("; ") if "; " in str(e) else [str(e)])


_MODEL_CONFIGS = {
    "jdit": "lavin_jax.models.jdit:JDiTConfig",
    "stvae": "lavin_jax.models.stvae:STVAEConfig",
}


def validate_config(cfg: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1
                    ) -> None:
    """Raises ConfigError listing every problem found, one per line."""
    errors: list[str] = []
    for key in ("total_steps", "log_every_steps", "checkpoint_every_steps"):
        if int(cfg.get(key, 0)) <= 0:
            errors.append(f"config.{key}={cfg.get(key)} must be a positive integer")
    _check(errors, lambda: sharding.mesh_shape(cfg, num_devices))
    _check(errors, lambda: sharding.logical_to_spec([r[0] for r in cfg.sharding.rules],
                                                    cfg.sharding.rules))
    model = cfg.get("model")
    if model is None or model.get("name") not in _MODEL_CONFIGS:
        errors.append(f"config.model.name must be one of {sorted(_MODEL_CONFIGS)}")
    else:
        module, cls = _MODEL_CONFIGS[model.name].split(":")
        _check(errors, lambda: getattr(importlib.import_module(module), cls).from_config(model))
    from lavin_jax.objectives import REGISTRY

    if cfg.objective.get("name") not in REGISTRY:
        errors.append(f"config.objective.name={cfg.objective.get('name')!r}; "
                      f"use one of {sorted(REGISTRY)}")
    data = cfg.get("data")
    if data is not None and not errors:
        _check_batch(errors, cfg, num_devices, num_processes)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _check_batch(errors: list[str], cfg, num_devices: int, num_processes: int) -> None:
    batch = int(cfg.data.global_batch)
    shape = sharding.mesh_shape(cfg, num_devices)
    spec = sharding.logical_to_spec(sharding.BATCH_NAMES, cfg.sharding.rules)
    axes = spec[0] or ()
    axes = axes if isinstance(axes, tuple) else (axes,)
    shards = 1
    for a in axes:
        shards *= shape[a]
    if batch % shards:
        errors.append(f"config.data.global_batch={batch} must be a multiple of the {shards} "
                      f"batch shards (mesh axes {axes}); change the batch or the mesh")
    if batch % num_processes:
        errors.append(f"config.data.global_batch={batch} must be a multiple of the "
                      f"{num_processes} processes")
    micro = int(cfg.get("microbatches", 1))
    if micro < 1 or batch % (micro * shards):
        errors.append(f"config.microbatches={micro}: global_batch={batch} must be a multiple of "
                      f"microbatches x batch shards = {micro * shards}")
