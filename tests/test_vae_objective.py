"""The ST-VAE objective: its terms on hand-computed values, the adaptive weight on a case with
closed-form gradients, where the gradients of each group's loss flow, the start-step gate, the
two-group optax cycle, the discriminator and the file-loaded perceptual network."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lavin_jax.models.stvae import DiagonalGaussian
from lavin_jax.objectives import get_objective
from lavin_jax.objectives.perceptual import SCALE, SHIFT, FeatureNet
from lavin_jax.objectives.vae import (
    VAEObjective,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
    split_modules,
    train_step_reference,
)

TINY_DISC = dict(channels=4, n_layers=1, temporal_kernel=3)


def key(seed: int) -> jax.Array:
    # rbg keys: XLA:CPU compiles threefry init/sampling an order of magnitude slower.
    return jax.random.key(seed, impl="rbg")


class TinyVAE(nnx.Module):
    """Stand-in: mean = x @ E, logvar = lv (a learned vector), x_rec = z @ W (W = last layer)."""

    def __init__(self, rngs: nnx.Rngs, c_lat: int = 2):
        self.enc = nnx.Param(jax.random.normal(rngs.params(), (3, c_lat)))
        self.lv = nnx.Param(jnp.linspace(-1.0, 0.5, c_lat))
        self.dec = nnx.Param(jax.random.normal(rngs.params(), (c_lat, 3)))

    def posterior(self, x):
        mean = x @ self.enc[...]
        return DiagonalGaussian(mean, jnp.broadcast_to(self.lv[...], mean.shape))

    def decode(self, z):
        return z @ self.dec[...]

    def last_decoder_layer_kernel(self):
        return self.dec


class RematVAE(TinyVAE):
    """TinyVAE whose decoder runs under nnx.remat (as the release STVAE's resnets do)."""

    def decode(self, z):
        return nnx.remat(lambda m, z: z @ m.dec[...])(self, z)


class LinearDisc(nnx.Module):
    """Stand-in discriminator with known gradients: one logit per pixel, x @ a."""

    def __init__(self, a):
        self.a = nnx.Param(jnp.asarray(a, jnp.float32))

    def __call__(self, x):
        return {"frame": x @ self.a[...][:, None]}


def objective(**over) -> VAEObjective:
    cfg = ml_collections.ConfigDict()
    cfg.objective = dict(dict(sample_posterior=False, disc_start=3, disc=TINY_DISC), **over)
    return VAEObjective(cfg, model_ctor=lambda rngs: TinyVAE(rngs))


def video(seed: int, shape=(2, 3, 8, 8, 3)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))


@functools.cache
def _built(seed: int):
    # One jitted init for all tests (eager init compiles every little op; the modules depend
    # only on TINY_DISC, not on the loss weights). Nothing mutates them: the steps are pure.
    with nnx.use_eager_sharding(False):
        return nnx.jit(lambda: objective().build(nnx.Rngs(key(seed))))()


def tiny_modules(obj, seed=0, linear_disc=None):
    mods = dict(_built(seed))
    if linear_disc is not None:
        mods["disc"] = LinearDisc(linear_disc)
    return mods


def run_loss(obj, group, mods, x, step, aux=None, rng=0):
    """obj.loss under one jit (eager op-by-op dispatch is what makes tiny tests slow)."""
    f = nnx.jit(lambda m, x, s, a: obj.loss(group, m, {"video": x}, key(rng), s, a))
    return f(mods, x, jnp.int32(step), aux or {})


# --------------------------------------------------------------------------------------------
# Terms on hand-computed values.

def test_reconstruction_hand_values():
    x = jnp.array([0.0, 1.0, -1.0, 0.5])
    r = jnp.array([0.5, 1.0, 1.0, -0.5])  # errors .5, 0, 2, 1
    total, logs = reconstruction_loss(x, r, l1_weight=1.0, l2_weight=0.5)
    np.testing.assert_allclose(logs["rec_l1"], 3.5 / 4, rtol=1e-6)
    np.testing.assert_allclose(logs["rec_l2"], (0.25 + 4 + 1) / 4, rtol=1e-6)
    np.testing.assert_allclose(total, 3.5 / 4 + 0.5 * 5.25 / 4, rtol=1e-6)


