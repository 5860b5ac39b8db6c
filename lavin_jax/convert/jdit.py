"""The released J-DiT weights (official PyTorch ``.safetensors``) <-> our NNX :class:`JDiT`.

The mapping is a table: one row per official key (per block and stream for the layers), with
the transform between layouts. Every key of the file must be used, every parameter of ours
filled, every shape right; anything else is one error naming the keys.

Layouts: a PyTorch Linear weight is [out, in], ours [in, out]; the official prompt/answer
embeddings are [1, D], ours [D]; our per-layer parameters are stacked on a leading 'layers'
axis (index i = official ``blocks.{i}``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from lavin_jax import checkpoint
from lavin_jax.models.jdit import JDiT, JDiTConfig

# The released LaVinDiT_3B_2 shape.
RELEASE_SHAPE = dict(
    hidden_size=2304, depth=22, num_heads=32, kv_group=4, patch_size=2, in_channels=16
)

# Kinds: "linear" torch [out, in] <-> ours [in, out]; "same" identical; "row" torch [1, D] <-> [D].
_TOP = (
    (("cond_embedder", "proj", "kernel"), "cond_embedder.0.weight", "linear"),
    (("cond_embedder", "proj", "bias"), "cond_embedder.0.bias", "same"),
    (("cond_embedder", "norm", "scale"), "cond_embedder.1.weight", "same"),
    (("cond_embedder", "norm", "bias"), "cond_embedder.1.bias", "same"),
    (("x_embedder", "proj", "kernel"), "x_embedder.0.weight", "linear"),
    (("x_embedder", "proj", "bias"), "x_embedder.0.bias", "same"),
    (("x_embedder", "norm", "scale"), "x_embedder.1.weight", "same"),
    (("x_embedder", "norm", "bias"), "x_embedder.1.bias", "same"),
    (("prompt_embed",), "prompt_embed", "row"),
    (("answer_embed",), "answer_embed", "row"),
    (("t_mlp1", "kernel"), "t_embedder.mlp.0.weight", "linear"),
    (("t_mlp1", "bias"), "t_embedder.mlp.0.bias", "same"),
    (("t_mlp2", "kernel"), "t_embedder.mlp.2.weight", "linear"),
    (("t_mlp2", "bias"), "t_embedder.mlp.2.bias", "same"),
    (("final_mod", "kernel"), "final_layer.adaLN_modulation.1.weight", "linear"),
    (("final_mod", "bias"), "final_layer.adaLN_modulation.1.bias", "same"),
    (("final_proj", "kernel"), "final_layer.linear.weight", "linear"),
    (("final_proj", "bias"), "final_layer.linear.bias", "same"),
)

# Per stream s in (cond, x) of block i: our path under blocks.<s>, official key template.
_STREAM = (
    (("q", "kernel"), "blocks.{i}.joint_attn.{s}_q.weight", "linear"),
    (("k", "kernel"), "blocks.{i}.joint_attn.{s}_k.weight", "linear"),
    (("v", "kernel"), "blocks.{i}.joint_attn.{s}_v.weight", "linear"),
    (("o", "kernel"), "blocks.{i}.joint_attn.{s}_proj.weight", "linear"),
    (("q_norm", "scale"), "blocks.{i}.joint_attn.{s}_qnorm.weight", "same"),
    (("k_norm", "scale"), "blocks.{i}.joint_attn.{s}_knorm.weight", "same"),
    (("gate", "kernel"), "blocks.{i}.{s}_mlp.gate_proj.weight", "linear"),
    (("up", "kernel"), "blocks.{i}.{s}_mlp.up_proj.weight", "linear"),
    (("down", "kernel"), "blocks.{i}.{s}_mlp.down_proj.weight", "linear"),
    (("modulation", "kernel"), "blocks.{i}.{s}_modulation.1.weight", "linear"),
    (("modulation", "bias"), "blocks.{i}.{s}_modulation.1.bias", "same"),
)
_STREAMS = ("cond", "x")

# Wrapper prefixes dropped when *every* key carries them (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _official_shape(ours: tuple[int, ...], kind: str) -> tuple[int, ...]:
    return {"linear": ours[::-1], "same": ours, "row": (1, *ours)}[kind]


def _to_ours(a: np.ndarray, kind: str) -> np.ndarray:
    return {"linear": lambda: a.T, "same": lambda: a, "row": lambda: a.reshape(-1)}[kind]()


def _to_official(a: np.ndarray, kind: str) -> np.ndarray:
    return {"linear": lambda: a.T, "same": lambda: a, "row": lambda: a[None]}[kind]()


def _rows(depth: int):
    """(our path, official key, kind, layer index or None) for every parameter."""
    for path, key, kind in _TOP:
        yield path, key, kind, None
    for s in _STREAMS:
        for sub, tmpl, kind in _STREAM:
            for i in range(depth):
                yield ("blocks", s, *sub), tmpl.format(i=i, s=s), kind, i


def _strip_wrapper(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    sd = dict(sd)
    for p in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def make_config(**shape) -> JDiTConfig:
    """JDiTConfig with the release shape as defaults; other JDiTConfig fields pass through."""
    return JDiTConfig(**{**RELEASE_SHAPE, **shape})


def _abstract_params(cfg: JDiTConfig) -> dict:
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: JDiT(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _fmt(keys: list[str], limit: int = 12) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def jdit_params_from_state_dict(sd: Mapping[str, np.ndarray], cfg: JDiTConfig) -> dict:
    """Official state dict -> our pure param dict (numpy, ``cfg.param_dtype``), strictly checked."""
    cfg.validate()
    sd = _strip_wrapper(sd)
    want = dict(nnx.traversals.flatten_mapping(_abstract_params(cfg)))
    missing, misshaped, used = [], [], set()
    for path, key, kind, i in _rows(cfg.depth):
        full = want[path].shape
        ours = full[1:] if i is not None else full
        expect = _official_shape(tuple(ours), kind)
        if key not in sd:
            missing.append(key)
        elif tuple(sd[key].shape) != expect:
            misshaped.append(f"{key} {tuple(sd[key].shape)} (expected {expect})")
        used.add(key)
    unexpected = sorted(set(sd) - used)
    if missing or misshaped or unexpected:
        parts = [f"{name} keys: {_fmt(keys)}" for name, keys in
                 (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected))
                 if keys]
        raise ValueError(
            "official J-DiT state dict does not match JDiT(hidden_size={}, depth={}, num_heads={},"
            " kv_group={}, patch_size={}, in_channels={}): {}. Check the shape flags (release: "
            "2304/22/32/4/2/16).".format(cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.kv_group,
                                         cfg.patch_size, cfg.in_channels, "; ".join(parts))
        )
    per_layer: dict[tuple, list] = {}
    flat: dict[tuple, np.ndarray] = {}
    for path, key, kind, i in _rows(cfg.depth):
        a = np.asarray(_to_ours(sd[key], kind)).astype(want[path].dtype)
        if i is None:
            flat[path] = np.ascontiguousarray(a)
        else:
            per_layer.setdefault(path, []).append(a)
    for path, layers in per_layer.items():
        flat[path] = np.stack(layers)
    return nnx.traversals.unflatten_mapping(flat)


def jdit_from_state_dict(sd: Mapping[str, np.ndarray], *, mesh=None, rules=None, **shape) -> JDiT:
    """Official state dict (numpy) -> JDiT. ``shape``: JDiTConfig fields (release defaults)."""
    cfg = make_config(**shape)
    params = jdit_params_from_state_dict(sd, cfg)
    return checkpoint.module_from_params(
        lambda: JDiT(cfg, rngs=nnx.Rngs(0)), params, mesh=mesh, rules=rules
    )


def jdit_to_state_dict(model: JDiT) -> dict[str, np.ndarray]:
    """Our JDiT -> official key names and layouts (numpy, the model's param dtype)."""
    flat = dict(nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
    out = {}
    for path, key, kind, i in _rows(model.cfg.depth):
        a = flat[path] if i is None else flat[path][i]
        out[key] = np.ascontiguousarray(_to_official(a, kind))
    return out


# ------------------------------------------------------------------------------------------
# .safetensors reading: memory-mapped (the 3.4B file is ~7-14 GB), BF16 via ml_dtypes (the
# safetensors package's numpy backend has no bfloat16).

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: read-only memory-mapped array} of a .safetensors file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such .safetensors file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path}: not a .safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: not a .safetensors file ({e})") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def load_official_jdit(path: str | os.PathLike, *, mesh=None, rules=None, **shape) -> JDiT:
    """Reads the official J-DiT ``.safetensors`` into a JDiT.

    ``shape``: hidden_size, depth, num_heads, kv_group, patch_size, in_channels (release
    defaults 2304/22/32/4/2/16) and optionally other JDiTConfig fields (dtype, param_dtype,
    attention_backend, ...). Any missing, unused or mis-shaped key raises a ValueError naming it.
    """
    try:
        return jdit_from_state_dict(read_safetensors(path), mesh=mesh, rules=rules, **shape)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None
