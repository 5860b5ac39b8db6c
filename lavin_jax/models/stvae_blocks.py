"""Building blocks of the ST-VAE (lavin_jax/models/stvae.py): causal 3D convs, clip-wide
GroupNorm, latent-conditioned spatial norm, resnets, and the space/time down/up samplers.

Layout everywhere is channels-last ``[B, T, H, W, C]``. Convolution kernels are
``[kt, kh, kw, C_in, C_out]`` (DHWIO) with logical names ("kernel", "kernel", "kernel",
"conv_in", "conv_out"); per-frame 2D convs store ``[kh, kw, C_in, C_out]``. Norm statistics are
f32; everything else runs in the compute ``dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavin_jax.models.layers import param


def _torch_conv_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """PyTorch's default conv init (kaiming_uniform, a=sqrt(5)): uniform(+-1/sqrt(fan_in)).

    Drawn flat and reshaped: XLA:CPU takes ~10 s to compile a 5-D threefry draw, ~1 s a 1-D one.
    """
    size = int(np.prod(shape))
    bound = float(np.prod(shape[:-1])) ** -0.5
    return jax.random.uniform(key, (size,), dtype, -bound, bound).reshape(shape)

_DN2 = ("NHWC", "HWIO", "NHWC")
ACT_NAMES = ("act_batch", "act_frames", "act_height", "act_width", "act_channels")


class Conv(nnx.Module):
    """A 3D conv (``kernel=(kt, kh, kw)``) or a per-frame 2D conv (``kernel=(kh, kw)``).

    ``causal`` time padding repeats the first frame ``kt - 1`` times in front, so output frame t
    sees input frames <= t only. Space is zero-padded by ``k // 2`` on both sides unless
    ``pad_hw`` is given as ((top, bottom), (left, right)).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: tuple[int, ...],
        *,
        stride: int = 1,
        pad_hw: tuple[tuple[int, int], tuple[int, int]] | None = None,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.stride = stride
        names = ("kernel",) * len(kernel) + ("conv_in", "conv_out")
        shape = tuple(kernel) + (c_in, c_out)
        self.kernel = param(rngs, _torch_conv_init, shape, names, param_dtype)
        # PyTorch also draws the bias uniform(+-1/sqrt(fan_in)); zeros train just as well.
        self.bias = param(rngs, nnx.initializers.zeros, (c_out,), ("conv_out",), param_dtype)
        kh, kw = kernel[-2:]
        self.pad_hw = pad_hw if pad_hw is not None else ((kh // 2, kh // 2), (kw // 2, kw // 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, H, W, C_in] -> [B, T, H', W', C_out].

        Runs as 2D convs over [B*T, H, W, C] frames, one per temporal tap, summed: XLA:CPU's 3D
        convolution is ~2x slower per MAC than its 2D one. A single frame (images) sees the
        same frame under every tap, so its taps are summed into one 2D kernel (kt x less work).
        """
        k = self.kernel[...]
        if k.ndim == 4:  # per-frame 2D conv
            k = k[None]
        kt = k.shape[0]
        b, t = x.shape[:2]
        x = x.astype(self.dtype)
        if t == 1 and kt > 1:
            k, kt = k.sum(0, keepdims=True), 1  # summed in the param dtype, then cast
        k = k.astype(self.dtype)
        if kt > 1:
            x = jnp.concatenate([jnp.repeat(x[:, :1], kt - 1, axis=1), x], axis=1)
        y = None
        for j in range(kt):
            xj = x[:, j:j + t]
            yj = jax.lax.conv_general_dilated(
                xj.reshape(b * t, *xj.shape[2:]), k[j], window_strides=(self.stride,) * 2,
                padding=tuple(self.pad_hw), dimension_numbers=_DN2,
            )
            y = yj if y is None else y + yj
        y = y.reshape(b, t, *y.shape[1:])
        return y + self.bias[...].astype(self.dtype)


def group_norm(x: jax.Array, groups: int, eps: float) -> jax.Array:
    """GroupNorm without affine; statistics over the whole clip (T, H, W, channels in group), f32.

    x [B, T, H, W, C] -> same shape, f32.
    """
    b, t, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, t, h, w, groups, c // groups)
    mean = jnp.mean(xf, axis=(1, 2, 3, 5), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 3, 5), keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(b, t, h, w, c)


class GroupNorm(nnx.Module):
    """Affine GroupNorm over the whole clip (PyTorch nn.GroupNorm semantics on NCTHW)."""

    def __init__(self, channels: int, groups: int, eps: float, *, param_dtype, dtype, rngs):
        self.groups, self.eps, self.dtype = groups, eps, dtype
        self.scale = param(rngs, nnx.initializers.ones, (channels,), ("norm",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = group_norm(x, self.groups, self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch's nearest rule src = floor(dst * in / out), exact in integers."""
    return np.minimum((np.arange(n_out) * n_in) // n_out, n_in - 1)


def _resize_axis(z: jax.Array, axis: int, index: np.ndarray) -> jax.Array:
    n = z.shape[axis]
    if len(index) == n and (index == np.arange(n)).all():
        return z
    r = len(index) // n
    if len(index) % n == 0 and (index == np.arange(len(index)) // r).all():
        return jnp.repeat(z, r, axis=axis)
    return jnp.take(z, index, axis=axis)  # one static gather (fuses; a concat would not)


def resize_nearest(z: jax.Array, size: tuple[int, int, int]) -> jax.Array:
    """Nearest resize of [B, T, H, W, C] to (T', H', W') with torch's index rule
    (torch.nn.functional.interpolate(mode="nearest", size=...))."""
    for axis, out in zip((1, 2, 3), size):
        z = _resize_axis(z, axis, _nearest_index(z.shape[axis], out))
    return z


def match_latent(zq: jax.Array, like: jax.Array) -> jax.Array:
    """Nearest-resizes the latent ``zq`` to ``like``'s (T, H, W).

    For an odd clip of more than one frame, the first frame maps to the first latent frame alone
    and the rest to the rest (the 1 + 4k structure).
    """
    t, h, w = like.shape[1:4]
    tz = zq.shape[1]
    if t > 1 and t % 2 == 1:
        t_index = np.concatenate([[0], 1 + _nearest_index(tz - 1, t - 1)])
    else:
        t_index = _nearest_index(tz, t)
    zq = _resize_axis(zq, 1, t_index)
    return resize_nearest(zq, (t, h, w))


class SpatialNorm(nnx.Module):
    """MoVQ-style norm: GroupNorm(f) * conv_y(z) + conv_b(z), z nearest-resized to f."""

    def __init__(self, channels: int, z_channels: int, groups: int, eps: float, *,
                 param_dtype, dtype, rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.norm = GroupNorm(channels, groups, eps, **kw)
        self.conv_y = Conv(z_channels, channels, (1, 1, 1), **kw)
        self.conv_b = Conv(z_channels, channels, (1, 1, 1), **kw)

    def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
        # The 1x1x1 convs commute with nearest resizing: run them at latent resolution (64x
        # fewer FLOPs at full size) and resize their outputs, which fuse into the product.
        y, b = match_latent(self.conv_y(zq), f), match_latent(self.conv_b(zq), f)
        return self.norm(f) * y + b


class ResnetBlock(nnx.Module):
    """norm -> SiLU -> causal conv3 -> norm -> SiLU -> causal conv3, plus a 1x1x1 shortcut when
    the width changes. Norms are GroupNorm, or SpatialNorm when ``z_channels`` is given."""

    def __init__(self, c_in: int, c_out: int, *, groups: int, eps: float,
                 z_channels: int | None = None, spatial_groups: int = 32,
                 param_dtype, dtype, rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        if z_channels is None:
            self.norm1 = GroupNorm(c_in, groups, eps, **kw)
            self.norm2 = GroupNorm(c_out, groups, eps, **kw)
        else:
            self.norm1 = SpatialNorm(c_in, z_channels, spatial_groups, eps, **kw)
            self.norm2 = SpatialNorm(c_out, z_channels, spatial_groups, eps, **kw)
        self.spatial = z_channels is not None
        self.conv1 = Conv(c_in, c_out, (3, 3, 3), **kw)
        self.conv2 = Conv(c_out, c_out, (3, 3, 3), **kw)
        self.shortcut = Conv(c_in, c_out, (1, 1, 1), **kw) if c_in != c_out else None

    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        norm = (lambda n, h: n(h, zq)) if self.spatial else (lambda n, h: n(h))
        h = self.conv1(jax.nn.silu(norm(self.norm1, x)))
        h = self.conv2(jax.nn.silu(norm(self.norm2, h)))
        skip = self.shortcut(x) if self.shortcut is not None else x.astype(h.dtype)
        return skip + h


def _avg_pairs(x: jax.Array) -> jax.Array:
    """Mean of consecutive frame pairs (a trailing odd frame is dropped, like avg_pool1d)."""
    b, t = x.shape[:2]
    n = t // 2
    return x[:, : 2 * n].reshape(b, n, 2, *x.shape[2:]).mean(axis=2).astype(x.dtype)


def pool_time(x: jax.Array) -> jax.Array:
    """Temporal 2x average pooling that keeps the first frame alone when T is odd.

    [B, 1 + 2k, ...] -> [B, 1 + k, ...]; an even T is pooled in pairs.
    """
    if x.shape[1] % 2 == 1:
        if x.shape[1] == 1:
            return x
        return jnp.concatenate([x[:, :1], _avg_pairs(x[:, 1:])], axis=1)
    return _avg_pairs(x)


class Downsample(nnx.Module):
    """(optional temporal pool) -> zero-pad bottom/right by 1 -> per-frame conv3 stride 2."""

    def __init__(self, channels: int, *, compress_time: bool, param_dtype, dtype, rngs):
        self.compress_time = compress_time
        self.conv = Conv(channels, channels, (3, 3), stride=2, pad_hw=((0, 1), (0, 1)),
                         param_dtype=param_dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.compress_time:
            x = pool_time(x)
        return self.conv(x)


def upsample_nearest(x: jax.Array, *, time: bool) -> jax.Array:
    """2x nearest in H, W; with ``time`` also 2x in T for every frame but the first.

    [B, 1 + k, H, W, C] -> [B, 1 + 2k, 2H, 2W, C] (time) or [B, 1 + k, 2H, 2W, C].
    """
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    if time and x.shape[1] > 1:
        x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
    return x


class Upsample(nnx.Module):
    """nearest 2x (space, and time but the first frame) -> per-frame conv3."""

    def __init__(self, channels: int, *, compress_time: bool, param_dtype, dtype, rngs):
        self.compress_time = compress_time
        self.conv = Conv(channels, channels, (3, 3), param_dtype=param_dtype, dtype=dtype,
                         rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest(x, time=self.compress_time))
