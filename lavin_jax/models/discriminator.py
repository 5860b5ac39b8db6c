"""PatchGAN discriminators for ST-VAE training: a 2D one on frames and a 3D one on clips.

Channels-last ``[B, T, H, W, C]``. Each net is the pix2pix / taming-transformers "NLayer"
design: a stride-2 conv, ``n_layers - 1`` more stride-2 convs with norm, one stride-1 conv with
norm, and a stride-1 conv to one logit per patch (all 4x4 spatial kernels, padding 1). The frame
net uses per-frame 2D kernels; the clip net adds a causal temporal kernel ``temporal_kernel`` at
temporal stride 1, so it takes any clip length. Convs are the ST-VAE's (stvae_blocks.Conv).
Norms are per-position LayerNorms over channels (stateless: no batch statistics to carry).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lavin_jax.models.layers import LayerNorm, dtype_of
from lavin_jax.models.stvae_blocks import ACT_NAMES, Conv
from lavin_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class DiscConfig:
    channels: int = 64  # width of the first conv; doubles per layer up to 8x
    n_layers: int = 3  # stride-2 convs (the patch size grows with it)
    frame: bool = True  # 2D net on every frame
    clip: bool = True  # 3D net on clips with T > 1
    temporal_kernel: int = 3
    param_dtype: str = "float32"
    dtype: str = "float32"

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict | dict | None) -> DiscConfig:
        d = dict(cfg or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"objective.disc has unknown keys {unknown}; known: {sorted(names)}")
        out = cls(**d)
        if not (out.frame or out.clip):
            raise ValueError("objective.disc: set frame=True and/or clip=True")
        if out.n_layers < 1 or out.channels < 1 or out.temporal_kernel % 2 == 0:
            raise ValueError(f"objective.disc: need n_layers>=1, channels>=1 and an odd "
                             f"temporal_kernel, got {out}")
        return out


def patch_grid_side(size: int, n_layers: int) -> int:
    """Patch-grid side for an input side ``size`` (k4 p1 convs: stride 2 halves, 1 takes 1)."""
    for _ in range(n_layers):
        size = (size - 2) // 2 + 1
    return size - 2


def min_input_side(n_layers: int) -> int:
    """The smallest input side that leaves the ``n_layers`` PatchGAN a patch to judge."""
    size = 1
    while patch_grid_side(size, n_layers) < 1:
        size += 1
    return size


class PatchDiscriminator(nnx.Module):
    """NLayer PatchGAN: [B, T, H, W, C] -> logits [B, T, h, w, 1] (f32).

    ``ndim`` 2 judges every frame on its own; 3 judges space-time patches of the clip.
    """

    def __init__(self, cfg: DiscConfig, ndim: int, in_channels: int = 3, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.dtype), rngs=rngs)
        kernel = (cfg.temporal_kernel, 4, 4) if ndim == 3 else (4, 4)

        def conv(cin, cout, stride):
            return Conv(cin, cout, kernel, stride=stride, pad_hw=((1, 1), (1, 1)), **kw)

        widths = [cfg.channels * min(2**i, 8) for i in range(cfg.n_layers + 1)]
        self.convs = nnx.List([conv(in_channels, widths[0], 2)])
        self.norms = nnx.List()
        for i in range(1, cfg.n_layers + 1):
            stride = 2 if i < cfg.n_layers else 1
            self.convs.append(conv(widths[i - 1], widths[i], stride))
            self.norms.append(LayerNorm(widths[i], "norm", param_dtype=kw["param_dtype"],
                                        rngs=rngs))
        self.out = conv(widths[-1], 1, 1)
        self.n_layers = cfg.n_layers

    def __call__(self, x: jax.Array) -> jax.Array:
        if patch_grid_side(min(x.shape[-3:-1]), self.n_layers) < 1:
            raise ValueError(f"discriminator input {x.shape[-3:-1]} is too small for "
                             f"{self.n_layers} layers; lower objective.disc.n_layers")
        h = constrain(jax.nn.leaky_relu(self.convs[0](x), 0.2), ACT_NAMES)
        for conv, norm in zip(self.convs[1:], self.norms):
            h = constrain(jax.nn.leaky_relu(norm(conv(h)), 0.2), ACT_NAMES)
        return self.out(h).astype(jnp.float32)


class Discriminator(nnx.Module):
    """Frame and clip discriminators together: [B, T, H, W, 3] -> {head: logits [B, T, h, w, 1]}.

    "frame" judges each frame alone; "clip" judges whole clips and is skipped when T == 1.
    """

    def __init__(self, cfg: DiscConfig, in_channels: int = 3, *, rngs: nnx.Rngs):
        self.frame = PatchDiscriminator(cfg, 2, in_channels, rngs=rngs) if cfg.frame else None
        self.clip = PatchDiscriminator(cfg, 3, in_channels, rngs=rngs) if cfg.clip else None

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        out = {}
        if self.frame is not None:
            out["frame"] = self.frame(x)
        if self.clip is not None and x.shape[1] > 1:
            out["clip"] = self.clip(x)
        if not out:
            raise ValueError("discriminator has only a clip head (objective.disc.frame=False) "
                             "but got single frames; enable the frame head")
        return out
