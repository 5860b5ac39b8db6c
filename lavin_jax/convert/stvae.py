"""The released ST-VAE weights (official PyTorch ``AutoencoderKLSTVAE`` state dict) <-> our
NNX :class:`~lavin_jax.models.stvae.STVAE`.

The official key of each of our parameters follows from its path by a few renames (mid-block
``resnets.``, ``downsamplers.0`` / ``upsamplers.0``, ``conv_shortcut``, ``norm_layer``, the
``.conv`` inside causal convs, ``weight`` for kernels and norm scales). Layouts: a PyTorch
Conv3d weight is [out, in, kt, kh, kw], ours [kt, kh, kw, in, out]; Conv2d [out, in, kh, kw]
-> [kh, kw, in, out]. Every key of the file must be used, every parameter filled, every shape
right; anything else is one error naming the keys.

The released file is a PyTorch pickle (``{"state_dict": {...}}``). It is read with
``torch.load(weights_only=True)`` (no pickled code runs) when torch is installed (the optional
``torch`` extra); ``.safetensors`` files are read without torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from lavin_jax import checkpoint, sharding
from lavin_jax.convert.jdit import _fmt, _strip_wrapper, read_safetensors
from lavin_jax.models.stvae import STVAE, STVAEConfig

# Our modules that are official STVAECausalConv3d wrappers (their nn.Conv3d sits under ".conv").
_CAUSAL = {"conv_in", "conv_out", "conv1", "conv2", "conv_y", "conv_b"}


def official_key(path: Sequence[str | int]) -> str:
    """Our param path, e.g. ('decoder', 'mid_block', 0, 'norm1', 'norm', 'scale') -> official
    key 'decoder.mid_block.resnets.0.norm1.norm_layer.weight'."""
    parts = [str(p) for p in path]
    out: list[str] = []
    for i, p in enumerate(parts):
        leaf = i == len(parts) - 1
        if leaf:
            out.append("weight" if p in ("kernel", "scale") else p)
        elif p == "mid_block":
            out += ["mid_block", "resnets"]
        elif p == "down":
            out += ["downsamplers", "0"]
        elif p == "up":
            out += ["upsamplers", "0"]
        elif p == "shortcut":
            out.append("conv_shortcut")
        elif p == "norm" and i > 0 and parts[i - 1] in ("norm1", "norm2", "norm_out"):
            out.append("norm_layer")
        else:
            out.append(p)
            if p in _CAUSAL and i == len(parts) - 2:
                out.append("conv")
    return ".".join(out)


def _to_ours(a: np.ndarray) -> np.ndarray:
    if a.ndim == 5:  # Conv3d [out, in, kt, kh, kw] -> [kt, kh, kw, in, out]
        return a.transpose(2, 3, 4, 1, 0)
    if a.ndim == 4:  # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
        return a.transpose(2, 3, 1, 0)
    return a


def _to_official(a: np.ndarray) -> np.ndarray:
    if a.ndim == 5:
        return a.transpose(4, 3, 0, 1, 2)
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1)
    return a


def _official_shape(ours: tuple[int, ...]) -> tuple[int, ...]:
    return _to_official(np.empty(ours, np.uint8)).shape


def make_config(*, block_out_channels=(128, 256, 256, 512), layers_per_block=3,
                latent_channels=16, norm_num_groups=32, temporal_compression_ratio=4,
                **overrides) -> STVAEConfig:
    """STVAEConfig from the official constructor's names (release defaults).

    The official spatial norms always use 32 groups (``spatial_norm_groups``); ``overrides``
    are other STVAEConfig fields (dtype, param_dtype, tile sizes, latent shift/scale, ...).
    """
    cfg = STVAEConfig(
        block_out_channels=tuple(int(c) for c in block_out_channels),
        layers_per_block=layers_per_block, latent_channels=latent_channels,
        norm_num_groups=norm_num_groups, temporal_compression_ratio=temporal_compression_ratio,
        **{"spatial_norm_groups": 32, **overrides},
    )
    cfg.validate()
    return cfg


def _abstract(cfg: STVAEConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: STVAE(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param, ...)


def stvae_params_from_state_dict(sd: Mapping[str, np.ndarray], cfg: STVAEConfig,
                                 ignore_prefixes: Sequence[str] = ()) -> dict:
    """Official state dict -> our pure param dict (numpy, ``cfg.param_dtype``), strictly checked.

    Keys starting with one of ``ignore_prefixes`` are skipped (e.g. training-only extras).
    """
    sd = {k: v for k, v in _strip_wrapper(sd).items()
          if not any(k.startswith(p) for p in ignore_prefixes)}
    _, pstate, _ = _abstract(cfg)
    want = dict(nnx.traversals.flatten_mapping(nnx.to_pure_dict(pstate)))
    missing, misshaped, used = [], [], set()
    for path, spec in want.items():
        key = official_key(path)
        expect = _official_shape(tuple(spec.shape))
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
            f"official ST-VAE state dict does not match AutoencoderKLSTVAE(block_out_channels="
            f"{cfg.block_out_channels}, layers_per_block={cfg.layers_per_block}, latent_channels="
            f"{cfg.latent_channels}, norm_num_groups={cfg.norm_num_groups}, "
            f"temporal_compression_ratio={cfg.temporal_compression_ratio}): {'; '.join(parts)}. "
            "Check the shape arguments (release: (128, 256, 256, 512)/3/16/32/4)"
            + ("; pass ignore_prefixes=(...) for extra keys" if unexpected else "")
        )
    flat = {path: np.ascontiguousarray(_to_ours(np.asarray(sd[official_key(path)])))
            .astype(spec.dtype) for path, spec in want.items()}
    return nnx.traversals.unflatten_mapping(flat)


def stvae_from_params(cfg: STVAEConfig, params: Mapping, *, mesh=None, rules=None) -> STVAE:
    """STVAE with ``params`` (pure dict) and the latent stats of ``cfg``; nothing is randomly
    initialised. With ``mesh``, params are placed by their logical names."""
    if mesh is not None and rules is None:
        rules = sharding.DEFAULT_RULES
    return checkpoint.module_from_params(lambda: STVAE(cfg, rngs=nnx.Rngs(0)), params,
                                         mesh=mesh, rules=rules)


def stvae_from_state_dict(state_dict: Mapping[str, np.ndarray], *,
                          block_out_channels=(128, 256, 256, 512), layers_per_block=3,
                          latent_channels=16, norm_num_groups=32, temporal_compression_ratio=4,
                          ignore_prefixes: Sequence[str] = (), mesh=None, rules=None,
                          **overrides) -> STVAE:
    """Official state dict ({key: numpy array}) -> STVAE; see :func:`make_config`."""
    cfg = make_config(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                      latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                      temporal_compression_ratio=temporal_compression_ratio, **overrides)
    params = stvae_params_from_state_dict(state_dict, cfg, ignore_prefixes)
    return stvae_from_params(cfg, params, mesh=mesh, rules=rules)


def stvae_to_state_dict(model: STVAE) -> dict[str, np.ndarray]:
    """Our STVAE -> official key names and layouts (numpy, the model's param dtype)."""
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {official_key(p): np.ascontiguousarray(_to_official(np.asarray(jax.device_get(v))))
            for p, v in flat.items()}


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{key: numpy array} from a ``.safetensors`` file or a PyTorch checkpoint (weights only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such ST-VAE checkpoint file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path}: a PyTorch checkpoint needs torch to be read safely "
            "(torch.load(weights_only=True)); install the optional extra with "
            "`pip install -e .[torch]`, or convert the file to .safetensors elsewhere"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling refusal as one line
        raise ValueError(f"{path}: torch.load(weights_only=True) refused the file: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (or {{'state_dict': ...}}), got "
                         f"{type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[str(k)] = _torch_to_numpy(v)
    return out


def load_official_stvae(path: str | os.PathLike, *, block_out_channels=(128, 256, 256, 512),
                        layers_per_block=3, latent_channels=16, norm_num_groups=32,
                        temporal_compression_ratio=4, ignore_prefixes: Sequence[str] = (),
                        mesh=None, rules=None, **overrides) -> STVAE:
    """Reads the official ST-VAE checkpoint (``weights/stvae.pt`` or a ``.safetensors``) into an
    STVAE with ``encode`` / ``decode``. Shape arguments use the official constructor's names
    (release defaults). Any missing, unused or mis-shaped key raises a ValueError naming it."""
    sd = read_state_dict(path)
    try:
        return stvae_from_state_dict(
            sd, block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            latent_channels=latent_channels, norm_num_groups=norm_num_groups,
            temporal_compression_ratio=temporal_compression_ratio,
            ignore_prefixes=ignore_prefixes, mesh=mesh, rules=rules, **overrides)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None
