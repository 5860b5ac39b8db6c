"""ST-VAE: the causal 3D-conv KL autoencoder of LaVin-DiT (Flax NNX, channels-last).

Pixels ``[B, T, H, W, 3]`` in [-1, 1] with T = 1 + 4k (an image is T = 1) map to a diagonal
Gaussian over latents ``[B, 1 + k, H / s, W / s, C_lat]`` (s = 2 ** (levels - 1)). Causal
convs pad time by repeating the first frame, and temporal pooling keeps the first frame alone,
so latent frame i is computed from input frames <= 4i only -- except through GroupNorm, whose
statistics span the whole clip (the released design; tests/test_stvae.py checks causality with
per-frame statistics swapped in). The decoder's norms are spatial norms conditioned on the
latent. See lavin_jax/models/stvae_blocks.py for the blocks and
lavin_jax/models/stvae_tiling.py for tiled encode/decode.

``normalize`` / ``denormalize`` apply the latent shift/scale stored in the model (non-trainable
variables, checkpointed with it): z' = (z - shift) * scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, struct

from lavin_jax.models import stvae_tiling
from lavin_jax.models.layers import dtype_of
from lavin_jax.models.stvae_blocks import (
    ACT_NAMES,
    Conv,
    Downsample,
    GroupNorm,
    ResnetBlock,
    SpatialNorm,
    Upsample,
)
from lavin_jax.sharding import constrain

MID_LAYERS = 2  # resnets in each mid block (fixed in the released design)


@dataclasses.dataclass(frozen=True)
class STVAEConfig:
    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 3  # encoder resnets per level; the decoder has one more
    latent_channels: int = 16
    norm_num_groups: int = 32
    spatial_norm_groups: int = 32  # the released SpatialNorm hard-codes 32 groups
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4
    tile_sample_size: int = 512  # spatial tile in pixels (the release's inference value)
    tile_sample_frames: int = 129  # temporal tile in frames (1 + 4k)
    tile_overlap: float = 0.25
    latent_shift: float = 0.032470703125
    latent_scale: float = 1.08936170213
    remat: bool = False  # rematerialise each resnet in the backward pass (training memory)
    param_dtype: str = "float32"
    dtype: str = "float32"

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_levels(self) -> int:
        return int(round(math.log2(self.temporal_compression_ratio)))

    @property
    def tile_latent_size(self) -> int:
        return self.tile_sample_size // self.spatial_compression

    @property
    def tile_latent_frames(self) -> int:
        return (self.tile_sample_frames - 1) // self.temporal_compression_ratio + 1

    def latent_shape(self, t: int, h: int, w: int) -> tuple[int, int, int, int]:
        """(T', H', W', C_lat) for an input of T frames of H x W pixels."""
        for _ in range(self.temporal_levels):
            t = t // 2 + 1 if t % 2 else t // 2
        for _ in range(len(self.block_out_channels) - 1):
            h, w = h // 2, w // 2  # pad bottom/right by 1, conv3 stride 2: floor(n / 2)
        return t, h, w, self.latent_channels

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict | dict) -> STVAEConfig:
        d = dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"name"})
        if unknown:
            raise ValueError(f"config.model has unknown keys {unknown}; known: {sorted(names)}")
        d = {k: v for k, v in d.items() if k in names}
        if "block_out_channels" in d:
            d["block_out_channels"] = tuple(int(c) for c in d["block_out_channels"])
        out = cls(**d)
        out.validate()
        return out

    def validate(self) -> None:
        """One clear line per problem, before anything is compiled."""
        errs = []
        chans = self.block_out_channels
        if len(chans) < 1:
            errs.append("model.block_out_channels must name at least one level")
        for c in chans:
            if c % self.norm_num_groups:
                errs.append(f"model.block_out_channels entry {c} not divisible by "
                            f"model.norm_num_groups={self.norm_num_groups}")
            if c % self.spatial_norm_groups:
                errs.append(f"model.block_out_channels entry {c} not divisible by "
                            f"model.spatial_norm_groups={self.spatial_norm_groups}")
        r = self.temporal_compression_ratio
        if r < 1 or r & (r - 1):
            errs.append(f"model.temporal_compression_ratio={r} must be a power of 2")
        elif self.temporal_levels > len(chans) - 1:
            errs.append(f"model.temporal_compression_ratio={r} needs {self.temporal_levels} "
                        f"downsampling levels but block_out_channels has {len(chans) - 1}")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            errs.append("model.layers_per_block and model.latent_channels must be >= 1")
        s, f, ov = self.tile_sample_size, self.spatial_compression, self.tile_overlap
        if not 0 < ov < 1:
            errs.append(f"model.tile_overlap={ov} must be in (0, 1)")
        elif s % f or int(s * ov) != int(s // f * ov) * f:
            errs.append(f"model.tile_sample_size={s} with tile_overlap={ov}: the tile and its "
                        f"overlap must be whole multiples of the spatial compression {f}")
        if (self.tile_sample_frames - 1) % max(r, 1):
            errs.append(f"model.tile_sample_frames={self.tile_sample_frames} must be 1 + a "
                        f"multiple of temporal_compression_ratio={r}")
        for fld in ("param_dtype", "dtype"):
            try:
                dtype_of(getattr(self, fld))
            except ValueError as e:
                errs.append(f"model.{fld}: {e}")
        if errs:
            raise ValueError("; ".join(errs))


@struct.dataclass
class DiagonalGaussian:
    """q(z | x) = N(mean, exp(logvar)); mean/logvar [B, T', H', W', C] (logvar pre-clamped)."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar.astype(jnp.float32))

    def sample(self, rng: jax.Array) -> jax.Array:
        """Reparameterised sample mean + std * eps (differentiable in mean/logvar), f32."""
        eps = jax.random.normal(rng, self.mean.shape, jnp.float32)
        return self.mean.astype(jnp.float32) + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) summed over every non-batch axis -> [B], f32.

        (The released code sums over dims [1, 2, 3] of an NCTHW tensor, i.e. not over W — a
        slip for 5D inputs; we sum over all latent elements.)
        """
        m, lv = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        per = 0.5 * (jnp.square(m) + jnp.exp(lv) - 1.0 - lv)
        return jnp.sum(per, axis=tuple(range(1, per.ndim)))

    def nll(self, z: jax.Array) -> jax.Array:
        """-log q(z) summed over non-batch axes -> [B]."""
        m, lv = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        per = 0.5 * (np.log(2 * np.pi) + lv + jnp.square(z - m) / jnp.exp(lv))
        return jnp.sum(per, axis=tuple(range(1, per.ndim)))


class LatentStat(nnx.Variable):
    """Non-trainable, checkpointed statistic (latent shift / scale)."""


def _run(block: nnx.Module, h: jax.Array, zq: jax.Array | None, remat: bool) -> jax.Array:
    if remat:
        return nnx.remat(lambda b, x, z: b(x, z))(block, h, zq)
    return block(h, zq)


class Encoder(nnx.Module):
    def __init__(self, cfg: STVAEConfig, rngs: nnx.Rngs):
        kw = dict(param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.dtype), rngs=rngs)
        chans, n = cfg.block_out_channels, len(cfg.block_out_channels)
        rk = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw)
        self.remat = cfg.remat
        self.conv_in = Conv(cfg.in_channels, chans[0], (3, 3, 3), **kw)
        self.down_blocks = nnx.List()
        c_prev = chans[0]
        for i, c in enumerate(chans):
            resnets = nnx.List([ResnetBlock(c_prev if j == 0 else c, c, **rk)
                                for j in range(cfg.layers_per_block)])
            down = (Downsample(c, compress_time=i < cfg.temporal_levels, **kw)
                    if i < n - 1 else None)
            self.down_blocks.append(DownBlock(resnets, down))
            c_prev = c
        self.mid_block = nnx.List([ResnetBlock(chans[-1], chans[-1], **rk)
                                   for _ in range(MID_LAYERS)])
        self.norm_out = GroupNorm(chans[-1], cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = Conv(chans[-1], 2 * cfg.latent_channels, (3, 3, 3), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, H, W, 3] -> moments [B, T', H', W', 2 C_lat]."""
        h = constrain(self.conv_in(x), ACT_NAMES)
        for block in self.down_blocks:
            for res in block.resnets:
                h = constrain(_run(res, h, None, self.remat), ACT_NAMES)
            if block.down is not None:
                h = constrain(block.down(h), ACT_NAMES)
        for res in self.mid_block:
            h = constrain(_run(res, h, None, self.remat), ACT_NAMES)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class DownBlock(nnx.Module):
    def __init__(self, resnets: nnx.List, down: Downsample | None):
        self.resnets = resnets
        self.down = down


class UpBlock(nnx.Module):
    def __init__(self, resnets: nnx.List, up: Upsample | None):
        self.resnets = resnets
        self.up = up


class Decoder(nnx.Module):
    def __init__(self, cfg: STVAEConfig, rngs: nnx.Rngs):
        kw = dict(param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.dtype), rngs=rngs)
        rev, n, zc = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.latent_channels
        rk = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, z_channels=zc,
                  spatial_groups=cfg.spatial_norm_groups, **kw)
        self.remat = cfg.remat
        self.conv_in = Conv(zc, rev[0], (3, 3, 3), **kw)
        self.mid_block = nnx.List([ResnetBlock(rev[0], rev[0], **rk) for _ in range(MID_LAYERS)])
        self.up_blocks = nnx.List()
        c_prev = rev[0]
        for i, c in enumerate(rev):
            resnets = nnx.List([ResnetBlock(c_prev if j == 0 else c, c, **rk)
                                for j in range(cfg.layers_per_block + 1)])
            up = Upsample(c, compress_time=i < cfg.temporal_levels, **kw) if i < n - 1 else None
            self.up_blocks.append(UpBlock(resnets, up))
            c_prev = c
        self.norm_out = SpatialNorm(rev[-1], zc, cfg.spatial_norm_groups, cfg.norm_eps, **kw)
        self.conv_out = Conv(rev[-1], cfg.in_channels, (3, 3, 3), **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        """z [B, T', H', W', C_lat] -> pixels [B, T, H, W, 3]."""
        h = constrain(self.conv_in(z), ACT_NAMES)
        for res in self.mid_block:
            h = constrain(_run(res, h, z, self.remat), ACT_NAMES)
        for block in self.up_blocks:
            for res in block.resnets:
                h = constrain(_run(res, h, z, self.remat), ACT_NAMES)
            if block.up is not None:
                h = constrain(block.up(h), ACT_NAMES)
        return self.conv_out(jax.nn.silu(self.norm_out(h, z)))


class STVAE(nnx.Module):
    """Encoder + decoder + stored latent normalisation. See the module docstring."""

    def __init__(self, cfg: STVAEConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)
        self.latent_shift = LatentStat(jnp.asarray(cfg.latent_shift, jnp.float32))
        self.latent_scale = LatentStat(jnp.asarray(cfg.latent_scale, jnp.float32))

    # -- core ----------------------------------------------------------------------------------
    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, T', H', W', C_lat], f32.

        logvar is clamped to [-30, 20] as in the release.
        """
        moments = self.encoder(x).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B, T', H', W', C_lat] (un-normalised) -> x [B, T, H, W, 3], f32."""
        return self.decoder(z.astype(dtype_of(self.cfg.dtype))).astype(jnp.float32)

    def posterior(self, x: jax.Array) -> DiagonalGaussian:
        return DiagonalGaussian(*self.encode(x))

    def __call__(self, x: jax.Array, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruction through a posterior sample (``rng``) or its mode -> (x_rec, q)."""
        q = self.posterior(x)
        z = q.sample(rng) if rng is not None else q.mode()
        return self.decode(z), q

    def last_decoder_layer_kernel(self) -> nnx.Param:
        """The decoder's final conv kernel [3, 3, 3, C, 3] (for the adaptive GAN weight)."""
        return self.decoder.conv_out.kernel

    # -- latent normalisation --------------------------------------------------------------------
    def normalize(self, z: jax.Array) -> jax.Array:
        """z -> (z - shift) * scale (what the J-DiT sees)."""
        return (z - self.latent_shift[...]) * self.latent_scale[...]

    def denormalize(self, z: jax.Array) -> jax.Array:
        return z / self.latent_scale[...] + self.latent_shift[...]

    def set_latent_stats(self, shift: float, scale: float) -> None:
        """Stores measured stats in the variables and in ``cfg`` (params-only checkpoints keep
        the config, so the values survive either way)."""
        self.latent_shift[...] = jnp.asarray(shift, jnp.float32)
        self.latent_scale[...] = jnp.asarray(scale, jnp.float32)
        self.cfg = dataclasses.replace(self.cfg, latent_shift=float(shift),
                                       latent_scale=float(scale))

    # -- tiling ------------------------------------------------------------------------------
    def tiled_encode(self, x: jax.Array, encode_fn: Callable | None = None
                     ) -> tuple[jax.Array, jax.Array]:
        """``encode`` in overlapping space/time tiles with blended seams (inputs beyond one tile).

        ``encode_fn(x) -> (mean, logvar)`` defaults to ``self.encode``; pass a jitted one to
        compile each tile shape once. Equals ``encode`` exactly when x fits in one tile.
        """
        c = self.cfg
        fn = encode_fn or self.encode
        moments = stvae_tiling.tiled_encode(
            lambda t: jnp.concatenate(fn(t), axis=-1), x,
            tile=c.tile_sample_size, frames=c.tile_sample_frames, overlap=c.tile_overlap,
            spatial=c.spatial_compression)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, logvar

    def tiled_decode(self, z: jax.Array, decode_fn: Callable | None = None) -> jax.Array:
        """``decode`` in overlapping latent tiles with blended seams; see ``tiled_encode``."""
        c = self.cfg
        return stvae_tiling.tiled_decode(
            decode_fn or self.decode, z, tile=c.tile_latent_size, frames=c.tile_latent_frames,
            overlap=c.tile_overlap, spatial=c.spatial_compression)


def measure_latent_stats(latents: jax.Array | np.ndarray) -> tuple[float, float]:
    """(shift, scale) that map ``latents`` to zero mean and unit std: shift = mean, scale = 1/std.

    ``latents`` are raw (un-normalised) samples, any shape; computed in float64 on the host.
    """
    z = np.asarray(latents, dtype=np.float64)
    if z.size < 2:
        raise ValueError("measure_latent_stats: need at least 2 latent values")
    std = float(z.std())
    if not std > 0:
        raise ValueError("measure_latent_stats: latents have zero variance; check the encoder")
    return float(z.mean()), 1.0 / std
