"""Small building blocks shared by the J-DiT and the ST-VAE.

Parameters carry logical axis names (see lavin_jax/sharding.py); precision is two dtypes:
``param_dtype`` (storage) and ``dtype`` (compute). Norm statistics are always f32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = nnx.initializers.Initializer


def param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype: jnp.dtype,
) -> nnx.Param:
    """An nnx.Param initialised by ``init`` and tagged with logical axis ``names``."""
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} logical names {names} for shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(names))


class Dense(nnx.Module):
    """y = x @ W (+ b). W: [in, out] with logical names ``names``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        names: tuple[str | None, str | None],
        *,
        use_bias: bool = True,
        kernel_init: Initializer = nnx.initializers.xavier_uniform(),
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, (in_features, out_features), names, param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros, (out_features,), names[1:], param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        # Flattened to 2D: the weight gradient is then one [in, T] x [T, out] matmul; with the
        # batch dims kept, XLA CPU transposed the [T, out] cotangent first (slow copy fusions).
        x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = jnp.dot(x2, self.kernel[...].astype(self.dtype)).reshape(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def rms_norm(x: jax.Array, eps: float = 1e-6, scale: jax.Array | None = None) -> jax.Array:
    """RMSNorm over the last axis with f32 statistics; result in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned per-channel scale (ones-initialised)."""

    def __init__(
        self, dim: int, name: str, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.eps, self.scale[...])


class LayerNorm(nnx.Module):
    """LayerNorm with affine scale and bias, f32 statistics (PyTorch default eps 1e-5)."""

    def __init__(
        self, dim: int, name: str, *, eps: float = 1e-5, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (name,), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), (name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def dtype_of(name: str) -> jnp.dtype:
    """Config string -> dtype, with a clear error."""
    table = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16,
             "bf16": jnp.bfloat16, "float16": jnp.float16, "f16": jnp.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]
