"""ST-VAE: shapes, causality, posterior, latent normalisation, tiling, remat, sharding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.stvae import get_config
from lavin_jax import sharding
from lavin_jax.models import stvae_blocks, stvae_tiling
from lavin_jax.models.stvae import STVAE, DiagonalGaussian, STVAEConfig, measure_latent_stats

# 3 levels (4x spatial), 4x temporal, 8/16 channels: compiles in seconds on a CPU.
TINY = STVAEConfig(
    block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=2,
    spatial_norm_groups=2, temporal_compression_ratio=4, tile_sample_size=16,
    tile_sample_frames=5, latent_shift=0.25, latent_scale=2.0,
)


# 2 levels, 2x temporal: the cheapest model that still has every block type.
SMALL = dataclasses.replace(TINY, block_out_channels=(8, 16), temporal_compression_ratio=2,
                            tile_sample_frames=3)


def build(cfg: STVAEConfig = TINY, seed: int = 0) -> STVAE:
    with nnx.use_eager_sharding(False):
        return STVAE(cfg, rngs=nnx.Rngs(seed))


@functools.lru_cache
def cached(cfg: STVAEConfig) -> STVAE:
    """A shared model per config (tests that mutate a model build their own)."""
    return build(cfg)


@pytest.fixture(scope="module")
def tiny():
    return cached(TINY)


_encode = nnx.jit(lambda m, x: m.encode(x))
_decode = nnx.jit(lambda m, z: m.decode(z))


def _uniform(seed, shape):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def _shapes(model, fn, shape):
    graphdef, state = nnx.split(model)
    f = lambda s, x: getattr(nnx.merge(graphdef, s), fn)(x)
    return jax.eval_shape(f, state, jax.ShapeDtypeStruct(shape, jnp.float32))


# -- config ----------------------------------------------------------------------------------

def test_configs_build_and_validate():
    for variant, (lat, s) in {"demo": (16, 4), "release": (16, 8)}.items():
        cfg = STVAEConfig.from_config(get_config(variant).model)
        assert (cfg.latent_channels, cfg.spatial_compression) == (lat, s)
        assert cfg.temporal_compression_ratio == 4
    rel = STVAEConfig.from_config(get_config("release").model)
    assert rel.block_out_channels == (128, 256, 256, 512) and rel.layers_per_block == 3
    assert (rel.latent_shift, rel.latent_scale) == (0.032470703125, 1.08936170213)
    assert rel.latent_shape(17, 256, 256) == (5, 32, 32, 16)
    assert STVAEConfig.from_config(get_config("demo").model).latent_shape(1, 64, 64) == (
        1, 16, 16, 16)
    with pytest.raises(ValueError, match="unknown variant"):
        get_config("huge")


@pytest.mark.parametrize("change, message", [
    (dict(norm_num_groups=3), "not divisible by model.norm_num_groups=3"),
    (dict(temporal_compression_ratio=3), "must be a power of 2"),
    (dict(temporal_compression_ratio=8), "needs 3 downsampling levels"),
    (dict(tile_sample_size=18), "whole multiples of the spatial compression 4"),
    (dict(tile_sample_frames=6), r"must be 1 \+ a multiple"),
    (dict(dtype="float8"), "model.dtype"),
])
def test_validate_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message) as e:
        dataclasses.replace(TINY, **change).validate()
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown keys"):
        STVAEConfig.from_config({**dataclasses.asdict(TINY), "widths": 3})


# -- shapes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("t, h, w", [(1, 32, 32), (5, 32, 32), (9, 16, 24), (1, 20, 28),
                                     (5, 18, 22), (9, 33, 17)])
def test_shapes(tiny, t, h, w):
    mean, logvar = _shapes(tiny, "encode", (2, t, h, w, 3))
    want = (2,) + TINY.latent_shape(t, h, w)
    assert mean.shape == logvar.shape == want
    assert want[1] == 1 + (t - 1) // 4 and want[2:4] == (h // 4, w // 4)
    out = _shapes(tiny, "decode", want)
    assert out.shape == (2, 1 + 4 * (want[1] - 1), want[2] * 4, want[3] * 4, 3)
    assert out.dtype == jnp.float32


def test_encode_decode_run(tiny):
    x = _uniform(0, (2, 5, 16, 16, 3))
    mean, logvar = _encode(tiny, x)
    assert mean.shape == (2, 2, 4, 4, 4) and bool(jnp.all(jnp.isfinite(mean)))
    assert float(logvar.max()) <= 20.0 and float(logvar.min()) >= -30.0
    y = _decode(tiny, mean)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    k = tiny.last_decoder_layer_kernel()
    assert isinstance(k, nnx.Param) and k.shape == (3, 3, 3, 8, 3)
    assert k is tiny.decoder.conv_out.kernel


# -- causality ----------------------------------------------------------------------------------

def _per_frame_group_norm(x, groups, eps):
    b, t, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, t, h, w, groups, c // groups)
    mean = jnp.mean(xf, axis=(2, 3, 5), keepdims=True)
    var = jnp.var(xf, axis=(2, 3, 5), keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(b, t, h, w, c)


def test_causality(tiny, monkeypatch):
    """Latent frame j sees input frames <= 4j only; output frames <= 4j see latent frames <= j.

    Clip-wide GroupNorm statistics (the released design) are the one path by which later
    frames reach earlier ones; with per-frame statistics swapped in, every other path (causal
    conv padding, temporal pooling and upsampling, latent resizing in the spatial norms) must
    be exactly causal.
    """
    monkeypatch.setattr(stvae_blocks, "group_norm", _per_frame_group_norm)
    enc = jax.jit(lambda x: tiny.encode(x)[0])
    dec = jax.jit(lambda z: tiny.decode(z))
    x = _uniform(0, (1, 9, 16, 16, 3))
    base = enc(x)
    for first_changed, unchanged in ((1, 1), (5, 2), (8, 2)):
        x2 = x.at[:, first_changed:].add(_uniform(1, x[:, first_changed:].shape))
        z2 = enc(x2)
        np.testing.assert_array_equal(np.asarray(z2[:, :unchanged]),
                                      np.asarray(base[:, :unchanged]))
        assert float(jnp.abs(z2[:, unchanged:] - base[:, unchanged:]).max()) > 1e-4
    y = dec(base)
    for j in (1, 2):
        z2 = base.at[:, j:].add(1.0)
        y2 = dec(z2)
        keep = 1 + 4 * (j - 1)
        np.testing.assert_array_equal(np.asarray(y2[:, :keep]), np.asarray(y[:, :keep]))
        assert float(jnp.abs(y2[:, keep:] - y[:, keep:]).max()) > 1e-4


def test_temporal_ops():
    x = jnp.arange(9.0).reshape(1, 9, 1, 1, 1)
    np.testing.assert_array_equal(stvae_blocks.pool_time(x).ravel(), [0, 1.5, 3.5, 5.5, 7.5])
    np.testing.assert_array_equal(stvae_blocks.pool_time(x[:, :4]).ravel(), [0.5, 2.5])
    u = stvae_blocks.upsample_nearest(jnp.arange(3.0).reshape(1, 3, 1, 1, 1), time=True)
    assert u.shape == (1, 5, 2, 2, 1)
    np.testing.assert_array_equal(u[:, :, 0, 0, 0].ravel(), [0, 1, 1, 2, 2])
    z = jnp.arange(2.0).reshape(1, 2, 1, 1, 1)  # first latent frame -> first frame only
    m = stvae_blocks.match_latent(z, jnp.zeros((1, 5, 2, 2, 1)))
    np.testing.assert_array_equal(m[:, :, 1, 1, 0].ravel(), [0, 1, 1, 1, 1])


# -- posterior and latent normalisation ----------------------------------------------------------

def test_diagonal_gaussian():
    rng = np.random.default_rng(0)
    mean = jnp.asarray(rng.normal(size=(2, 1, 3, 3, 4)), jnp.float32)
    logvar = jnp.asarray(rng.normal(size=(2, 1, 3, 3, 4)) * 0.5, jnp.float32)
    q = DiagonalGaussian(mean, logvar)
    kl = q.kl()
    want = 0.5 * np.sum(np.square(mean) + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3, 4))
    np.testing.assert_allclose(kl, want, rtol=1e-5)
    assert kl.shape == (2,)
    np.testing.assert_allclose(DiagonalGaussian(jnp.zeros(3)[None], jnp.zeros(3)[None]).kl(), 0)
    # Monte-Carlo KL = E_q[log q - log p] agrees with the closed form.
    @jax.jit
    def monte_carlo(q):
        zs = jax.vmap(q.sample)(jax.random.split(jax.random.key(0), 4000))
        log_p = 0.5 * jnp.sum(jnp.square(zs) + np.log(2 * np.pi), axis=(2, 3, 4, 5))
        return zs, jnp.mean(-jax.vmap(q.nll)(zs) + log_p, axis=0)

    zs, mc = monte_carlo(q)
    np.testing.assert_allclose(mc, kl, rtol=0.1)
    np.testing.assert_allclose(jnp.mean(zs, 0), mean, atol=0.1)
    np.testing.assert_allclose(jnp.std(zs, 0), q.std, rtol=0.1)
    assert q.mode() is mean
    # Reparameterised: d sample / d mean = 1.
    g = jax.grad(lambda m: DiagonalGaussian(m, logvar).sample(jax.random.key(1)).sum())(mean)
    np.testing.assert_allclose(g, 1.0)


def test_latent_normalisation(tiny):
    z = jnp.asarray(np.random.default_rng(0).normal(3.0, 0.5, size=(4, 2, 3, 3, 4)), jnp.float32)
    np.testing.assert_allclose(tiny.normalize(z), (z - 0.25) * 2.0, rtol=1e-6)
    np.testing.assert_allclose(tiny.denormalize(tiny.normalize(z)), z, rtol=1e-6)
    # Stored as non-trainable variables: in the state, not among the params.
    params = nnx.to_pure_dict(nnx.state(tiny, nnx.Param))
    assert "latent_shift" not in params
    assert float(nnx.state(tiny)["latent_scale"][...]) == 2.0

    model = build()
    shift, scale = measure_latent_stats(z)
    model.set_latent_stats(shift, scale)
    zn = np.asarray(model.normalize(z))
    assert abs(zn.mean()) < 1e-5 and abs(zn.std() - 1) < 1e-5
    assert (model.cfg.latent_shift, model.cfg.latent_scale) == (shift, scale)
    with pytest.raises(ValueError, match="zero variance"):
        measure_latent_stats(np.ones(8))
    release = STVAEConfig.from_config(get_config("release").model)
    assert (release.latent_shift, release.latent_scale) == (0.032470703125, 1.08936170213)


# -- tiling -----------------------------------------------------------------------------------

def _pool4(x):
    """A local stand-in encoder: 4x4 mean in space, first frame alone + groups of 4 in time."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // 4, 4, w // 4, 4, c).mean((3, 5))
    if t == 1:
        return x
    rest = x[:, 1:].reshape(b, (t - 1) // 4, 4, h // 4, w // 4, c).mean(2)
    return jnp.concatenate([x[:, :1], rest], 1)


def _up4(z):
    z = jnp.repeat(jnp.repeat(z, 4, 2), 4, 3)
    return z if z.shape[1] == 1 else jnp.concatenate([z[:, :1], jnp.repeat(z[:, 1:], 4, 1)], 1)


def test_tiling_seams_exact_for_local_ops():
    """Tile placement, blending and temporal chunking are exact for position-local maps."""
    kw = dict(overlap=0.25, spatial=4)
    x = _uniform(0, (1, 9, 40, 28, 3))
    got = jax.jit(lambda x: stvae_tiling.tiled_encode(_pool4, x, tile=16, frames=5, **kw))(x)
    np.testing.assert_allclose(got, _pool4(x), atol=1e-6)
    z = _uniform(1, (1, 3, 10, 7, 3))
    got = jax.jit(lambda z: stvae_tiling.tiled_decode(_up4, z, tile=4, frames=2, **kw))(z)
    np.testing.assert_allclose(got, _up4(z), atol=1e-6)
    with pytest.raises(ValueError, match="multiples of the spatial compression"):
        stvae_tiling.tiled_encode(_pool4, x[:, :, :18], tile=16, frames=5, overlap=0.25,
                                  spatial=4)


def test_tiled_equals_untiled_when_one_tile(tiny):
    x = _uniform(0, (1, 5, 16, 16, 3))
    mean, logvar = tiny.tiled_encode(x, encode_fn=lambda a: _encode(tiny, a))
    ref = _encode(tiny, x)
    np.testing.assert_array_equal(mean, ref[0])
    np.testing.assert_array_equal(logvar, ref[1])
    z = ref[0]
    np.testing.assert_array_equal(tiny.tiled_decode(z, decode_fn=lambda a: _decode(tiny, a)),
                                  _decode(tiny, z))


@pytest.mark.slow
def test_tiled_close_to_untiled():
    """Stated tolerance: spatial tiles see their own pixels and GroupNorm statistics only, so
    tiled output approximates untiled. For this random-init model (2 levels, 64 px tiles with
    50% overlap, i.i.d. inputs) the relative RMS error is measured at ~0.04 (encode) and ~0.03
    (decode); we assert < 0.1 RMS and < 0.25 max (relative to the untiled output's RMS / max).
    Trained models are smoother; random weights are the hard case."""
    model = build(dataclasses.replace(SMALL, tile_sample_size=64, tile_overlap=0.5))
    x = _uniform(0, (1, 1, 128, 32, 3))  # tiled along H only (W fits in a tile)
    enc = lambda a: _encode(model, a)
    mean = enc(x)[0]
    tiled = model.tiled_encode(x, encode_fn=enc)[0]
    z = jax.random.normal(jax.random.key(1), mean.shape)
    dec = lambda a: _decode(model, a)
    y, ty = dec(z), model.tiled_decode(z, decode_fn=dec)
    for got, ref in ((tiled, mean), (ty, y)):
        assert got.shape == ref.shape
        err = got - ref
        assert float(jnp.sqrt(jnp.mean(err**2) / jnp.mean(ref**2))) < 0.1
        assert float(jnp.abs(err).max() / jnp.abs(ref).max()) < 0.25


# -- precision, remat, sharding -------------------------------------------------------------------

@pytest.mark.slow
def test_remat_gradients_match():
    x = _uniform(0, (1, 3, 16, 16, 3))
    loss = lambda m: jnp.mean(m(x)[0] ** 2)
    ref = nnx.jit(nnx.grad(loss))(cached(SMALL))
    got = nnx.jit(nnx.grad(loss))(cached(dataclasses.replace(SMALL, remat=True)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ref, got)


def test_bf16_compute():
    x = _uniform(0, (1, 1, 16, 16, 3))
    y_bf = _encode(cached(dataclasses.replace(SMALL, dtype="bfloat16")), x)[0]
    y = _encode(cached(SMALL), x)[0]
    assert y_bf.dtype == jnp.float32
    assert float(jnp.abs(y_bf - y).max() / jnp.abs(y).max()) < 0.05


def test_sharded_equals_unsharded():
    assert len(jax.devices()) == 8
    cfg = sharding.default_config()  # fsdp over all 8 devices
    mesh, rules = sharding.make_mesh(cfg), cfg.sharding.rules
    model = cached(SMALL)
    sharded = sharding.shard_module(build(SMALL), mesh, rules)
    k = sharded.encoder.down_blocks[1].resnets[0].conv1.kernel
    assert "fsdp" in str(k.get_value().sharding.spec)  # conv_out axis split 8 ways
    x = _uniform(0, (8, 3, 16, 16, 3))

    @nnx.jit
    def run(m, x):
        with sharding.use_rules(mesh, rules):
            mean, _ = m.encode(x)
            return mean, m.decode(mean)

    x_sharded = jax.device_put(x, sharding.batch_sharding(mesh, rules, x.ndim))
    mean_s, y_s = run(sharded, x_sharded)
    mean, y = run(model, x)
    np.testing.assert_allclose(mean_s, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_s, y, rtol=1e-5, atol=1e-5)
    built = sharding.create_sharded(lambda: STVAE(SMALL, rngs=nnx.Rngs(0)), mesh, rules)
    assert "fsdp" in str(built.decoder.conv_in.kernel.get_value().sharding.spec)
