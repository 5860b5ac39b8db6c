"""Context (sequence) parallelism for the J-DiT's joint attention over the ``context`` mesh axis.

A 512 px episode with 8 pairs is ~18k tokens a row (videos more). With ``mesh.context = C`` every
activation row is split along its length over C devices (logical ``act_length``). Attention is
the one op that mixes positions: here each device keeps its query chunk [B, L/C, H, D] and
all-gathers K and V over the context axis -- with GQA only Hkv = H / kv_group heads, e.g. 8 of 32
for the 3.4b, so the gather is a quarter of q's size -- then attends its queries to the whole row
with segment masks. Under autodiff the gather's transpose is a reduce-scatter of dK/dV. Memory per
device is the local chunk's attention (the XLA path's [L/C, L] logits; the splash kernel's
O(L/C) blocks), so C divides the quadratic term.

Chosen by ``model.attention_backend``: ``context_xla`` or ``context_splash`` (the local attention
after the gather). On any multi-device mesh it is a shard_map over the batch / length / head axes
(``context_splash`` is thus also the way to run the splash kernel on a sharded TPU mesh: Mosaic
kernels cannot be partitioned by XLA); with the length unsplit there is no gather. Without an
active mesh (lavin_jax.sharding.use_rules) it is plain local attention. The result equals the
unsharded attention up to float rounding (tests/test_context_parallel.py).

Shapes: q [B, L, H, D], k/v [B, L, Hkv, D], segment ids [B, L] (0 = padding, attends padding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lavin_jax import sharding

LOCAL_BACKENDS = ("xla", "splash", "splash_interpret")
BACKENDS = tuple(f"context_{b}" for b in LOCAL_BACKENDS[:2])


# ------------------------------------------------------------------------------------------
# Local attention of a query chunk to a (longer) key/value row: separate q / kv segment ids.


def _local_xla(q, k, v, q_seg, kv_seg, scale):
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, lq, hkv, h // hkv, d)
    logits = jnp.einsum("blkgd,bmkd->bkglm", qg, k, preferred_element_type=jnp.float32) * scale
    mask = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkglm,bmkd->blkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, h, d).astype(q.dtype)


def _block(n: int) -> int:
    """Largest kernel block (a multiple of 128, at most 512) dividing n (a multiple of 128)."""
    return next(b for b in (512, 384, 256, 128) if n % b == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(lq: int, lkv: int, groups: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    mask = sm.MultiHeadMask([sm.FullMask((lq, lkv)) for _ in range(groups)])
    bq, bkv = _block(lq), _block(lkv)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                          block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                          block_kv_dq=bkv)
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _local_splash(q, k, v, q_seg, kv_seg, scale, interpret=False):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )

    b, lq, h, d = q.shape
    lkv, hkv = k.shape[1], k.shape[2]
    pq, pkv = (-lq) % 128, (-lkv) % 128
    # Kernel blocks are multiples of 128; the padding gets its own segment (-1), so real tokens
    # and the row's own padding (0) are untouched by it.
    q = jnp.pad(q, ((0, 0), (0, pq), (0, 0), (0, 0)))
    q_seg = jnp.pad(q_seg, ((0, 0), (0, pq)), constant_values=-1)
    k, v = (jnp.pad(t, ((0, 0), (0, pkv), (0, 0), (0, 0))) for t in (k, v))
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pkv)), constant_values=-1)
    kernel = _splash_kernel(lq + pq, lkv + pkv, h // hkv, interpret)
    qg = (q * scale).reshape(b, lq + pq, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lkv, D]

    def one(qb, kb, vb, qs, ks):  # qb [G, Lq, D], kb/vb [Lkv, D]
        return kernel(qb, kb, vb, segment_ids=sk.SegmentIds(q=qs, kv=ks))

    per_kv = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_kv)(qg, kt, vt, q_seg, kv_seg)  # [B, Hkv, G, Lq, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, lq + pq, h, d)
    return out[:, :lq].astype(q.dtype)


def local_attention(q, k, v, q_seg, kv_seg, *, backend: str = "xla", scale: float):
    """q [B, Lq, H, D] attends k/v [B, Lkv, Hkv, D] where q_seg [B, Lq] == kv_seg [B, Lkv]."""
    if backend == "xla":
        return _local_xla(q, k, v, q_seg, kv_seg, scale)
    if backend in ("splash", "splash_interpret"):
        return _local_splash(q, k, v, q_seg, kv_seg, scale, interpret=backend != "splash")
    raise ValueError(f"context parallel local backend {backend!r}; use one of {LOCAL_BACKENDS}")


# ------------------------------------------------------------------------------------------
# The sharded attention.


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def specs(q_shape, kv_shape, mesh, rules) -> tuple[P, P, P]:
    """(q, kv, segment) PartitionSpecs from the logical rules (batch, length, heads)."""
    qs = sharding.logical_to_spec(("act_batch", "act_length", "act_heads", None), rules,
                                  q_shape, mesh)
    ks = sharding.logical_to_spec(("act_batch", "act_length", "act_kv_heads", None), rules,
                                  kv_shape, mesh)
    batch = qs[0] if qs[0] == ks[0] else None
    length = qs[1] if qs[1] == ks[1] else None
    heads = qs[2] if qs[2] == ks[2] else None  # GQA groups stay whole only if both split alike
    return P(batch, length, heads, None), P(batch, length, heads, None), P(batch, length)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
              local: str = "xla", scale: float | None = None, mesh=None, rules=None
              ) -> jax.Array:
    """Segment-masked GQA with the sequence split over the ``act_length`` mesh axes.

    q [B, L, H, D], k/v [B, L, Hkv, D], segment_ids [B, L] -> [B, L, H, D]. ``mesh``/``rules``
    default to the active :func:`lavin_jax.sharding.use_rules` context. Always a shard_map on a
    multi-device mesh (so Mosaic kernels such as splash, which XLA cannot partition, run per
    shard); the K/V gather happens only when the length is split.
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads not a multiple of {k.shape[2]} kv heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mesh is None:
        active = getattr(sharding._ctx, "active", None)
        mesh, rules = active if active is not None else (None, None)
    if mesh is None or mesh.size == 1:
        return local_attention(q, k, v, segment_ids, segment_ids, backend=local, scale=scale)
    q_spec, kv_spec, seg_spec = specs(q.shape, k.shape, mesh, rules)
    length = _axes(q_spec[1])

    def chunk(qc, kc, vc, segc):
        if not length:
            return local_attention(qc, kc, vc, segc, segc, backend=local, scale=scale)
        gather = functools.partial(jax.lax.all_gather, axis_name=length, axis=1, tiled=True)
        return local_attention(qc, gather(kc), gather(vc), segc, gather(segc), backend=local,
                               scale=scale)

    fn = jax.shard_map(chunk, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)
    return fn(q, k, v, segment_ids)
