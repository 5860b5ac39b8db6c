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

BACKENDS = ("xla", "cudnn", "splash")


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


def _xla(q, k, v, seg, scale):
    b, l, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, l, hkv, h // hkv, d)
    logits = jnp.einsum("blkgd,bmkd->bkglm", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    mask = (seg[:, :, None] == seg[:, None, :])[:, None, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkglm,bmkd->blkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, l, h, d).astype(q.dtype)


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
    if backend == "xla":
        return _xla(q, k, v, segment_ids, scale)
    if backend == "cudnn":
        return _cudnn(q, k, v, segment_ids, scale)
    if backend == "splash":
        return _splash(q, k, v, segment_ids, scale)
    if backend == "splash_interpret":  # CPU-checkable splash (tests only)
        return _splash(q, k, v, segment_ids, scale, interpret=True)
    raise ValueError(f"model.attention_backend={backend!r}; use one of {BACKENDS}")
