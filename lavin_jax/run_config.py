"""Keys every run config has, and validation that runs before anything is compiled.

``configs/*.py`` start from :func:`base_config` (mesh, sharding rules, trainer keys) and add
their model / objective / data blocks. :func:`validate_config` prints one line per problem.
"""

from __future__ import annotations

import importlib

import ml_collections
from etils import epath

from lavin_jax import sharding
from lavin_jax.checkpoint_writer import WRITER_PRIORITIES, WRITERS


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
    # Who runs Orbax's save: "process" (a child process: its Python never holds the training
    # loop's GIL) or "thread"; None (unset) = the process when the run is one process.
    cfg.checkpoint_writer = ml_collections.config_dict.placeholder(str)
    # CPU priority of the async checkpoint writer (its process or thread): "normal", "low"
    # (nice 19) or "idle" (SCHED_IDLE): the write takes idle CPU rather than the step's.
    cfg.checkpoint_writer_priority = "idle"
    # Snapshot: copy the state on its devices and let training run on while the save is
    # issued; None (unset) = whenever the copy fits beside the step's peak device memory
    # (train_checkpoint).
    cfg.checkpoint_snapshot = ml_collections.config_dict.placeholder(bool)
    # Compression: zstd on the saved state (Orbax's default; a trained float32 state shrinks
    # ~8-14%, a fresh one ~3x).
    cfg.checkpoint_compression = True
    # Host malloc: "reuse" keeps freed memory for reuse (XLA:CPU's per-step temporaries are
    # otherwise page-faulted in afresh every step), "system" leaves glibc as it is, "auto" =
    # reuse when jax runs on CPUs only (lavin_jax.hostmem; applied before the backend starts).
    cfg.host_malloc = "auto"
    cfg.init_from = ""  # params-only checkpoint (lavin_jax.checkpoint format) to start from
    # Resume also restores the data position; False restarts the data (e.g. after a change of
    # process count, which the saved position cannot follow).
    cfg.data_restore = True
    cfg.ema_decay = 0.0  # EMA of the first objective group's params; 0 = off
    cfg.microbatches = 1  # gradient accumulation inside one step
    cfg.max_nonfinite_streak = 20  # halt after this many skipped (non-finite) steps in a row
    cfg.profile_steps = 0  # > 0: one profiler window of this many steps
    cfg.profile_first_step = 10
    cfg.objective = ml_collections.ConfigDict({"name": ""})
    return cfg


