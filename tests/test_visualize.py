"""Sample grids (objective.visualize): the packed sampler equals the dense one, grids from
sharded params (8 fake devices), VAE-decoded and false-colour tiles, and the trainer's PNGs."""

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import TINY
from PIL import Image

from configs import lavin_dit, stvae
from lavin_jax import checkpoint, flow, packing, sharding, train, train_state
from lavin_jax.data import packer
from lavin_jax.data.batches import make_iterator
from lavin_jax.models.jdit import JDiT, JDiTConfig
from lavin_jax.models.stvae import STVAE, STVAEConfig
from lavin_jax.objectives import flow as flow_obj
from lavin_jax.objectives import get_objective, preview


def tiny_config() -> ml_collections.ConfigDict:
    cfg = lavin_dit.get_config("demo")
    cfg.model.update(hidden_size=48, depth=2, num_heads=4, kv_group=2, in_channels=4)
    cfg.data = ml_collections.ConfigDict(dict(
        kind="synthetic", global_batch=8, latent_size=8, cond_frames=3, episodes_per_row=2))
    cfg.sample.num_steps = 4
    cfg.sample.grid = "uniform"
    cfg.optim.warmup_steps = 0
    return cfg


def test_split_items():
    assert flow_obj.split_items(5, (1, 1)) == ([0, 1, 2, 3], 4, False)  # 2 pairs + query
    assert flow_obj.split_items(2, (1, 1)) == ([0], 1, True)  # null context
    assert flow_obj.split_items(8, (2, 1)) == ([0, 2, 3, 5], 6, False)  # video inputs
    assert flow_obj.split_items(4, None) == ([0, 1, 2], 3, False)  # does not fit: per frame


def _state(cfg):
    mesh = sharding.make_mesh(cfg)  # fsdp over the 8 fake devices: parameters are sharded
    obj = get_objective(cfg.objective.name, cfg)
    tr, state = train_state.create(obj, seed=0, mesh=mesh, rules=cfg.sharding.rules)
    return obj, tr, state, mesh


@pytest.fixture(scope="module")
def flow_run():
    cfg = tiny_config()
    obj, tr, state, mesh = _state(cfg)
    return cfg, obj, tr.modules(state), mesh, next(make_iterator(cfg))


def test_flow_grid_from_sharded_params_false_colour(flow_run):
    cfg, obj, modules, mesh, batch = flow_run
    assert len(mesh.devices.ravel()) == 8
    with sharding.use_rules(mesh, cfg.sharding.rules):
        img = obj._visualize(modules["model"], batch, 3)
    # 4 episodes (2 rows of 2), 2 context tiles + query | prediction | truth; 8x8 latents
    # shown 32x32 (4x)
    assert obj._vis_rows == 2
    assert img.dtype == np.uint8 and img.shape == (4 * 36 + 4, 5 * 36 + 4, 3)
    tile = lambda r, c: img[4 + 36 * r:36 * (r + 1), 4 + 36 * c:36 * (c + 1)]
    # the truth column is the batch's target in false colour
    z = packing.unpatchify(batch["x"][:1, :16], 1, 8, 8, 2)[0, 0]
    np.testing.assert_array_equal(tile(0, 4), preview.false_colour(z, 4))
    assert not np.array_equal(tile(0, 3), tile(0, 4))  # an untrained model predicts otherwise


def random_jdit(rng: np.random.Generator, **overrides) -> JDiT:
    """A tiny J-DiT with every parameter N(0, 0.3^2) (no zero-initialised paths), built from
    numpy: no initialiser is compiled."""
    cfg = JDiTConfig(**{**TINY, **overrides})
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: JDiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    return nnx.merge(graphdef, jax.tree.map(
        lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), params))


