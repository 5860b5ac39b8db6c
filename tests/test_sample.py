"""Inference CLI: template folders (format and errors), a tiny checkpoint end to end, run dirs."""

import dataclasses
import json
import types

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import TINY
from PIL import Image

from lavin_jax import checkpoint, sample
from lavin_jax.data import template
from lavin_jax.models.jdit import JDiT, JDiTConfig
from lavin_jax.models.stvae import STVAE, STVAEConfig
from lavin_jax.train_checkpoint import RunCheckpointer

# 4x spatial ST-VAE, 4 latent channels (= TINY J-DiT in_channels); 32 px fits one tile.
VAE = STVAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
                  norm_num_groups=2, spatial_norm_groups=2, temporal_compression_ratio=4,
                  tile_sample_size=32, tile_sample_frames=5)
SIZE = 32


def _png(path, shape=(40, 48, 3), seed=0):
    img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(img).save(path)
    return path


def _folder(d, ids=("a", "b_1", "c")):
    d.mkdir()
    for i, name in enumerate(ids):
        _png(d / f"{name}_input.png", seed=2 * i)
        _png(d / f"{name}_target.png", seed=2 * i + 1)
    return d


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def models():
    with nnx.use_eager_sharding(False):
        jdit = JDiT(JDiTConfig(**TINY), rngs=nnx.Rngs(0))
        vae = STVAE(VAE, rngs=nnx.Rngs(1))
    # live (non-zero) adaLN / final layers so predictions depend on the context
    jp = jax.tree.map(lambda x: x + 0.1 * np.random.default_rng(0).standard_normal(x.shape)
                      .astype(x.dtype), _pure(jdit))
    return jp, _pure(vae)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("sample")
    jp, vp = models
    checkpoint.save_params(d / "ckpt", {"jdit": jp, "stvae": vp},
                           {"configs": {"jdit": JDiTConfig(**TINY), "stvae": VAE}})
    _folder(d / "tmpl")
    _png(d / "q1.png", (20, 30, 3), seed=10)
    _png(d / "q2.png", (64, 64, 3), seed=11)
    return d


# ---- template folders ------------------------------------------------------------------------
def test_read_template_pairs_ids_with_underscores(tmp_path):
    d = _folder(tmp_path / "t")
    (d / "notes.txt").write_text("ignored")
    pairs = template.read_template(d)
    assert [p.id for p in pairs] == ["a", "b_1", "c"]
    assert pairs[1].input.name == "b_1_input.png" and pairs[1].target.name == "b_1_target.png"
    img = template.load_image(pairs[0].input, (16, 24))
    assert img.shape == (16, 24, 3) and img.dtype == np.uint8


def test_load_image_without_resize_is_exact(tmp_path):
    p = _png(tmp_path / "x.png", (7, 9, 3), seed=3)
    np.testing.assert_array_equal(template.load_image(p), np.asarray(Image.open(p)))


