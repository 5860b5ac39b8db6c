"""Flow matching: the released loss, timestep sampling, context dropout, grids and samplers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import latents, tiny_jdit

from lavin_jax import flow, packing


def test_segment_loss_hand_computed():
    pred = jnp.array([[[1.0, 3.0], [0.0, 0.0], [2.0, 2.0], [9.0, 9.0]]])
    target = jnp.zeros((1, 4, 2))
    seg = jnp.array([[1, 1, 2, 0]])  # the padding token (9, 9) must not count
    loss, per_seg = flow.segment_loss(pred, target, seg, num_segments=3, l1_weight=0.1)
    # seg 1: tokens (1,3),(0,0): mse = mean(5, 0) = 2.5, l1 = mean(2, 0) = 1 -> 2.6
    # seg 2: token (2,2): mse 4, l1 2 -> 4.2 ; seg 3 absent
    np.testing.assert_allclose(per_seg, [[2.6, 4.2, 0.0]], rtol=1e-6)
    assert float(loss) == pytest.approx((2.6 + 4.2) / 2)


def test_packed_loss_equals_per_example_mean_of_dense_rows():
    pred, target = latents(0, 3, 5, 8), latents(1, 3, 5, 8)
    loss, _ = flow.segment_loss(pred, target, jnp.ones((3, 5), jnp.int32), 1)
    err = np.asarray(pred - target)
    per_ex = (err**2).mean((1, 2)) + 0.1 * np.abs(err).mean((1, 2))
    assert float(loss) == pytest.approx(per_ex.mean(), rel=1e-6)


def test_logit_normal_t_and_shift():
    t = flow.sample_t(jax.random.key(0), (20000,))
    logit = np.log(t / (1 - t))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    ts = flow.sample_t(jax.random.key(0), (20000,), flow.TimeDist(shift=3.0))
    assert float(ts.mean()) < float(t.mean())  # shift > 1 moves mass towards noise
    np.testing.assert_allclose(flow.shift_time(jnp.array([0.0, 0.5, 1.0]), 3.0), [0, 0.25, 1])
    lt = flow.sample_t(jax.random.key(1), (20000,), flow.TimeDist(loc=-0.5, scale=2.0))
    logit = np.log(lt / (1 - lt))
    assert abs(logit.mean() + 0.5) < 0.05 and abs(logit.std() - 2) < 0.05


def test_uniform_t_and_time_dist_config():
    t = np.asarray(flow.sample_t(jax.random.key(0), (20000,), flow.TimeDist("uniform")))
    assert t.min() >= 0 and t.max() < 1
    # a uniform histogram: every tenth of [0, 1] holds 10% +- 1%
    np.testing.assert_allclose(np.histogram(t, 10, (0, 1))[0] / t.size, 0.1, atol=0.01)
    cfg = ml_collections.ConfigDict(dict(time_shift=2.0, t_dist="uniform"))
    assert flow.TimeDist.from_config(cfg) == flow.TimeDist("uniform", 0.0, 1.0, 2.0)
    with pytest.raises(ValueError, match=r"config.flow.t_dist='beta'.*logit_normal"):
        flow.TimeDist.from_config(ml_collections.ConfigDict(dict(t_dist="beta")))
    with pytest.raises(ValueError, match=r"config.flow.t_scale=0.0"):
        flow.TimeDist.from_config(ml_collections.ConfigDict(dict(t_scale=0.0)))


def test_time_grids():
    g = flow.time_grid(20)
    assert len(g) == 20 and g[0] == 0 and g[-1] == 1 and g[9] == pytest.approx(0.05)
    assert np.all(np.diff(flow.time_grid(40)) > 0)
    np.testing.assert_allclose(flow.time_grid(5, "uniform"), [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(flow.time_grid(3, "shifted", 3.0), [0, 0.25, 1])
    with pytest.raises(ValueError, match="num_steps=17"):
        flow.time_grid(17)
    with pytest.raises(ValueError, match="grid="):
        flow.time_grid(5, "cosine")


def test_null_context_and_dropout():
    cond = latents(0, 2, 5, 2, 2, 3)
    null, n = flow.null_context(cond)
    np.testing.assert_array_equal(null[:, 0], 0)
    np.testing.assert_array_equal(null[:, 1], cond[:, 4])
    np.testing.assert_array_equal(n, [2, 2])
    # rows with fewer real frames use their own last real frame as the query
    null, _ = flow.null_context(cond, jnp.array([3, 5]))
    np.testing.assert_array_equal(null[0, 1], cond[0, 2])
    kept, n = flow.drop_context(jax.random.key(0), cond, 0.0)
    np.testing.assert_array_equal(kept, cond)
    np.testing.assert_array_equal(n, [5, 5])
    dropped, n = flow.drop_context(jax.random.key(0), cond, 1.0)
    np.testing.assert_array_equal(dropped[:, 1], cond[:, 4])
    np.testing.assert_array_equal(n, [2, 2])


class LinearField(nnx.Module):
    """Analytic velocity v = lam * x + k_row, k_row = mean of the row's real cond tokens."""

    def __init__(self, lam: float, patch_size: int = 1):
        self.lam = lam
        self.cfg = type("Cfg", (), {"patch_size": patch_size})()

    def forward_packed(self, b: packing.Packed) -> jax.Array:
        real = (b.cond_seg > 0)[..., None]
        k = (b.cond * real).sum((1, 2)) / (real.sum((1, 2)) * b.cond.shape[-1])
        return self.lam * b.x + k[:, None, None]


