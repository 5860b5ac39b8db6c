"""Released ST-VAE weights <-> our STVAE: key mapping, strict checks, file formats."""

import hashlib
import importlib.util

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from lavin_jax import sharding
from lavin_jax.convert import stvae as cv
from lavin_jax.models.stvae import STVAE

SHAPE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
             norm_num_groups=2, temporal_compression_ratio=2)
EXTRA = dict(spatial_norm_groups=2, tile_sample_size=16, tile_sample_frames=3)


def _model(seed=0) -> STVAE:
    cfg = cv.make_config(**SHAPE, **EXTRA)
    with nnx.use_eager_sharding(False):
        m = STVAE(cfg, rngs=nnx.Rngs(seed))
    # Non-trivial norms so a swapped scale/bias would show.
    for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        if path[-1] in ("scale", "bias"):
            v.set_value(jax.random.normal(jax.random.key(len(path)), v.get_value().shape))
    return m


def _params(m):
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    return {k: np.asarray(v) for k, v in flat.items()}


def _assert_same(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


def test_official_key_names():
    cases = {
        ("encoder", "conv_in", "kernel"): "encoder.conv_in.conv.weight",
        ("encoder", "down_blocks", 1, "resnets", 0, "shortcut", "kernel"):
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        ("encoder", "down_blocks", 0, "down", "conv", "bias"):
            "encoder.down_blocks.0.downsamplers.0.conv.bias",
        ("encoder", "mid_block", 1, "norm2", "scale"): "encoder.mid_block.resnets.1.norm2.weight",
        ("encoder", "norm_out", "scale"): "encoder.norm_out.weight",
        ("decoder", "mid_block", 0, "norm1", "norm", "scale"):
            "decoder.mid_block.resnets.0.norm1.norm_layer.weight",
        ("decoder", "up_blocks", 2, "resnets", 3, "norm2", "conv_y", "kernel"):
            "decoder.up_blocks.2.resnets.3.norm2.conv_y.conv.weight",
        ("decoder", "up_blocks", 0, "up", "conv", "kernel"):
            "decoder.up_blocks.0.upsamplers.0.conv.weight",
        ("decoder", "norm_out", "conv_b", "bias"): "decoder.norm_out.conv_b.conv.bias",
        ("decoder", "conv_out", "kernel"): "decoder.conv_out.conv.weight",
    }
    for path, key in cases.items():
        assert cv.official_key(path) == key


def test_release_keys_match_official_listing():
    """Every key and shape of the release model, fingerprinted against the official module's
    state_dict (436 tensors, 215,583,907 values; listing hashed from AutoencoderKLSTVAE())."""
    cfg = cv.make_config()
    _, pstate, _ = cv._abstract(cfg)
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(pstate))
    listing = {cv.official_key(p): cv._official_shape(tuple(v.shape)) for p, v in flat.items()}
    assert len(listing) == 436
    assert sum(int(np.prod(s)) for s in listing.values()) == 215_583_907
    text = "\n".join(f"{k} {tuple(s)}" for k, s in sorted(listing.items()))
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "d6831129fbec253ca2cf1a9ddc799d4cf3bf503f18438bef7fdefe501247c81c")


def test_round_trip_state_dict():
    m = _model()
    sd = cv.stvae_to_state_dict(m)
    assert sd["encoder.conv_in.conv.weight"].shape == (8, 3, 3, 3, 3)  # torch [out, in, t, h, w]
    assert sd["encoder.down_blocks.0.downsamplers.0.conv.weight"].shape == (8, 8, 3, 3)
    back = cv.stvae_from_state_dict(sd, **SHAPE, **EXTRA)
    _assert_same(m, back)
    assert float(back.latent_shift[...]) == 0.032470703125  # the release values by default
    assert cv.stvae_to_state_dict(back).keys() == sd.keys()
    wrapped = {"module." + k: v for k, v in sd.items()}  # DDP prefix is stripped
    _assert_same(m, cv.stvae_from_state_dict(wrapped, **SHAPE, **EXTRA))


def test_safetensors_file_and_sharded_load(tmp_path):
    m = _model()
    path = tmp_path / "stvae.safetensors"
    save_file(cv.stvae_to_state_dict(m), str(path))
    _assert_same(m, cv.load_official_stvae(path, **SHAPE, **EXTRA))
    cfg = sharding.default_config()
    mesh = sharding.make_mesh(cfg)
    sharded = cv.load_official_stvae(path, mesh=mesh, rules=cfg.sharding.rules, **SHAPE, **EXTRA)
    k = sharded.decoder.conv_in.kernel.get_value()
    assert "fsdp" in str(k.sharding.spec)
    _assert_same(m, sharded)


def test_strict_errors_name_the_keys(tmp_path):
    sd = cv.stvae_to_state_dict(_model())
    bad = dict(sd)
    del bad["decoder.norm_out.conv_y.conv.weight"]
    with pytest.raises(ValueError, match=r"missing keys: decoder\.norm_out\.conv_y\.conv\.weight"):
        cv.stvae_from_state_dict(bad, **SHAPE, **EXTRA)
    bad = {**sd, "loss.discriminator.0.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected keys: loss\.discriminator\.0\.weight"):
        cv.stvae_from_state_dict(bad, **SHAPE, **EXTRA)
    cv.stvae_from_state_dict(bad, ignore_prefixes=("loss.",), **SHAPE, **EXTRA)
    bad = {**sd, "encoder.conv_out.conv.bias": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match=r"mis-shaped keys: encoder\.conv_out\.conv\.bias"):
        cv.stvae_from_state_dict(bad, **SHAPE, **EXTRA)
    with pytest.raises(ValueError, match="layers_per_block=2") as e:  # wrong shape argument
        cv.stvae_from_state_dict(sd, **{**SHAPE, "layers_per_block": 2}, **EXTRA)
    assert "\n" not in str(e.value)
    path = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in sd.items() if "encoder.conv_in" not in k}, str(path))
    with pytest.raises(ValueError, match=f"{path}.*encoder.conv_in.conv.bias"):
        cv.load_official_stvae(path, **SHAPE, **EXTRA)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pytorch_pickle_needs_torch(tmp_path):
    path = tmp_path / "stvae.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"needs torch.*weights_only=True.*\[torch\]"):
        cv.load_official_stvae(path)
    with pytest.raises(FileNotFoundError, match="no such ST-VAE checkpoint"):
        cv.load_official_stvae(tmp_path / "absent.pt")


def test_make_config_names():
    cfg = cv.make_config(dtype="bfloat16")
    assert cfg.spatial_norm_groups == 32  # hard-coded in the official spatial norm
    assert cfg.dtype == "bfloat16" and cfg.block_out_channels == (128, 256, 256, 512)
    with pytest.raises(ValueError, match="not divisible by model.spatial_norm_groups=32"):
        cv.make_config(**SHAPE)  # small widths need spatial_norm_groups too