def test_hinge_hand_values():
    real = {"frame": jnp.array([2.0, 0.5, -1.0]), "clip": jnp.array([0.0])}
    fake = {"frame": jnp.array([-2.0, 0.0, 1.0]), "clip": jnp.array([-0.5])}
    # frame: mean(0, .5, 2) + mean(0, 1, 2) = 5/6 + 1; clip: 1 + 0.5
    np.testing.assert_allclose(hinge_d_loss(real, fake), 5 / 6 + 1 + 1.5, rtol=1e-6)
    np.testing.assert_allclose(hinge_g_loss(fake), -(-1 / 3) + 0.5, rtol=1e-6)


def test_generator_loss_and_adaptive_weight_closed_form():
    """Linear VAE + linear disc: every term and both last-layer gradients in closed form."""
    a = np.array([0.3, -0.2, 0.5], np.float32)
    obj = objective(kl_weight=0.01, disc_weight=0.7)
    mods = tiny_modules(obj, linear_disc=a)
    x = video(1)
    loss, (logs, aux) = run_loss(obj, "vae", mods, x, 3)

    xs = np.asarray(x).reshape(-1, 3).astype(np.float64)
    E, W = np.asarray(mods["vae"].enc[...]), np.asarray(mods["vae"].dec[...])
    lv = np.asarray(mods["vae"].lv[...])
    z = xs @ E
    r = z @ W
    P = xs.shape[0]
    nll = np.mean(np.abs(xs - r))
    kl = np.sum(0.5 * (z**2 + np.exp(lv) - 1 - lv)) / x.shape[0]
    g_adv = -np.mean(r @ a)
    d_nll = z.T @ np.sign(r - xs) / (3 * P)  # d mean|x - zW| / dW
    d_g = -np.outer(z.sum(0), a) / P  # d -mean(zWa) / dW
    w = 0.7 * np.linalg.norm(d_nll) / (np.linalg.norm(d_g) + 1e-4)
    np.testing.assert_allclose(logs["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(logs["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(logs["g_adv"], g_adv, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(logs["adaptive_weight"], w, rtol=1e-4)
    np.testing.assert_allclose(loss, nll + 0.01 * kl + w * g_adv, rtol=1e-5)
    np.testing.assert_allclose(aux["recon"], r.reshape(x.shape), rtol=1e-5, atol=1e-6)


def test_generator_gradient_is_the_plain_one_with_the_weight_held():
    """The nested last-layer VJPs change nothing in the gradient the trainer sees."""
    obj = objective(l2_weight=0.3)
    mods = tiny_modules(obj)
    gd, params, rest = split_modules(mods)
    x, step = video(2, (2, 3, 16, 16, 3)), jnp.int32(5)
    disc = nnx.merge(gd["disc"], params["disc"], rest["disc"])

    def ours(p):
        m = {"vae": nnx.merge(gd["vae"], p, rest["vae"]), "disc": disc}
        return obj.loss("vae", m, {"video": x}, key(0), step, {})

    (_, (logs, _)), g_ours = jax.jit(jax.value_and_grad(ours, has_aux=True))(params["vae"])
    w = logs["adaptive_weight"]
    assert 0 < w < 1e4

    def plain(p):
        vae = nnx.merge(gd["vae"], p, rest["vae"])
        q = vae.posterior(x)
        r = vae.decode(q.mode())
        rec = jnp.mean(jnp.abs(r - x)) + 0.3 * jnp.mean(jnp.square(r - x))
        return rec + 1e-6 * jnp.mean(q.kl()) + w * -jnp.mean(disc(r)["frame"]) - w * jnp.mean(
            disc(r)["clip"])

    g_plain = jax.jit(jax.grad(plain))(params["vae"])
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_adaptive_weight_with_a_rematerialised_decoder():
    """nnx.remat inside the decoder writes Variables back; the last-layer VJP must allow it."""
    obj = objective()
    mods = tiny_modules(obj)
    with nnx.use_eager_sharding(False):
        remat = RematVAE(nnx.Rngs(key(0)))
    nnx.update(remat, nnx.state(mods["vae"]))
    x = video(10, (1, 3, 16, 16, 3))
    loss, (logs, _) = run_loss(obj, "vae", mods, x, 5)
    loss_r, (logs_r, _) = run_loss(obj, "vae", {**mods, "vae": remat}, x, 5)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    np.testing.assert_allclose(logs_r["adaptive_weight"], logs["adaptive_weight"], rtol=1e-6)


def test_gan_terms_are_off_before_disc_start():
    obj = objective(disc_start=3)
    mods = tiny_modules(obj)
    x = video(3, (1, 3, 16, 16, 3))
    out = {}
    for s in (2, 3):
        loss, (logs, aux) = run_loss(obj, "vae", mods, x, s)
        dl, (dlogs, _) = run_loss(obj, "disc", mods, x, s, aux)
        out[s] = (loss, logs, dl, dlogs)
    loss, logs, dl, dlogs = out[2]
    assert float(logs["disc_factor"]) == 0.0 and float(dl) == 0.0
    # off = not computed (a cond): the disc does not even run before disc_start
    assert float(dlogs["d_loss"]) == 0.0 and float(logs["g_adv"]) == 0.0
    np.testing.assert_allclose(loss, logs["nll"] + logs["kl_weighted"], rtol=1e-6)
    loss, logs, dl, dlogs = out[3]
    assert float(dlogs["d_loss"]) > 0 and float(logs["adaptive_weight"]) > 0
    np.testing.assert_allclose(
        loss, logs["nll"] + logs["kl_weighted"] + logs["adaptive_weight"] * logs["g_adv"],
        rtol=1e-6)
    np.testing.assert_allclose(dl, dlogs["d_loss"], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Where gradients flow, and the two-group cycle.

def _nonzero(tree) -> list[bool]:
    return [bool(jnp.any(g != 0)) for g in jax.tree.leaves(tree)]


def test_disc_loss_gradients_reach_only_the_disc():
    obj = objective(disc_start=0)
    gd, params, rest = split_modules(tiny_modules(obj))
    x, step = video(4, (2, 3, 16, 16, 3)), jnp.int32(1)

    def disc_loss(pv, pd):
        m = {"vae": nnx.merge(gd["vae"], pv, rest["vae"]),
             "disc": nnx.merge(gd["disc"], pd, rest["disc"])}
        _, (_, aux) = obj.loss("vae", m, {"video": x}, key(0), step, {})
        return obj.loss("disc", m, {"video": x}, key(1), step, aux)[0]

    gv, gdisc = jax.jit(jax.grad(disc_loss, argnums=(0, 1)))(params["vae"], params["disc"])
    assert not any(_nonzero(gv))  # the reconstruction reaches the disc stop-gradiented
    assert all(_nonzero(gdisc["frame"])) and all(_nonzero(gdisc["clip"]))

    def gen_loss(pd):  # the generator loss does depend on the disc params ...
        m = {"vae": nnx.merge(gd["vae"], params["vae"], rest["vae"]),
             "disc": nnx.merge(gd["disc"], pd, rest["disc"])}
        return obj.loss("vae", m, {"video": x}, key(0), step, {})[0]

    # ... so the update-cycle test below, which leaves them untouched, means something
    assert any(_nonzero(jax.jit(jax.grad(gen_loss))(params["disc"])))


def test_update_cycle_changes_exactly_the_right_params():
    obj = objective(disc_start=3)
    gd, params, rest = split_modules(tiny_modules(obj))
    opt = {g: obj.optimizer(g).init(params[g]) for g in obj.groups}
    batch = {"video": video(5, (2, 3, 16, 16, 3))}
    full = jax.jit(functools.partial(train_step_reference, obj, gd))
    vae_only = jax.jit(functools.partial(train_step_reference, obj, gd, groups=("vae",)))
    cases = [(vae_only, 5, {"vae"}),  # the generator loss moves no disc param
             (full, 5, {"vae", "disc"}),
             (full, 1, {"vae"})]  # before disc_start the disc gets zero gradients: Adam idles
    for fn, step, changed in cases:
        new, new_opt, logs = fn(params, rest, opt, batch, key(7), jnp.int32(step))
        for g in obj.groups:
            moved = [bool(jnp.any(a != b)) for a, b in
                     zip(jax.tree.leaves(new[g]), jax.tree.leaves(params[g]))]
            assert all(moved) if g in changed else not any(moved), (step, g, moved)
        assert all(np.isfinite(v) for v in logs.values())
        if fn is full:
            assert float(logs["disc/disc_factor"]) == float(step >= 3)
    # the cycle continues from its own output (optimizer states have the right structure)
    again, _, logs = full(new, rest, new_opt, batch, key(8), jnp.int32(6))
    assert all(np.isfinite(v) for v in logs.values())


# --------------------------------------------------------------------------------------------
# Discriminator, registry, config.

def test_discriminator_heads_shapes_and_names():
    d = _built(0)["disc"]  # TINY_DISC: one stride-2 conv, two stride-1 convs
    out = jax.eval_shape(d, jnp.zeros((2, 5, 32, 32, 3)))
    assert out["frame"].shape == out["clip"].shape == (2, 5, 14, 14, 1)
    assert set(jax.eval_shape(d, jnp.zeros((2, 1, 32, 32, 3)))) == {"frame"}  # images: no clip
    params = jax.tree.leaves(nnx.state(d, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Param))
    assert len(params) == 2 * (3 * 2 + 2)  # per head: 3 convs (kernel, bias), 1 norm
    for v in params:
        names = v.get_metadata()["out_sharding"]
        assert len(names) == v.get_value().ndim and all(names)
    with pytest.raises(ValueError, match="n_layers"):
        jax.eval_shape(d, jnp.zeros((1, 1, 4, 4, 3)))
    # the frame head judges frames independently: changing frame 1 leaves frame 0's logits;
    # the clip head is causal in time: it changes frames >= 1 only
    x = video(6, (1, 3, 32, 32, 3))
    fx, fy = nnx.jit(lambda d, x, y: (d(x), d(y)))(d, x, x.at[:, 1].set(0.0))
    np.testing.assert_array_equal(fx["frame"][:, 0], fy["frame"][:, 0])
    np.testing.assert_array_equal(fx["frame"][:, 2], fy["frame"][:, 2])
    assert not np.allclose(fx["frame"][:, 1], fy["frame"][:, 1])
    np.testing.assert_array_equal(fx["clip"][:, 0], fy["clip"][:, 0])
    assert not np.allclose(fx["clip"][:, 2], fy["clip"][:, 2])


def test_registry_and_config_errors(tmp_path):
    from configs import stvae

    for variant in ("demo", "release"):  # the config files' objective block reads cleanly
        full = stvae.get_config(variant)
        obj = get_objective(full.objective.name, full)
        assert isinstance(obj, VAEObjective) and obj.perceptual is None  # off by default
        assert obj.ocfg.disc_start > 0 and obj.ocfg.optim_disc.b1 == 0.5
    cfg = ml_collections.ConfigDict(dict(objective=dict(disc=TINY_DISC)))
    assert isinstance(get_objective("vae", cfg), VAEObjective)
    # init_from: the VAE group loads the "stvae" item of converted / exported checkpoints
    assert get_objective("vae", cfg).checkpoint_name("vae") == "stvae"
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("gan", cfg)
    with pytest.raises(ValueError, match="unknown keys"):
        VAEObjective(ml_collections.ConfigDict(dict(objective=dict(kl_wieght=1.0))))
    with pytest.raises(ValueError, match="perceptual_path"):
        VAEObjective(ml_collections.ConfigDict(dict(objective=dict(perceptual_weight=1.0))))
    missing = str(tmp_path / "vgg.npz")
    with pytest.raises(FileNotFoundError, match="objective.perceptual_path"):
        VAEObjective(ml_collections.ConfigDict(dict(objective=dict(
            perceptual_weight=1.0, perceptual_path=missing))))


# --------------------------------------------------------------------------------------------
# Perceptual network.

def _tiny_vgg(rng: np.random.Generator, lins: bool = True) -> dict[str, np.ndarray]:
    """torchvision-style names: conv 0, 2 | pool | conv 5 (two stages) + LPIPS heads."""
    out = {}
    for i, (cin, cout) in {0: (3, 4), 2: (4, 4), 5: (4, 5)}.items():
        out[f"features.{i}.weight"] = rng.normal(size=(cout, cin, 3, 3)).astype(np.float32)
        out[f"features.{i}.bias"] = rng.normal(size=(cout,)).astype(np.float32) * 0.1
    if lins:
        out["lin0.model.1.weight"] = rng.uniform(size=(1, 4, 1, 1)).astype(np.float32)
        out["lin1.model.1.weight"] = rng.uniform(size=(1, 5, 1, 1)).astype(np.float32)
    return out


def test_perceptual_loader_and_hand_value(tmp_path):
    from safetensors.numpy import save_file

    arrays = _tiny_vgg(np.random.default_rng(0))
    np.savez(tmp_path / "vgg.npz", **arrays)
    save_file(arrays, str(tmp_path / "vgg.safetensors"))
    a = FeatureNet.from_file(str(tmp_path / "vgg.npz"))
    b = FeatureNet.from_file(str(tmp_path / "vgg.safetensors"))
    assert [len(s) for s in a.stages] == [2, 1] and len(a.lins) == 2
    x, y = video(7, (2, 8, 8, 3)), video(8, (2, 8, 8, 3))
    dist = jax.jit(lambda x, y: (a.distance(x, y), b.distance(x, y), a.distance(x, x)))
    dab, dba, dxx = dist(x, y)
    np.testing.assert_allclose(dab, dba, rtol=1e-6)
    np.testing.assert_allclose(dxx, 0.0, atol=1e-7)
    assert [f.shape for f in jax.eval_shape(a.features, x)] == [(2, 8, 8, 4), (2, 4, 4, 5)]
    assert np.all(np.asarray(dab) > 0)

    # one stage, one identity conv, no heads: the distance by hand
    eye = np.zeros((3, 3, 3, 3), np.float32)
    eye[:, :, 1, 1] = np.eye(3)
    net = FeatureNet.from_arrays({"features.0.weight": eye, "features.0.bias": np.zeros(3)})

    def unit(v):
        f = np.maximum((np.asarray(v) - SHIFT) / SCALE, 0)
        return f / (np.sqrt((f**2).sum(-1, keepdims=True)) + 1e-10)

    want = ((unit(x) - unit(y)) ** 2).sum(-1).mean((1, 2))
    np.testing.assert_allclose(jax.jit(net.distance)(x, y), want, rtol=1e-5)


def test_perceptual_term_in_the_objective(tmp_path):
    np.savez(tmp_path / "vgg.npz", **_tiny_vgg(np.random.default_rng(1)))
    obj = objective(perceptual_weight=0.5, perceptual_path=str(tmp_path / "vgg.npz"))
    mods = tiny_modules(obj)
    x = video(9, (1, 2, 8, 8, 3))
    _, (logs, _) = run_loss(obj, "vae", mods, x, 0)
    assert float(logs["perceptual"]) > 0
    np.testing.assert_allclose(logs["nll"], logs["rec_l1"] + 0.5 * logs["perceptual"], rtol=1e-6)
    # the gradient through the frozen net is finite (zero ReLU features at some positions)
    g = nnx.jit(nnx.grad(lambda m: obj.loss("vae", {**mods, "vae": m}, {"video": x},
                                            key(0), jnp.int32(0), {})[0]))(mods["vae"])
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(g))
