"""Meshes, logical-axis rules and batch sharding: the one place that knows the mesh.

Every parameter is created with logical axis names (``nnx.with_partitioning(init, ("embed",
"mlp"))``); activations are constrained with :func:`constrain` using logical names too. The
config's ``sharding.rules`` maps each logical name to mesh axes (``data``, ``fsdp``, ``tensor``,
``context``). Nothing else in the code base mentions a mesh axis.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Logical name -> mesh axis (or tuple of axes, or None). Parameter names first, then activations.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("modulation", "tensor"),
    ("patch", None),
    ("freq", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("kernel", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_frames", None),
    ("act_height", None),
    ("act_width", None),
    ("act_channels", None),
)

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The ``mesh`` and ``sharding`` config blocks every config variant starts from."""
    cfg = ml_collections.ConfigDict()
    # ICI (within a slice) sizes; -1 takes the devices that are left. Product == devices per slice.
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, context=1))
    # DCN (across slices) sizes, used when num_slices > 1; -1 again takes the rest.
    cfg.dcn_mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    cfg.num_slices = 1
    cfg.sharding = ml_collections.ConfigDict()
    cfg.sharding.rules = [list(r) for r in DEFAULT_RULES]
    return cfg


def _resolve(sizes: dict[str, int], total: int, what: str) -> tuple[int, ...]:
    """Replaces the one -1 in ``sizes`` so the product equals ``total``."""
    vals = [int(sizes[a]) for a in MESH_AXES]
    free = [i for i, v in enumerate(vals) if v == -1]
    if len(free) > 1:
        raise ValueError(f"{what}: at most one axis may be -1, got {dict(zip(MESH_AXES, vals))}")
    if any(v == 0 or v < -1 for v in vals):
        raise ValueError(f"{what}: axis sizes must be positive or -1, got {vals}")
    fixed = math.prod(v for v in vals if v != -1)
    if free:
        if total % fixed:
            raise ValueError(
                f"{what}: fixed axes {dict(zip(MESH_AXES, vals))} (product {fixed}) do not divide "
                f"{total} devices; change the sizes or set one axis to -1"
            )
        vals[free[0]] = total // fixed
    if math.prod(vals) != total:
        raise ValueError(
            f"{what}: {dict(zip(MESH_AXES, vals))} has {math.prod(vals)} devices but {total} are "
            f"available; make the product match or set one axis to -1"
        )
    return tuple(vals)


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> dict[str, int]:
    """Resolved global mesh shape {axis: size} for ``cfg`` (validates, builds nothing)."""
    n = len(jax.devices()) if num_devices is None else num_devices
    slices = int(cfg.get("num_slices", 1))
    if n % slices:
        raise ValueError(f"num_slices={slices} does not divide {n} devices")
    ici = _resolve(dict(cfg.mesh), n // slices, "config.mesh")
    dcn = _resolve(dict(cfg.dcn_mesh), slices, "config.dcn_mesh") if slices > 1 else (1,) * 4
    return {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor, context) mesh with Auto axis types from ``cfg``.

    ``devices`` defaults to all devices; with ``num_slices > 1`` a hybrid ICI x DCN mesh is built
    so that only the ``dcn_mesh`` axes cross slice boundaries.
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = int(cfg.get("num_slices", 1))
    mesh_shape(cfg, len(devices))  # validation with clear messages
    ici = _resolve(dict(cfg.mesh), len(devices) // slices, "config.mesh")
    if slices > 1:
        dcn = _resolve(dict(cfg.dcn_mesh), slices, "config.dcn_mesh")
        arr = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, allow_split_physical_axes=True
        )
    else:
        try:
            arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices).reshape(ici)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _rules_dict(rules: Sequence[Sequence[Any]]) -> dict[str, Any]:
    out = {}
    for entry in rules:
        name, axes = entry[0], entry[1]
        if isinstance(axes, list):
            axes = tuple(axes)
        for ax in (axes if isinstance(axes, tuple) else (axes,)):
            if ax is not None and ax not in MESH_AXES:
                raise ValueError(
                    f"config.sharding.rules: {name!r} -> {ax!r} is not a mesh axis {MESH_AXES}"
                )
        out[str(name)] = axes
    return out