def test_packed_sampler_equals_dense_sampler_per_episode():
    """Rows [3 + 5 cond frames] and [3 cond frames, then padding], Euler + CFG: each episode
    equals sample_ode on it alone."""
    rng = np.random.default_rng(0)
    model, p = random_jdit(rng, depth=1), 2
    z = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    conds, targets = [z(3, 4, 4, 4), z(5, 4, 4, 4), z(3, 4, 4, 4)], [z(1, 4, 4, 4)] * 3
    items = [packer.episode_item(c, t, p) for c, t in zip(conds, targets)]
    spec = packer.RowSpec(cond_len=40, target_len=12, max_segments=3, token_dim=16)
    rows = [packer.assemble_row(items[:2], spec), packer.assemble_row(items[2:], spec)]
    rows = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    eps = flow_obj.row_episodes(rows, p, lambda _: None)
    assert [(e.row, e.seg, e.query_start) for e in eps] == [(0, 1, 2), (0, 2, 4), (1, 1, 2)]
    assert not any(e.dropped for e in eps)
    np.testing.assert_array_equal(eps[1].cond, conds[1])
    packed = {k: rows[k] for k in packing.Packed._fields}
    noise = z(2, 12, 16)
    out = flow_obj.sample_packed(model, packed, noise, flow_obj.null_row(packed, eps),
                                 cfg_scale=1.5, num_steps=3, grid="uniform")
    for e, c in zip(eps, conds):
        z0 = packing.unpatchify(noise[e.row:e.row + 1, e.x_idx], 1, 4, 4, p)
        want = flow.sample_ode(model, z0, c[None], cfg_scale=1.5, num_steps=3, grid="uniform")
        got = packing.unpatchify(out[e.row:e.row + 1, e.x_idx], 1, 4, 4, p)
        np.testing.assert_allclose(got, want, atol=2e-4)


def _tiny_vae_checkpoint(path, channels=4):
    vcfg = STVAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1,
                       latent_channels=channels, norm_num_groups=4, spatial_norm_groups=4,
                       tile_sample_size=32)
    with nnx.use_eager_sharding(False):
        vae = STVAE(vcfg, rngs=nnx.Rngs(0))
    checkpoint.save_params(path, {"stvae": nnx.to_pure_dict(nnx.state(vae, nnx.Param))},
                           {"configs": {"stvae": dataclasses.asdict(vcfg)}})
    return vae


def test_flow_grid_decodes_with_the_configured_vae(flow_run, tmp_path):
    cfg, _, modules, mesh, batch = flow_run
    vae = _tiny_vae_checkpoint(tmp_path / "vae")
    cfg = cfg.copy_and_resolve_references()
    cfg.data.vae_checkpoint = str(tmp_path / "vae")
    obj = get_objective("flow", cfg)
    with sharding.use_rules(mesh, cfg.sharding.rules):
        img = obj.visualize(modules, batch, 2)
    assert img.shape == (4 * 36 + 4, 5 * 36 + 4, 3)  # 8x8 latents decode to 32 px (4x VAE)
    z = packing.unpatchify(batch["x"][:1, :16], 1, 8, 8, 2)
    want = preview.to_uint8(nnx.jit(lambda m, z: m.decode(m.denormalize(z)))(vae, z)[0, 0])
    np.testing.assert_allclose(img[4:36, 4 + 4 * 36:5 * 36].astype(int), want.astype(int),
                               atol=2)


def test_grid_failure_is_logged_not_raised(caplog):
    cfg = tiny_config()
    obj = get_objective("flow", cfg)
    out = obj.visualize({"model": None}, {"x": np.zeros((1, 2, 3))}, 5)
    assert out.shape == (1, 1, 3) and "sample grid failed" in caplog.text


