"""Context parallelism (lavin_jax/models/context_parallel.py) equals the unsharded attention."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lavin_jax import sharding
from lavin_jax.models import attention as attn_lib
from lavin_jax.models import context_parallel as cp


def _mesh(**sizes):
    cfg = sharding.default_config()
    cfg.mesh = ml_collections.ConfigDict({**dict(data=1, fsdp=1, tensor=1, context=1), **sizes})
    return sharding.make_mesh(cfg), cfg.sharding.rules


def _inputs(b=2, l=64, h=4, hkv=2, d=12, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, l, n, d)), jnp.float32)
               for n in (h, hkv, hkv))
    # Several segments per row, one crossing every chunk boundary, plus trailing padding (0).
    seg = np.zeros((b, l), np.int32)
    seg[0, :20], seg[0, 20:50], seg[0, 50:60] = 1, 2, 3
    seg[1, :37], seg[1, 37:] = 1, 2
    return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize("sizes", [dict(context=4, data=2), dict(context=2, tensor=2, fsdp=2)])
def test_forward_and_grads_match_unsharded(sizes):
    mesh, rules = _mesh(**sizes)
    q, k, v, seg = _inputs()
    real = (seg > 0)[..., None, None]

    def loss(fn, q, k, v):
        out = fn(q, k, v, seg)
        return jnp.sum(jnp.where(real, out, 0.0) * jnp.cos(jnp.arange(out.shape[-1]))), out

    ref_fn = lambda q, k, v, s: attn_lib.attention(q, k, v, s, backend="xla")

    def cp_fn(q, k, v, s):
        with sharding.use_rules(mesh, rules):
            q = sharding.constrain(q, ("act_batch", "act_length", "act_heads"))
            return cp.attention(q, k, v, s, local="xla")

    (l0, o0), g0 = jax.jit(jax.value_and_grad(lambda *a: loss(ref_fn, *a), (0, 1, 2),
                                              has_aux=True))(q, k, v)
    (l1, o1), g1 = jax.jit(jax.value_and_grad(lambda *a: loss(cp_fn, *a), (0, 1, 2),
                                              has_aux=True))(q, k, v)
    np.testing.assert_allclose(o1, o0, atol=2e-5, rtol=1e-5)  # padding rows included
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_really_sharded_and_no_gather_without_context_axis():
    mesh, rules = _mesh(context=4, data=2)
    q, k, v, seg = _inputs()
    q_spec, kv_spec, seg_spec = cp.specs(q.shape, k.shape, mesh, rules)
    assert q_spec[1] == "context" and kv_spec[1] == "context" and seg_spec == P("data", "context")
    with sharding.use_rules(mesh, rules):
        hlo = jax.jit(lambda *a: cp.attention(*a)).lower(q, k, v, seg).as_text()
    assert "all_gather" in hlo or "all-gather" in hlo
    flat, rules1 = _mesh(data=2, fsdp=4)
    assert cp.specs(q.shape, k.shape, flat, rules1)[0][1] is None  # length not split: no gather
    with sharding.use_rules(flat, rules1):
        out = jax.jit(lambda *a: cp.attention(*a))(q, k, v, seg)
        hlo = jax.jit(lambda *a: cp.attention(*a)).lower(q, k, v, seg).as_text()
    assert "all_gather" not in hlo and "all-gather" not in hlo
    np.testing.assert_allclose(out, attn_lib.attention(q, k, v, seg), atol=1e-6)
    np.testing.assert_allclose(cp.attention(q, k, v, seg), attn_lib.attention(q, k, v, seg),
                               atol=1e-6)  # no mesh at all


def test_gqa_heads_split_over_tensor_only_when_both_divide():
    mesh, rules = _mesh(context=2, tensor=4)
    # 8 query heads / 2 kv heads: kv heads cannot split 4 ways -> neither does q inside shard_map.
    q_spec, kv_spec, _ = cp.specs((2, 64, 8, 12), (2, 64, 2, 12), mesh, rules)
    assert q_spec[2] is None and kv_spec[2] is None
    q_spec, kv_spec, _ = cp.specs((2, 64, 8, 12), (2, 64, 4, 12), mesh, rules)
    assert q_spec[2] == "tensor" and kv_spec[2] == "tensor"


def test_splash_local_kernel_matches_xla_with_uneven_lengths():
    """The rectangular splash path (interpret mode on CPU), padding to 128 with its own segment."""
    q, k, v, seg = _inputs(b=2, l=200, h=2, hkv=1, d=12, seed=1)
    q_seg = seg[:, :72]
    out = cp.local_attention(q[:, :72], k, v, q_seg, seg, backend="splash_interpret",
                             scale=12**-0.5)
    ref = cp.local_attention(q[:, :72], k, v, q_seg, seg, backend="xla", scale=12**-0.5)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_context_splash_under_shard_map_matches_xla():
    mesh, rules = _mesh(context=2, data=2, fsdp=2)
    q, k, v, seg = _inputs(b=2, l=256, h=2, hkv=1, d=12, seed=2)  # 128 tokens per chunk
    with sharding.use_rules(mesh, rules):
        out = jax.jit(lambda *a: cp.attention(*a, local="splash_interpret"))(q, k, v, seg)
    np.testing.assert_allclose(out, attn_lib.attention(q, k, v, seg), atol=2e-5, rtol=1e-5)


def test_jdit_with_context_parallel_equals_unsharded():
    """The whole J-DiT (demo-sized) on a data=2 x context=4 mesh vs one device: same velocity."""
    from flax import nnx

    from lavin_jax import packing
    from lavin_jax.models.jdit import JDiT, JDiTConfig

    if "context_xla" not in attn_lib.BACKENDS:
        pytest.skip("attention.py dispatch hook for context_* backends not present")
    kw = dict(hidden_size=48, depth=2, num_heads=4, kv_group=2, patch_size=2, in_channels=4,
              freq_dim=32)
    with nnx.use_eager_sharding(False):
        ref_model = JDiT(JDiTConfig(**kw), rngs=nnx.Rngs(0))
        cp_model = JDiT(JDiTConfig(**kw, attention_backend="context_xla"), rngs=nnx.Rngs(0))
    # Random weights everywhere (the zero-initialised output layer would hide any difference).
    params = nnx.state(ref_model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    for m in (ref_model, cp_model):
        nnx.update(m, jax.tree.unflatten(tree, noisy))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 1, 8, 8, 4)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((2, 3, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([0.3, 0.8], jnp.float32)
    batch = packing.pack_latents(x, t, cond, 2)  # Lc 48 + Lx 16 tokens
    ref = ref_model.forward_packed(batch)
    mesh, rules = _mesh(context=4, data=2)
    with sharding.use_rules(mesh, rules):
        fwd = jax.jit(lambda b: cp_model.forward_packed(b))
        out = fwd(batch)
        hlo = fwd.lower(batch).as_text()
    assert "all_gather" in hlo or "all-gather" in hlo  # K/V really gathered over context
    assert float(jnp.std(ref)) > 0.1  # a non-trivial output
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
