"""3D RoPE and segment-masked grouped-query attention with pluggable backends.

Every backend takes the same packed inputs:
  q [B, L, H, D], k/v [B, L, Hkv, D], segment ids [B, L] (0 = padding).
A token attends only to tokens of its own segment; padding attends to padding only, so it never
produces NaN and never touches real tokens. GQA: kv head j serves query heads j*G .. j*G+G-1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# context_*: shard_map over the mesh, K/V gathered over the context axis (context_parallel.py).
BACKENDS = ("xla", "cudnn", "splash", "context_xla", "context_splash")


# ------------------------------------------------------------------------------------------
# 3D rotary embedding (rotate-half form, one third of head_dim per axis).


def rope_frequencies(head_dim: int, base: float = 10000.0) -> np.ndarray:
    """Inverse frequencies per axis: [3, head_dim // 6]."""
    if head_dim % 6:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 6 for 3D RoPE")
    third = head_dim // 3
    inv = 1.0 / (base ** (np.arange(0, third, 2, dtype=np.float64)[: third // 2] / third))
    return np.stack([inv, inv, inv]).astype(np.float32)


def rope_tables(positions: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, L, head_dim // 2] (f32) for integer (t, h, w) positions [B, L, 3].

    Layout along the last axis: the t, h, w thirds, each holding head_dim//6 frequencies.
    """
    inv = jnp.asarray(rope_frequencies(head_dim))  # [3, F]
    ang = positions.astype(jnp.float32)[..., :, None] * inv  # [B, L, 3, F]
    ang = ang.reshape(*positions.shape[:-1], -1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, L, H, D] by tables [B, L, D/2]; each third of D rotates its own halves."""
    b, l, h, d = x.shape
    xf = x.astype(jnp.float32).reshape(b, l, h, 3, 2, d // 6)
    x1, x2 = xf[..., 0, :], xf[..., 1, :]
    c = cos.reshape(b, l, 1, 3, d // 6)
    s = sin.reshape(b, l, 1, 3, d // 6)
    out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-2)
    return out.reshape(b, l, h, d).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# Attention backends.


# The XLA backend has a hand-written VJP: on CPU, autodiff of the plain formulation spent more
# time transposing [L, L] score matrices (for dK = dS^T Q, dV = P^T dO) and re-running softmax
# arithmetic than in the matmuls. Here every product is a batched row-major matmul
# [Z, M, K] x [Z, K, N] (Z = batch x kv heads; only the small [L, D] operands are transposed,
# and merging batch and kv heads into Z makes XLA materialise those transposes, which keeps
# bf16 dots in bf16 on CPU, see layers.matmul); the softmax is normalised after P V (on
# [L, D]) and sum(P * dP) is computed as sum(dO * O). Same maths, reassociated.


def _group(x: jax.Array, hkv: int, transpose: bool = False) -> jax.Array:
    """[B, L, H, D] -> [B*Hkv, G*L, D] (or [B*Hkv, D, G*L]); query head h = kv head h // G,
    row = g * L + l. Works for K/V too (G = 1)."""
    b, l, h, d = x.shape
    x = x.reshape(b, l, hkv, h // hkv, d)
    if transpose:
        return x.transpose(0, 2, 4, 3, 1).reshape(b * hkv, d, -1)
    return x.transpose(0, 2, 3, 1, 4).reshape(b * hkv, -1, d)


def _ungroup(x: jax.Array, b: int, l: int) -> jax.Array:
    """Inverse of :func:`_group`: [B*Hkv, G*L, D] -> [B, L, H, D]."""
    z, n, d = x.shape
    return x.reshape(b, z // b, n // l, l, d).transpose(0, 3, 1, 2, 4).reshape(b, l, -1, d)


def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _xla_fwd(q, k, v, seg, scale):
    b, l, h, d = q.shape
    hkv = k.shape[2]
    s = _mm("znd,zdm->znm", _group(q, hkv), _group(k, hkv, transpose=True))  # [Z, G*L, L]
    s = s.reshape(b, hkv, h // hkv, l, l) * scale
    mask = (seg[:, :, None] == seg[:, None, :])[:, None, None]
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    den = jnp.sum(e, axis=-1).reshape(b * hkv, -1, 1)  # [Z, N, 1], >= 1
    e = e.astype(v.dtype).reshape(b * hkv, -1, l)  # unnormalised probabilities
    o = _mm("znm,zmd->znd", e, _group(v, hkv)) / den
    return _ungroup(o, b, l).astype(q.dtype), (q, k, v, e, den, o)


def _xla_bwd(scale, res, g):
    q, k, v, e, den, o = res
    b, l, h, d = q.shape
    hkv = k.shape[2]
    dt = q.dtype
    do = _group(g, hkv).astype(jnp.float32)  # [Z, N, D]
    delta = jnp.sum(do * o, axis=-1, keepdims=True)  # = rowsum(P * dP)
    dp = _mm("znd,zdm->znm", do.astype(dt), _group(v, hkv, transpose=True))
    ds = (e.astype(jnp.float32) * (dp - delta) * (scale / den)).astype(dt)  # d logits
    dq = _mm("znm,zmd->znd", ds, _group(k, hkv))
    dkt = _mm("zdn,znm->zdm", _group(q, hkv, transpose=True), ds)
    do_t = _group((g.astype(jnp.float32) / _ungroup(den, b, l)).astype(dt), hkv, transpose=True)
    dvt = _mm("zdn,znm->zdm", do_t, e)
    dk = dkt.reshape(b, hkv, d, l).transpose(0, 3, 1, 2)  # [B, M, Hkv, D]
    dv = dvt.reshape(b, hkv, d, l).transpose(0, 3, 1, 2)
    return _ungroup(dq, b, l).astype(dt), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _xla_attention(q, k, v, seg, scale):
    return _xla_fwd(q, k, v, seg, scale)[0]


def _xla_attention_fwd(q, k, v, seg, scale):
    out, res = _xla_fwd(q, k, v, seg, scale)
    return out, (res, seg)


def _xla_attention_bwd(scale, res_seg, g):
    res, seg = res_seg
    dq, dk, dv = _xla_bwd(scale, res, g)
    return dq, dk, dv, np.zeros(seg.shape, jax.dtypes.float0)


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def _xla(q, k, v, seg, scale):
    return _xla_attention(q, k, v, seg, float(scale))


def _cudnn(q, k, v, seg, scale):
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, implementation="cudnn"
    ).astype(q.dtype)


@functools.lru_cache(maxsize=16)
def _splash_kernel(length: int, groups: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    mask = sm.MultiHeadMask([sm.FullMask((length, length)) for _ in range(groups)])
    block = min(512, length)
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q, k, v, seg, scale, interpret=False):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )

    b, l, h, d = q.shape
    hkv = k.shape[2]
    pad = (-l) % 128  # kernel blocks are multiples of 128; padding is its own segment (0)
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)))
    lp = l + pad
    kernel = _splash_kernel(lp, h // hkv, interpret)
    qg = (q * scale).reshape(b, lp, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)  # [B,K,G,L,D]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,L,D]

    def one(qb, kb, vb, sb):  # qb [G, L, D], kb [L, D]
        return kernel(qb, kb, vb, segment_ids=sk.SegmentIds(q=sb, kv=sb))

    per_kv = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_kv)(qg, kt, vt, seg)  # [B, K, G, L, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, lp, h, d)
    return out[:, :l].astype(q.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    backend: str = "xla",
    scale: float | None = None,
) -> jax.Array:
    """Segment-masked GQA: q [B, L, H, D], k/v [B, L, Hkv, D], segment_ids [B, L] -> like q."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads not a multiple of {k.shape[2]} kv heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend.startswith("context_"):
        from lavin_jax.models import context_parallel

        return context_parallel.attention(q, k, v, segment_ids, local=backend[len("context_"):],
                                          scale=scale)
    if backend == "xla":
        return _xla(q, k, v, segment_ids, scale)
    if backend == "cudnn":
        return _cudnn(q, k, v, segment_ids, scale)
    if backend == "splash":
        return _splash(q, k, v, segment_ids, scale)
    if backend == "splash_interpret":  # CPU-checkable splash (tests only)
        return _splash(q, k, v, segment_ids, scale, interpret=True)
    raise ValueError(f"model.attention_backend={backend!r}; use one of {BACKENDS}")
