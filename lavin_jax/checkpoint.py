"""Params-only checkpoints: what the converter writes and the trainer / sampler load.

Layout (an Orbax CheckpointManager directory, one step, default 0)::

    DIR/<step>/<model>/      one StandardCheckpointHandler item per model ("jdit", "stvae", ...),
                             holding that model's nnx.to_pure_dict(nnx.state(model, nnx.Param))
    DIR/<step>/metadata/     a JSON item: {"format", "version", "items": [...],
                             "configs": {model: constructor config}, ...anything else}

Every model is its own item so a sampler that needs only the J-DiT never reads the VAE. The
config stored per model is what :func:`load_model` rebuilds the module from.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

FORMAT = "lavin_jax.params"
VERSION = 1
META = "metadata"


def _config_to_json(cfg: Any) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _jdit_factory(cfg_dict: Mapping[str, Any]) -> Callable[[], nnx.Module]:
    from lavin_jax.models.jdit import JDiT, JDiTConfig

    cfg = JDiTConfig.from_config(dict(cfg_dict))
    return lambda: JDiT(cfg, rngs=nnx.Rngs(0))


def _stvae_factory(cfg_dict: Mapping[str, Any]) -> Callable[[], nnx.Module]:
    from lavin_jax.models.stvae import STVAE, STVAEConfig

    cfg = STVAEConfig.from_config(dict(cfg_dict))
    return lambda: STVAE(cfg, rngs=nnx.Rngs(0))


# Model name -> (config dict -> zero-arg constructor).
MODEL_FACTORIES: dict[str, Callable[[Mapping[str, Any]], Callable[[], nnx.Module]]] = {
    "jdit": _jdit_factory,
    "stvae": _stvae_factory,
}


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey (namedtuple), SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def tree_mismatches(want: Any, got: Any, sep: str = "/") -> list[str]:
    """What keeps ``got`` from filling ``want``: shape differences, then missing and unexpected
    leaves, one short phrase each (paths joined by ``sep``).

    ``want``: the target tree (arrays or ShapeDtypeStructs); ``got``: arrays, or a saved tree's
    Orbax metadata (its namedtuples read back as dicts, tuples as lists: paths compare by names).
    """
    def shapes(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {sep.join(map(_key_name, path)): tuple(getattr(x, "shape", ())) for path, x in flat}

    w, g = shapes(want), shapes(got)
    return ([f"{k} has shape {g[k]}, needs {v}" for k, v in w.items() if k in g and g[k] != v]
            + [f"missing {k}" for k in w if k not in g]
            + [f"unexpected {k}" for k in g if k not in w])


def absolute_path(path: str | pathlib.Path) -> epath.Path:
    """``path`` made absolute for Orbax (which rejects relative local paths); ``gs://`` and other
    URLs are absolute already (``pathlib`` would mangle them into local paths)."""
    p = epath.Path(path)
    return p if p.is_absolute() else p.absolute()


def _manager(directory: str | pathlib.Path, items, *, read_only: bool) -> ocp.CheckpointManager:
    handlers = {META: ocp.JsonCheckpointHandler()}
    handlers.update({name: ocp.StandardCheckpointHandler() for name in items})
    # Readers open with create=False and never save (read_only=True only adds log warnings).
    options = ocp.CheckpointManagerOptions(create=not read_only, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        absolute_path(directory), item_handlers=handlers, options=options
    )


def save_params(
    directory: str | pathlib.Path,
    params: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    step: int = 0,
) -> epath.Path:
    """Writes ``params`` ({model name: pure dict of arrays}) and JSON ``metadata``.

    ``metadata["configs"][name]`` should hold each model's config (a dict or dataclass) so that
    :func:`load_model` can rebuild it. Returns the step directory.
    """
    if not params:
        raise ValueError("save_params: nothing to save (params is empty)")
    bad = [n for n in params if n == META or not n.isidentifier()]
    if bad:
        raise ValueError(f"save_params: invalid model names {bad} (identifiers, not {META!r})")
    meta = dict(metadata or {})
    meta["configs"] = {k: _config_to_json(v) for k, v in dict(meta.get("configs", {})).items()}
    meta.update(format=FORMAT, version=VERSION, items=sorted(params))
    mngr = _manager(directory, params, read_only=False)
    if step in mngr.all_steps():
        raise FileExistsError(
            f"{directory} already holds step {step}; pick another directory or delete it"
        )
    args = {name: ocp.args.StandardSave(tree) for name, tree in params.items()}
    mngr.save(step, args=ocp.args.Composite(**args, **{META: ocp.args.JsonSave(meta)}))
    mngr.wait_until_finished()
    mngr.close()
    return epath.Path(directory) / str(step)


def _open(directory: str | pathlib.Path, step: int | None):
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    mngr = _manager(directory, (), read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(
            f"no checkpoint step {'' if step is None else step} in {directory}; write one with "
            "`python -m lavin_jax.convert --out DIR` or a training run"
        )
    meta = mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    mngr.close()
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a {FORMAT} checkpoint (metadata format "
                         f"{meta.get('format')!r})")
    return step, meta


def load_metadata(directory: str | pathlib.Path, *, step: int | None = None) -> dict:
    """The JSON metadata of a params checkpoint (latest step by default)."""
    return _open(directory, step)[1]


def load_params(
    directory: str | pathlib.Path,
    abstract: Mapping[str, Any] | None = None,
    *,
    step: int | None = None,
) -> tuple[dict[str, Any], dict]:
    """Reads params and metadata.

    ``abstract`` ({model name: tree of jax.ShapeDtypeStruct, with ``sharding`` to restore
    sharded}) restores only those models; ``None`` restores every model as numpy arrays.
    """
    step, meta = _open(directory, step)
    names = list(meta["items"]) if abstract is None else list(abstract)
    missing = sorted(set(names) - set(meta["items"]))
    if missing:
        raise KeyError(f"{directory}: no model(s) {missing}; it holds {meta['items']}")
    mngr = _manager(directory, names, read_only=True)
    if abstract is None:
        item_meta = mngr.item_metadata(step)
        abstract = {
            n: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), item_meta[n].tree)
            for n in names
        }
    args = {n: ocp.args.StandardRestore(abstract[n]) for n in names}
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
    mngr.close()
    return {n: restored[n] for n in names}, meta


def module_from_params(
    ctor: Callable[[], nnx.Module],
    params: Mapping[str, Any],
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
) -> nnx.Module:
    """Builds ``ctor()`` abstractly and fills its nnx.Param state from a pure dict of arrays.

    Nothing is randomly initialised (non-Param variables take their constructor values). With
    ``mesh`` (and ``rules``) each array is placed by its logical names; otherwise on the default
    device. Shapes must match exactly.
    """
    from lavin_jax import sharding

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(ctor)
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        # Non-Param state (e.g. the ST-VAE's latent stats) is not stored: it comes from the
        # constructor (i.e. the config). Jitted, XLA drops the unused parameter inits.
        @jax.jit
        def init_rest():
            with nnx.use_eager_sharding(False):
                return nnx.to_pure_dict(nnx.split(ctor(), nnx.Param, ...)[2])

        rest_vals = init_rest()
        if mesh is not None:
            rest_vals = jax.device_put(
                rest_vals, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        nnx.replace_by_pure_dict(rest, rest_vals)
    want = nnx.to_pure_dict(state)
    flat_want = dict(nnx.traversals.flatten_mapping(want))
    flat_got = dict(nnx.traversals.flatten_mapping(dict(params)))
    problems = tree_mismatches(want, dict(params), sep=".")
    if problems:
        raise ValueError("params do not fit the model: " + "; ".join(problems[:20]))
    if mesh is not None:
        shards = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
        flat_shard = dict(nnx.traversals.flatten_mapping(shards))
    filled = {}
    for k, v in flat_want.items():
        val = flat_got[k]
        val = val if val.dtype == v.dtype else val.astype(v.dtype)
        filled[k] = jax.device_put(val, flat_shard[k] if mesh is not None else None)
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(filled))
    return nnx.merge(graphdef, state, rest)


def load_model(
    directory: str | pathlib.Path,
    name: str = "jdit",
    *,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    **overrides: Any,
) -> nnx.Module:
    """Rebuilds model ``name`` from the stored config (``overrides`` replace config fields,
    e.g. ``dtype="bfloat16"``) and fills its params; sharded on ``mesh`` when given."""
    from lavin_jax import sharding

    step, meta = _open(directory, step)
    if name not in MODEL_FACTORIES:
        raise KeyError(f"load_model: unknown model {name!r}; known: {sorted(MODEL_FACTORIES)}")
    if name not in meta.get("configs", {}):
        raise KeyError(f"{directory}: metadata has no config for {name!r} (items {meta['items']})")
    ctor = MODEL_FACTORIES[name]({**meta["configs"][name], **overrides})
    with nnx.use_eager_sharding(False):
        abs_state = nnx.state(nnx.eval_shape(ctor), nnx.Param)
    target = nnx.to_pure_dict(abs_state)
    if mesh is not None:
        shards = nnx.to_pure_dict(sharding.state_shardings(abs_state, mesh, rules))
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shards
        )
    else:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    params, _ = load_params(directory, {name: target}, step=step)
    return module_from_params(ctor, params[name], mesh=mesh, rules=rules)
