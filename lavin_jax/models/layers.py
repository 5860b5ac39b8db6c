"""Small building blocks shared by the J-DiT and the ST-VAE.

Parameters carry logical axis names (see lavin_jax/sharding.py); precision is two dtypes:
``param_dtype`` (storage) and ``dtype`` (compute). Norm statistics are always f32.
"""

from __future__ import annotations

import functools
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
        y = matmul(x.astype(self.dtype), self.kernel[...], self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x [..., in] (already ``dtype``) @ w [in, out] -> [..., out] in ``dtype``.

    All three products (y, dx, dw) multiply ``dtype`` operands and accumulate in f32; dw comes
    back in w's dtype (f32 parameters keep f32 gradients). Hand-written for XLA CPU, where a
    bf16 dot is only kept in bf16 (2x the f32 rate) when it has f32 output and both operands are
    row-major with the contraction on the lhs' last and the rhs' first axis; anything else is
    silently computed in f32, and plain autodiff produces exactly such dots (x^T g, g w^T).
    Splitting a contracted axis in two (see :func:`split_contract`) makes XLA materialise the
    transposed operand instead. Same maths on every backend.
    """
    return _matmul_fwd(x, w, dtype)[0]


def split_contract(a: jax.Array, axis: int) -> jax.Array:
    """Splits ``axis`` into (2, n/2) (when even): a contraction over both then lowers to a
    canonical row-major dot with an explicit transpose on XLA CPU (see :func:`matmul`)."""
    n = a.shape[axis]
    if n % 2:
        return a
    return a.reshape(*a.shape[:axis], 2, n // 2, *a.shape[axis + 1:])


def _matmul_fwd(x, w, dtype):
    x2 = x.reshape(-1, x.shape[-1])
    y = jnp.dot(x2, w.astype(dtype), preferred_element_type=jnp.float32)
    return y.astype(dtype).reshape(*x.shape[:-1], w.shape[1]), (x, w)


def _matmul_bwd(dtype, res, g):
    x, w = res
    f32 = jnp.float32
    g2 = g.reshape(-1, g.shape[-1]).astype(dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if dtype != jnp.float32 and g2.shape[1] % 2 == 0 and g2.shape[0] >= 64:
        # dx = g w^T over the split `out` axis (f32 dots run natively in any layout, and for a
        # few rows the f32 product is cheaper than transposing w)
        dx = jnp.einsum("tab,iab->ti", split_contract(g2, 1), split_contract(w.astype(dtype), 1),
                        preferred_element_type=f32)
    else:
        dx = jnp.dot(g2, w.astype(dtype).T, preferred_element_type=f32)
    if x2.shape[0] % 2 == 0:  # dw = x^T g, contracting the split token axis
        dw = jnp.einsum("abi,abo->io", split_contract(x2, 0), split_contract(g2, 0),
                        preferred_element_type=f32)
    else:
        dw = jnp.dot(x2.T, g2, preferred_element_type=f32)
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


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
        self, dim: int, name: str, *, eps: float = 1e-5, param_dtype=jnp.float32,
        bias_init=nnx.initializers.zeros, rngs: nnx.Rngs
    ):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (name,), param_dtype)
        self.bias = param(rngs, bias_init, (dim,), (name,), param_dtype)

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