@pytest.mark.parametrize("case,named", [
    ("missing_target", "c_input.png"),
    ("missing_input", "c_target.png"),
    ("mismatched_ids", "x_input.png"),
    ("unreadable", "b_1_target.png"),
    ("empty", "no <id>_input.png"),
    ("absent", "does not exist"),
])
def test_bad_template_folder_errors_name_the_file(tmp_path, case, named):
    d = tmp_path / "t"
    if case != "absent":
        _folder(d, () if case == "empty" else ("a", "b_1", "c"))
    if case == "missing_target":
        (d / "c_target.png").unlink()
    elif case == "missing_input":
        (d / "c_input.png").unlink()
    elif case == "mismatched_ids":
        (d / "c_input.png").rename(d / "x_input.png")
    elif case == "unreadable":
        (d / "b_1_target.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=named):
        template.read_template(d)
    # the CLI stops on it before loading any model, with the same message on stderr
    args = ["--checkpoint=/nonexistent", f"--task_dir={d}", f"--query={d}/q.png",
            f"--output={tmp_path}/o.png"]
    with pytest.raises(ValueError, match=named):
        sample.run(sample.parser().parse_args(args))


def test_cli_errors_on_unreadable_query_and_returns_2(tmp_path, capsys):
    d = _folder(tmp_path / "t")
    bad = tmp_path / "q.png"
    bad.write_bytes(b"\x89PNG broken")
    rc = sample.main(["--checkpoint=/nonexistent", f"--task_dir={d}", f"--query={bad}",
                      f"--output={tmp_path}/o.png"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "query" in err and str(bad) in err and "not a readable image" in err


def test_size_and_pair_checks():
    fake = types.SimpleNamespace
    jdit, vae = fake(cfg=fake(patch_size=2)), fake(cfg=fake(spatial_compression=8))
    sample.check_size(512, 256, jdit, vae)
    with pytest.raises(ValueError, match="--width=500 must be a positive multiple of 16"):
        sample.check_size(512, 500, jdit, vae)
    pairs = [template.Pair(str(i), None, None) for i in range(3)]
    got = sample.choose_pairs(pairs, 3, seed=0)
    assert sorted(p.id for p in got) == ["0", "1", "2"]  # distinct while there are enough
    assert len(sample.choose_pairs(pairs, 5, seed=0)) == 5
    assert [p.id for p in sample.choose_pairs(pairs, 2, 4)] == \
        [p.id for p in sample.choose_pairs(pairs, 2, 4)]
    with pytest.raises(ValueError, match="--num_pairs=0"):
        sample.choose_pairs(pairs, 0, 0)


def test_make_grid_layout():
    a, b = np.full((4, 5, 3), 10, np.uint8), np.full((4, 5, 3), 200, np.uint8)
    g = sample.make_grid([[a, b], [b, a]], pad=2)
    assert g.shape == (2 * (4 + 2) + 2, 2 * (5 + 2) + 2, 3)
    assert (g[2:6, 2:7] == 10).all() and (g[2:6, 9:14] == 200).all()
    assert (g[8:12, 2:7] == 200).all() and (g[:2] == 0).all() and (g[:, 7:9] == 0).all()


# ---- end to end ------------------------------------------------------------------------------
def test_cli_on_tiny_checkpoint(setup, capsys, monkeypatch):
    d = setup
    rc = sample.main([str(a) for a in _cli(d, "--batch_size=4", "--seed=3")])
    assert rc == 0, capsys.readouterr().err
    out = np.asarray(Image.open(d / "out.png"))
    assert out.shape == (2 * (SIZE + 4) + 4, 2 * (SIZE + 4) + 4, 3)
    q1 = template.load_image(d / "q1.png", (SIZE, SIZE))
    np.testing.assert_array_equal(out[4:4 + SIZE, 4:4 + SIZE], q1)  # row 1: query | prediction
    pred = out[4:4 + SIZE, SIZE + 8:2 * SIZE + 8]
    assert pred.std() > 0  # a decoded image, not a blank tile
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sample"]["num_steps"] == 3 and len(summary["pairs"]) == 2
    # run dir holding the same weights as EMA: same predictions, also with another batch size
    jp, _ = _models_of(d)
    wd = d / "run"
    cfg = ml_collections.ConfigDict({
        "model": {"name": "jdit", **dataclasses.asdict(JDiTConfig(**TINY))},
        "data": {"vae_checkpoint": str(d / "ckpt")},
        "sample": {"num_steps": 3, "grid": "uniform", "method": "euler", "cfg_scale": 1.5},
    })
    zeros = jax.tree.map(np.zeros_like, jp)
    ck = RunCheckpointer(str(wd), async_save=False)
    ck.save(7, {"step": np.int32(7), "params": {"model": zeros}, "ema": {"model": jp}}, None, cfg)
    ck.wait()
    ck.close()
    monkeypatch.chdir(d)  # a relative --workdir reads too (Orbax wants absolute paths)
    model, _, step, which = sample.load_run("run")
    assert (step, which) == (7, "ema")
    got = _pure(model)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, jp)
    rc = sample.main([f"--workdir={wd}", f"--task_dir={d / 'tmpl'}", f"--query={d / 'q1.png'}",
                      f"--query={d / 'q2.png'}", f"--output={d / 'out2.png'}",
                      f"--height={SIZE}", f"--width={SIZE}", "--num_pairs=2", "--seed=3",
                      "--batch_size=1"])
    assert rc == 0, capsys.readouterr().err
    out2 = np.asarray(Image.open(d / "out2.png"))
    assert np.abs(out2.astype(int) - out.astype(int)).max() <= 2


def _cli(d, *extra):
    return [f"--checkpoint={d / 'ckpt'}", f"--task_dir={d / 'tmpl'}", f"--query={d / 'q1.png'}",
            f"--query={d / 'q2.png'}", f"--output={d / 'out.png'}", f"--height={SIZE}",
            f"--width={SIZE}", "--num_pairs=2", "--num_steps=3", "--grid=uniform", *extra]


def _models_of(d):
    params, _ = checkpoint.load_params(d / "ckpt")
    return params["jdit"], params["stvae"]