def logical_to_spec(
    names: Sequence[str | None],
    rules: Sequence[Sequence[Any]],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    A mesh axis is used at most once per spec (first dimension wins). With ``shape`` and ``mesh``
    given, a dimension not divisible by its mesh axes is left replicated (small configs on big
    meshes, e.g. 2 kv heads on tensor=4) rather than failing.
    """
    table = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no entry in config.sharding.rules")
        axes = table[name]
        axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if shape is not None and mesh is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                log.debug("dim %d (%s) of %s not divisible by %s", i, name, shape, axes)
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _var_names(v: nnx.Variable) -> tuple[str | None, ...] | None:
    names = v.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Any:
    """NamedSharding tree for an nnx State (abstract or concrete) from its logical names."""

    def one(x):
        if isinstance(x, nnx.Variable):
            names = _var_names(x)
            shape = x.get_value().shape
            if names is None:
                return x.replace(NamedSharding(mesh, PartitionSpec()))
            if len(names) != len(shape):
                raise ValueError(f"logical names {names} do not match parameter shape {shape}")
            return x.replace(NamedSharding(mesh, logical_to_spec(names, rules, shape, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(ctor, mesh: Mesh, rules: Sequence[Sequence[Any]]):
    """Builds ``ctor()`` (an nnx.Module factory) directly sharded: nothing lives on one device.

    Returns the module with every parameter placed by the logical-name rules.
    """
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(ctor)
    graphdef, abs_state = nnx.split(abstract)
    shardings = nnx.to_pure_dict(state_shardings(abs_state, mesh, rules))

    @jax.jit
    def init():
        with nnx.use_eager_sharding(False):
            return nnx.to_pure_dict(nnx.state(ctor()))

    with use_rules(mesh, rules):
        pure = jax.jit(init, out_shardings=shardings)()
    nnx.replace_by_pure_dict(abs_state, pure)
    return nnx.merge(graphdef, abs_state)


def shard_module(model: nnx.Module, mesh: Mesh, rules: Sequence[Sequence[Any]]) -> nnx.Module:
    """Moves an existing module's state onto ``mesh`` according to its logical names."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_value())),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# Activation constraints: model code names axes logically; the active context decides placement.

_ctx = threading.local()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Iterator[None]:
    """Activates ``mesh`` and ``rules`` for :func:`constrain` while tracing a model."""
    prev = getattr(_ctx, "active", None)
    _ctx.active = (mesh, tuple(tuple(r) for r in rules))
    try:
        yield
    finally:
        _ctx.active = prev


def active_mesh() -> Mesh | None:
    active = getattr(_ctx, "active", None)
    return None if active is None else active[0]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside :func:`use_rules`."""
    active = getattr(_ctx, "active", None)
    if active is None:
        return x
    mesh, rules = active
    if mesh.size == 1:
        return x
    spec = logical_to_spec(names, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------------
# Batches.

BATCH_NAMES = ("act_batch",)


def batch_sharding(mesh: Mesh, rules: Sequence[Sequence[Any]], ndim: int) -> NamedSharding:
    """Sharding for a batch leaf: leading axis over the batch axes, the rest replicated."""
    spec = logical_to_spec(BATCH_NAMES + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def num_batch_shards(mesh: Mesh, rules: Sequence[Sequence[Any]]) -> int:
    """How many ways the batch dimension is split (global batch must be a multiple)."""
    spec = logical_to_spec(BATCH_NAMES, rules)
    axes = spec[0] or ()
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def shard_batch(local_batch: Any, mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Any:
    """Assembles each process's local batch (numpy) into global arrays sharded on the batch axes.

    Every process passes its own slice ``[B_global / num_processes, ...]``; the result is a
    global jax.Array of leading size B_global.
    """

    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, rules, x.ndim)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, local_batch)
