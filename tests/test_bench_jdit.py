"""J-DiT benchmark CLI and the speed paths it relies on (hand-written VJPs, unrolled layers,
2-frame CFG null branch): each must equal the plain formulation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import latents, tiny_jdit

from lavin_jax import flow, packing
from lavin_jax.models import attention as attn
from lavin_jax.models.layers import matmul
from lavin_jax.tools import bench_copy, bench_jdit


def test_bench_main_prints_json_last(capsys):
    argv = ["bench", "--config", "configs/lavin_dit.py:demo", "--hidden", "48", "--depth", "2",
            "--heads", "4", "--kv_group", "2", "--channels", "4", "--latent", "4x4",
            "--context_frames", "2", "--steps", "1", "--warmup", "0", "--sample_reps", "1",
            "--peak_size", "128", "--dtype", "bf16"]
    bench_jdit.main(argv)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("train_step_s", "sample_s", "flops_per_s", "peak_flops_per_s",
                "train_step_cpu_s", "train_flops", "flops_source"):
        assert key in out, key
    assert out["train_step_s"] > 0 and out["sample_s"] > 0 and out["peak_flops_per_s"] > 0
    assert out["hidden"] == 48 and out["dtype"] == "bf16" and np.isfinite(out["loss"])


def test_copy_probe_prints_curve_and_learns(capsys):
    """bench copy: a tiny J-DiT on the identity task; the one-step error from noise falls from
    its value at init (the zero-initialised output layer predicts v = 0)."""
    argv = ["bench", "--steps", "30", "--probe_every", "10", "--batch", "4", "--latent", "8",
            "--config.model.hidden_size=48", "--config.model.depth=1",
            "--config.model.num_heads=2", "--config.model.kv_group=1",
            "--config.model.embed_bias_init=1.0", "--config.optim.lr=3e-3",
            "--config.optim.warmup_steps=5"]
    bench_copy.main(argv)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s for s, _ in out["one_step_mse"]] == [0, 10, 20, 30]
    assert out["final_mse"] < out["one_step_mse"][0][1] and out["zero_mse"] > 0
    with pytest.raises(SystemExit):
        bench_copy.main(["bench", "--latent", "10"])


def test_bench_rejects_bad_latent():
    with pytest.raises(SystemExit, match="--latent"):
        bench_jdit.main(["bench", "--latent", "16"])


def test_analytic_flops_hand_count():
    cfg = bench_jdit.JDiTConfig(hidden_size=12, depth=1, num_heads=2, kv_group=2, patch_size=1,
                                in_channels=1, freq_dim=4)
    # L = 2 tokens; per token: q 144 + k,v 2*72 + o 144 + SwiGLU 3*12*mlp_dim(0) MACs.
    assert cfg.mlp_dim == 0
    per_layer = 2 * 2 * (144 + 144 + 144) + 4 * 2**2 * 12
    per_example = 2 * (4 * 12 + 144 + 2 * 12 * 48 + 144)
    embed = 2 * 2 * 1 * 12
    dead = 2 * 144  # the last block's cond-stream output projection (its MLP is empty here)
    assert bench_jdit.analytic_flops(cfg, 1, 1, 1, 1) == per_layer - dead + embed + per_example


@pytest.mark.parametrize("dtype,shape,tol", [(jnp.float32, (2, 6, 8), 1e-5),
                                             (jnp.float32, (3, 5, 7), 1e-5),
                                             (jnp.bfloat16, (2, 40, 8), 3e-2)])
def test_matmul_vjp_matches_autodiff(dtype, shape, tol):
    x = latents(0, *shape)
    w = latents(1, shape[-1], 10 if shape[-1] % 2 == 0 else 9)
    ct = latents(2, *shape[:-1], w.shape[1])

    def ours(x, w):
        return jnp.sum(matmul(x.astype(dtype), w, dtype).astype(jnp.float32) * ct)

    def plain(x, w):
        y = jnp.dot(x.astype(dtype).astype(jnp.float32), w.astype(dtype).astype(jnp.float32))
        return jnp.sum(y * ct)

    got, want = jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)
    assert got[1].dtype == jnp.float32  # f32 parameters keep f32 gradients
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def _reference_attention(q, k, v, seg):
    """Plain autodiff GQA attention (the formulation the hand-written VJP replaces)."""
    b, l, h, d = q.shape
    hkv = k.shape[2]
    s = jnp.einsum("blkgd,bmkd->bkglm", q.reshape(b, l, hkv, h // hkv, d), k) * d**-0.5
    s = jnp.where((seg[:, :, None] == seg[:, None, :])[:, None, None], s, -1e30)
    o = jnp.einsum("bkglm,bmkd->blkgd", jax.nn.softmax(s, axis=-1), v)
    return o.reshape(b, l, h, d)


def test_xla_attention_vjp_matches_autodiff():
    q, k, v = latents(0, 2, 7, 6, 12), latents(1, 2, 7, 2, 12), latents(2, 2, 7, 2, 12)
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    ct = latents(3, 2, 7, 6, 12)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg) * ct)

    got = jax.grad(loss(lambda *a: attn.attention(*a, backend="xla")), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(_reference_attention), (0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_unrolled_layers_match_scan():
    scan, loop = tiny_jdit(), tiny_jdit(scan_layers=False)
    x, cond, t = latents(0, 2, 1, 4, 4, 4), latents(1, 2, 3, 4, 4, 4), jnp.array([0.3, 0.8])

    def loss(model):
        return jnp.sum(model(x, t, cond) ** 2)

    np.testing.assert_allclose(loop(x, t, cond), scan(x, t, cond), atol=1e-5)
    g_scan = jax.tree.leaves(nnx.grad(loss)(scan))
    g_loop = jax.tree.leaves(nnx.grad(loss)(loop))
    for a, b in zip(g_loop, g_scan):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_two_frame_null_branch_equals_padded_null_context():
    # The sampler runs the CFG null branch as a 2-frame call; padding it back to the full
    # context (segment 0 tokens) must not change the target tokens' velocity.
    model = tiny_jdit()
    x, cond = latents(0, 2, 1, 4, 4, 4), latents(1, 2, 5, 4, 4, 4)
    null, n = flow.null_context(cond)
    t = jnp.array([0.4, 0.6])
    padded = model.forward_packed(packing.pack_latents(x, t, null, 2, n))
    short = model.forward_packed(packing.pack_latents(x, t, null[:, :2], 2))
    np.testing.assert_allclose(short, padded, atol=1e-5)


def test_segment_gather_vjp_is_the_gather_transpose():
    # jdit._gather_segments has a one-hot-matmul backward (GPU scatter-add was pathological).
    from lavin_jax.models.jdit import _gather_segments

    per_seg = latents(0, 2, 3, 5)
    seg = jnp.array([[1, 1, 2, 3, 3, 0], [2, 2, 2, 1, 0, 0]])
    ct = latents(1, 2, 6, 5)

    def plain(p):
        idx = jnp.clip(seg - 1, 0, 2)
        return jnp.sum(jnp.take_along_axis(p, idx[..., None], axis=1) * ct)

    ours = lambda p: jnp.sum(_gather_segments(p, seg) * ct)
    want = jnp.take_along_axis(per_seg, jnp.clip(seg - 1, 0, 2)[..., None], 1)
    np.testing.assert_array_equal(_gather_segments(per_seg, seg), want)
    np.testing.assert_allclose(jax.grad(ours)(per_seg), jax.grad(plain)(per_seg),
                               rtol=1e-6, atol=1e-6)