def _check(errors: list[str], fn, split: bool = False) -> bool:
    """Runs ``fn``; its ValueError/KeyError/TypeError becomes an error line (``split``: one per
    "; "-joined problem, as the model configs' ``from_config`` report them). True if it failed."""
    try:
        fn()
    except (ValueError, KeyError, TypeError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        errors.extend(msg.split("; ") if split else [msg])
        return True
    return False


_MODEL_CONFIGS = {
    "jdit": "lavin_jax.models.jdit:JDiTConfig",
    "stvae": "lavin_jax.models.stvae:STVAEConfig",
}


def validate_config(cfg: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1
                    ) -> None:
    """Raises ConfigError listing every problem found, one per line (field, then the fix).

    Checks only what is cheap and needs no compile: trainer keys, mesh vs ``num_devices``,
    sharding rules, the model config, the objective name, ``init_from``, and ``config.data``
    (kind, task and dataset names, the latent cache / encoder it needs, global batch vs the
    batch shards and processes).
    """
    errors: list[str] = []
    for key in ("total_steps", "log_every_steps", "checkpoint_every_steps"):
        if int(cfg.get(key, 0)) <= 0:
            errors.append(f"config.{key}={cfg.get(key)} must be a positive integer")
    if cfg.get("checkpoint_writer_priority", "normal") not in WRITER_PRIORITIES:
        errors.append(f"config.checkpoint_writer_priority={cfg.checkpoint_writer_priority!r} "
                      f"must be one of {', '.join(WRITER_PRIORITIES)}")
    writer = cfg.get("checkpoint_writer")
    if writer not in (None, *WRITERS):
        errors.append(f"config.checkpoint_writer={writer!r} must be one of {', '.join(WRITERS)} "
                      "or unset (None: the process for single-process runs)")
    elif writer == "process" and num_processes > 1:
        errors.append(f"config.checkpoint_writer='process' needs a single-process run (this one "
                      f"has {num_processes}; Orbax's multi-host commit runs in the JAX "
                      "processes): use 'thread' or leave it unset")
    if cfg.get("checkpoint_snapshot") not in (None, True, False):
        errors.append(f"config.checkpoint_snapshot={cfg.checkpoint_snapshot!r} must be True, "
                      "False or unset (None: when the copy fits in device memory)")
    from lavin_jax.hostmem import MODES

    if cfg.get("host_malloc", "auto") not in MODES:
        errors.append(f"config.host_malloc={cfg.host_malloc!r} must be one of {', '.join(MODES)}")
    mesh_ok = not _check(errors, lambda: sharding.mesh_shape(cfg, num_devices))
    _check(errors, lambda: sharding.logical_to_spec([r[0] for r in cfg.sharding.rules],
                                                    cfg.sharding.rules))
    model = cfg.get("model")
    if model is None or model.get("name") not in _MODEL_CONFIGS:
        errors.append(f"config.model.name must be one of {sorted(_MODEL_CONFIGS)}")
    else:
        module, cls = _MODEL_CONFIGS[model.name].split(":")
        _check(errors, lambda: getattr(importlib.import_module(module), cls).from_config(model),
               split=True)
    from lavin_jax.objectives import REGISTRY, check_objective

    if cfg.objective.get("name") not in REGISTRY:
        errors.append(f"config.objective.name={cfg.objective.get('name')!r}; "
                      f"use one of {sorted(REGISTRY)}")
    else:  # its own blocks: unknown keys, sizes it cannot take
        _check(errors, lambda: check_objective(cfg.objective.name, cfg))
    init_from = str(cfg.get("init_from", "") or "")
    if init_from:
        try:
            found = epath.Path(init_from).exists()
        except Exception as e:  # e.g. gs:// without credentials or network: the backend's error
            first = (str(e).strip().splitlines() or [""])[0][:160]
            found = f"cannot be read ({type(e).__name__}: {first})"
        if found is not True:
            errors.append(f"config.init_from={init_from!r} {found or 'does not exist'}; point it "
                          f"at a params checkpoint (lavin_jax.checkpoint.save_params / "
                          f"lavin_jax.convert) or set it to ''")
    data = cfg.get("data")
    if data is not None:
        _check_data(errors, cfg)
        _check(errors, lambda: _check_batch(errors, cfg, num_devices, num_processes, mesh_ok))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


_KINDS = ("episodes", "frames", "synthetic")
_MODES = ("cache", "online", "render")


def _check_data(errors: list[str], cfg) -> None:
    """config.data: kind, mode, task / dataset names, the cache or encoder the mode reads."""
    d = cfg.data
    kind = d.get("kind")
    if kind not in _KINDS:
        errors.append(f"config.data.kind={kind!r}; use one of {list(_KINDS)}")
    if kind != "episodes":
        return
    from lavin_jax.data.sources import SOURCES
    from lavin_jax.data.tasks import all_tasks, get_task

    known = all_tasks()
    options = dict(d.get("task_options", {}) or {})
    for name in dict(d.get("tasks", {}) or {}):
        if name not in known:
            errors.append(f"config.data.tasks: unknown task {name!r}; use names from "
                          f"lavin_jax/data/tasks ({', '.join(known)})")
        else:
            try:
                get_task(name, **dict(options.get(name, {})))
            except (ValueError, TypeError) as e:
                errors.append(f"config.data.task_options.{name}: {e}")
    named = {f"config.data.sources.{k}": v for k, v in dict(d.get("sources", {}) or {}).items()}
    named.update({f"config.data.task_sources.{k}": v
                  for k, v in dict(d.get("task_sources", {}) or {}).items()})
    for field, value in named.items():
        if str(value).split("/", 1)[0] not in SOURCES:
            errors.append(f"{field}={value!r}: unknown dataset; use NAME[/CONFIG] with NAME one "
                          f"of lavin_jax/data/sources ({', '.join(sorted(SOURCES))})")
    mode = d.get("mode", "cache")
    vae = str(d.get("vae_checkpoint", "") or "")
    if mode not in _MODES:
        errors.append(f"config.data.mode={mode!r}; use one of {list(_MODES)}")
    elif mode == "cache":
        _check_cache(errors, d, vae)
    elif not vae:
        errors.append(f"config.data.mode={mode!r} encodes with config.data.vae_checkpoint, which "
                      f"is empty: set it to a trained ST-VAE params checkpoint")
    elif vae != "toy" and not epath.Path(vae).exists():
        errors.append(f"config.data.vae_checkpoint={vae!r} does not exist; train the ST-VAE "
                      f"(configs/stvae.py) or convert the released one first")


def _check_cache(errors: list[str], d, vae: str) -> None:
    """Mode "cache" reads latents `python -m lavin_jax.encode` wrote; the trainer writes none."""
    from lavin_jax.encode import cache_files, read_cache_meta

    dirs = d.get("cache_dir", "")
    if isinstance(dirs, str):
        dirs = [dirs] if dirs else []
    else:
        dirs = list(dict(dirs)) if hasattr(dirs, "items") else [x[0] for x in dirs]
    if not dirs:
        errors.append("config.data.cache_dir is empty: name the latent cache written by "
                      "`python -m lavin_jax.encode` (or set config.data.mode='online')")
    encoder = (f"with config.data.vae_checkpoint={vae!r}" if vae else
               "after setting config.data.vae_checkpoint (empty now) to a trained ST-VAE")
    for cache in dirs:
        try:
            cache_files(cache)
        except ValueError as e:  # a URL
            errors.append(str(e))
            continue
        except FileNotFoundError:
            errors.append(f"config.data.cache_dir={cache!r} holds no latent cache yet: build it "
                          f"with `python -m lavin_jax.encode --config=... --cache_dir={cache}` "
                          f"{encoder}, or set config.data.mode='online'")
            continue
        tasks = read_cache_meta(cache).get("tasks")
        if tasks is not None and tasks != list(dict(d.tasks)):
            errors.append(f"config.data.tasks={list(dict(d.tasks))} but the latent cache "
                          f"{cache} was written for {tasks}; re-run the cache job or match them")


def _check_batch(errors: list[str], cfg, num_devices: int, num_processes: int,
                 mesh_ok: bool) -> None:
    batch = int(cfg.data.get("global_batch", 0))
    if batch <= 0:
        errors.append(f"config.data.global_batch={cfg.data.get('global_batch')} must be a "
                      f"positive integer")
        return
    if batch % num_processes:
        errors.append(f"config.data.global_batch={batch} must be a multiple of the "
                      f"{num_processes} processes")
    if not mesh_ok:  # the batch shards are unknown until the mesh is fixed
        return
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
    micro = int(cfg.get("microbatches", 1))
    if micro < 1 or (micro > 1 and batch % (micro * shards)):
        errors.append(f"config.microbatches={micro}: global_batch={batch} must be a multiple of "
                      f"microbatches x batch shards = {micro * shards}")