def _exact(x0, lam, k):
    return x0 * np.exp(lam) + k * (np.exp(lam) - 1) / lam


def test_euler_on_official_grid_is_the_discrete_product():
    x0, cond = latents(0, 2, 1, 2, 2, 1), jnp.zeros((2, 3, 2, 2, 1))
    out = flow.sample_ode(LinearField(-0.7), x0, cond, num_steps=20)
    factor = np.prod(1 - 0.7 * np.diff(flow.time_grid(20).astype(np.float64)))
    np.testing.assert_allclose(out, np.asarray(x0) * factor, rtol=1e-5)


def test_heun_converges_to_exact_solution_with_cfg():
    x0 = latents(0, 2, 1, 2, 2, 1)
    cond = jnp.stack([jnp.full((3, 2, 2, 1), 2.0), jnp.full((3, 2, 2, 1), -1.0)])
    cond = cond.at[:, 0].set(4.0)  # context frame differs from the query frames
    lam, s = 0.8, 1.5
    k_c = np.asarray(cond).mean((1, 2, 3, 4))  # all 3 frames
    k_u = (0.0 + np.asarray(cond[:, -1]).mean((1, 2, 3))) / 2  # zero frame + query
    k = (k_u + s * (k_c - k_u))[:, None, None, None, None]
    want = _exact(np.asarray(x0, np.float64), lam, k)
    heun = flow.sample_ode(LinearField(lam), x0, cond, cfg_scale=s, num_steps=101,
                           grid="uniform", method="heun")
    euler = flow.sample_ode(LinearField(lam), x0, cond, cfg_scale=s, num_steps=101,
                            grid="uniform")
    err_h, err_e = np.abs(heun - want).max(), np.abs(euler - want).max()
    assert err_h < 5e-4 and err_e > 10 * err_h, (err_h, err_e)


def test_sampler_runs_on_jdit_batch_of_queries():
    model = tiny_jdit()
    x0, cond = latents(0, 3, 1, 4, 4, 4), latents(1, 3, 5, 4, 4, 4)
    out = flow.sample_ode(model, x0, cond, cfg_scale=1.5, num_steps=20)
    assert out.shape == x0.shape and np.isfinite(np.asarray(out)).all()
    # each query is independent of the others in the batch
    single = flow.sample_ode(model, x0[1:2], cond[1:2], cfg_scale=1.5, num_steps=20)
    np.testing.assert_allclose(out[1:2], single, atol=1e-4)


def test_training_loss_learns_a_fixed_batch():
    model = tiny_jdit(seed=1)
    x, cond = latents(0, 2, 1, 4, 4, 4), latents(1, 2, 3, 4, 4, 4)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, rng):
        def loss_fn(m):
            return flow.training_loss(m, x, cond, rng, context_dropout=0.1)[0]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = jax.random.key(0)
    losses = [float(step(model, opt, jax.random.fold_in(rng, i % 4))) for i in range(60)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