def test_vae_grid_input_and_reconstruction():
    cfg = stvae.get_config("demo")
    vcfg = STVAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                       norm_num_groups=4, spatial_norm_groups=4, temporal_compression_ratio=2,
                       tile_sample_size=16, tile_sample_frames=3)
    mesh = sharding.make_mesh(cfg)
    vae = sharding.create_sharded(lambda: STVAE(vcfg, rngs=nnx.Rngs(0)), mesh,
                                  cfg.sharding.rules)
    obj = get_objective("vae", cfg)
    x = np.random.default_rng(0).uniform(-1, 1, (8, 1, 16, 16, 3)).astype(np.float32)
    with sharding.use_rules(mesh, cfg.sharding.rules):
        img = obj._visualize(vae, {"video": x})
    assert img.shape == (4 * 20 + 4, 2 * 20 + 4, 3)  # 4 clips: input | reconstruction
    np.testing.assert_array_equal(img[4:20, 4:20], preview.to_uint8(x[0, 0]))
    rec = nnx.jit(lambda m, x: m.decode(m.posterior(x).mode()))(vae, x[:1])
    np.testing.assert_allclose(img[4:20, 24:40].astype(int),
                               preview.to_uint8(rec[0, 0]).astype(int), atol=1)


@pytest.mark.slow
def test_trainer_writes_sample_pngs(tmp_path):
    cfg = tiny_config()
    cfg.total_steps = cfg.checkpoint_every_steps = cfg.log_every_steps = 3
    cfg.sample_every_steps = 3
    cfg.ema_decay = 0.01  # the EMA has warmed up at step 3 (3 * 0.99 >= 3): the grid uses it
    train.train(cfg, str(tmp_path))
    pngs = sorted(os.listdir(tmp_path / "samples"))
    assert pngs == ["step_00000003.png"]
    img = np.asarray(Image.open(tmp_path / "samples" / pngs[-1]))
    assert img.shape == (4 * 36 + 4, 5 * 36 + 4, 3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["render", "online"])
def test_flow_grid_from_pipeline_rows(tmp_path, mode):
    """Real pipeline rows (task ids, video items, context dropout; online: pixel rows encoded
    here) with a tiny ST-VAE checkpoint: one row per episode, none dropped while others exist."""
    from test_pipeline import CLIP, IMG, small_config

    from lavin_jax import encode
    from lavin_jax.data import pipeline, render

    vae = _tiny_vae_checkpoint(tmp_path / "vae", channels=8)
    tasks = {"depth": 1.0, "colorization": 1.0} if mode == "online" else None
    cfg = small_config(mode, **({"tasks": tasks} if tasks else {}))
    cfg.data.vae_checkpoint, cfg.data.global_batch = str(tmp_path / "vae"), 8
    cfg.model.update(hidden_size=48, depth=1, num_heads=4, kv_group=2)
    cfg.sample.update(num_steps=3, grid="uniform")
    sources = {IMG: [render.render_example(s, 32) for s in range(6)],
               CLIP: [render.render_clip(s, 32, 5) for s in range(2)]}
    enc = encode.VaeEncoder(vae) if mode == "render" else vae.cfg
    batch = next(pipeline.make_train_iterator(cfg, encoder=enc, sources=sources,
                                              process_index=0, process_count=1))
    obj, tr, state, mesh = _state(cfg)
    with sharding.use_rules(mesh, cfg.sharding.rules):
        img = obj._visualize(tr.modules(state)["model"], batch, 1)
    assert img.shape[0] == 4 * 36 + 4 and img.shape[2] == 3  # 4 episodes of 8 rows


@pytest.mark.slow
def test_two_process_training_writes_grids(tmp_path):
    """2 processes x 4 devices through the train binary, a grid every step: the collectives
    (process 0's rows broadcast, replicated sampling) line up and process 0 writes the PNGs."""
    import sys

    from test_multiprocess import REPO, _free_port, _launch

    port, run = _free_port(), tmp_path / "run"
    argvs = [[sys.executable, "-m", "lavin_jax.train",
              f"--config={REPO}/tests/tiny_run_config.py:2", "--config.sample_every_steps=1",
              "--config.sample.num_steps=3", "--config.sample.grid=uniform", f"--workdir={run}",
              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={i}"] for i in range(2)]
    logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
    _launch(argvs, logs, devices=4)
    assert sorted(os.listdir(run / "samples")) == ["step_00000001.png", "step_00000002.png"]
    assert np.asarray(Image.open(run / "samples" / "step_00000002.png")).shape == (148, 184, 3)
    for log in logs:
        with open(log) as f:
            assert "grid failed" not in f.read()
