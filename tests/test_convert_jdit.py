"""Released-weights converter: official key mapping, strict errors, CLI -> Orbax -> load_model."""

import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from helpers import TINY, latents
from safetensors.numpy import save_file

from lavin_jax import checkpoint, sharding
from lavin_jax.convert import jdit as conv
from lavin_jax.convert import load_official_jdit
from lavin_jax.models.jdit import JDiT


@pytest.fixture(scope="module")
def model():
    # Every parameter random (zero-initialised adaLN / final layer included), built without
    # eager init (fast): abstract model + numpy values.
    cfg = conv.make_config(**TINY)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: rng.normal(0.0, 0.2, a.shape).astype(a.dtype),
                          conv._abstract_params(cfg))
    return checkpoint.module_from_params(lambda: JDiT(cfg, rngs=nnx.Rngs(0)), params)


@pytest.fixture(scope="module")
def official_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "dit.safetensors"
    save_file(conv.jdit_to_state_dict(model), str(path))
    return path


def _params(m):
    return nnx.to_pure_dict(nnx.state(m, nnx.Param))


def _inputs():
    return latents(0, 2, 1, 8, 8, 4), jax.numpy.array([0.3, 0.8]), latents(1, 2, 3, 8, 8, 4)


_forward = nnx.jit(lambda m, x, t, c: m(x, t, c))


def _assert_same_model(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 _params(a), _params(b))
    x, t, c = _inputs()
    ya, yb = np.asarray(_forward(a, x, t, c)), np.asarray(_forward(b, x, t, c))
    assert ya.shape == x.shape and np.std(ya) > 0.1  # non-trivial output
    np.testing.assert_array_equal(ya, yb)


def test_official_key_names_and_shapes(model):
    sd = conv.jdit_to_state_dict(model)
    d, depth = TINY["hidden_size"], TINY["depth"]
    kv = d // TINY["kv_group"]
    mlp = model.cfg.mlp_dim
    assert sd["cond_embedder.0.weight"].shape == (d, 16)  # torch Linear: [out, in]
    assert sd["cond_embedder.1.bias"].shape == (d,)
    assert sd["prompt_embed"].shape == (1, d)
    assert sd["t_embedder.mlp.0.weight"].shape == (d, 256)
    assert sd["blocks.1.joint_attn.x_k.weight"].shape == (kv, d)
    assert sd["blocks.0.joint_attn.cond_knorm.weight"].shape == (kv,)
    assert sd["blocks.1.cond_mlp.down_proj.weight"].shape == (d, mlp)
    assert sd["blocks.0.x_modulation.1.weight"].shape == (4 * d, d)
    assert sd["final_layer.linear.weight"].shape == (16, d)
    assert sd["final_layer.adaLN_modulation.1.bias"].shape == (d,)
    # 18 top-level tensors + 11 per stream per block.
    assert len(sd) == 18 + 2 * 11 * depth
    # Layer i of our stacked kernel is official blocks.i, transposed.
    q = np.asarray(model.blocks.x.q.kernel[...])
    np.testing.assert_array_equal(sd["blocks.1.joint_attn.x_q.weight"], q[1].T)


def test_round_trip_identical_params_and_outputs(model, official_file):
    loaded = load_official_jdit(official_file, **TINY)
    _assert_same_model(model, loaded)
    # ... and back to the same official tensors.
    again = conv.jdit_to_state_dict(loaded)
    ref = conv.read_safetensors(official_file)
    assert sorted(again) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(again[k], ref[k])


def test_bf16_file_with_wrapper_prefix(model, tmp_path):
    # A bf16 file (read through ml_dtypes) saved from a DDP-wrapped module ("module." prefix).
    from safetensors.flax import save_file as save_jax

    sd = conv.jdit_to_state_dict(model)
    path = tmp_path / "bf16.safetensors"
    save_jax({"module." + k: jax.numpy.asarray(v, jax.numpy.bfloat16) for k, v in sd.items()},
             str(path))
    loaded = load_official_jdit(path, **TINY)
    want = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32),
                        _params(model))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y),
                 _params(loaded), want)
    assert loaded.blocks.x.q.kernel[...].dtype == np.float32


def test_missing_unexpected_misshaped_keys_are_named(model):
    sd = conv.jdit_to_state_dict(model)
    bad = dict(sd)
    del bad["blocks.1.joint_attn.cond_v.weight"]
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.joint_attn\.cond_v\.weight"):
        conv.jdit_from_state_dict(bad, **TINY)
    bad = dict(sd, **{"blocks.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.0\.extra\.weight"):
        conv.jdit_from_state_dict(bad, **TINY)
    bad = dict(sd, **{"final_layer.linear.weight": sd["final_layer.linear.weight"][:, :-1]})
    with pytest.raises(ValueError, match=r"mis-shaped keys: final_layer\.linear\.weight"):
        conv.jdit_from_state_dict(bad, **TINY)
    # A wrong shape flag (depth) shows up as missing blocks.2.* keys.
    with pytest.raises(ValueError, match=r"missing keys: .*blocks\.2\."):
        conv.jdit_from_state_dict(sd, **{**TINY, "depth": 3})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_official_jdit(tmp_path / "nope.safetensors", **TINY)


def test_cli_writes_checkpoint_load_model_restores(model, official_file, tmp_path):
    out = tmp_path / "ckpt"
    shape = [f"--{k}={v}" for k, v in TINY.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "lavin_jax.convert", f"--dit={official_file}", f"--out={out}",
         *shape], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = checkpoint.load_metadata(out)
    assert meta["items"] == ["jdit"] and meta["configs"]["jdit"]["hidden_size"] == 48
    restored = checkpoint.load_model(out, "jdit")
    _assert_same_model(model, restored)
    # Restored straight onto a mesh (8 fake devices, fsdp): placed by logical names.
    cfg = sharding.default_config()
    mesh = sharding.make_mesh(cfg)
    sharded = checkpoint.load_model(out, "jdit", mesh=mesh, rules=cfg.sharding.rules)
    kernel = sharded.blocks.cond.gate.kernel[...]  # ('layers', 'embed', 'mlp'): embed -> fsdp
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    with sharding.use_rules(mesh, cfg.sharding.rules):
        x, t, c = _inputs()
        y = np.asarray(_forward(sharded, x, t, c))
    np.testing.assert_allclose(y, np.asarray(_forward(model, x, t, c)), rtol=1e-4, atol=1e-4)
    # load_params without a target gives numpy arrays of the stored shapes.
    params, _ = checkpoint.load_params(out)
    assert params["jdit"]["blocks"]["cond"]["q"]["kernel"].shape == (2, 48, 48)
    # Writing into an existing checkpoint is refused.
    with pytest.raises(FileExistsError, match="already holds step 0"):
        checkpoint.save_params(out, params)


class _Stat(nnx.Variable):
    pass


class _Toy(nnx.Module):
    """Int-keyed sub-modules (nnx.List) and a non-Param variable, like the ST-VAE."""

    def __init__(self, width: int, stat: float):
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(2)])
        self.stat = _Stat(jax.numpy.asarray(stat, jax.numpy.float32))


def test_checkpoint_list_keys_and_non_param_state(tmp_path, monkeypatch):
    monkeypatch.setitem(checkpoint.MODEL_FACTORIES, "toy",
                        lambda c: (lambda: _Toy(c["width"], c["stat"])))
    rng = np.random.default_rng(0)
    params = {"layers": {i: {"kernel": rng.normal(size=(3, 3)).astype(np.float32),
                             "bias": rng.normal(size=(3,)).astype(np.float32)} for i in range(2)}}
    meta = {"configs": {"toy": {"width": 3, "stat": 0.5}}}
    checkpoint.save_params(tmp_path, {"toy": params}, meta)
    toy = checkpoint.load_model(tmp_path, "toy")
    assert float(toy.stat[...]) == 0.5  # non-Param state comes from the stored config
    kernel = np.asarray(toy.layers[1].kernel[...])
    np.testing.assert_array_equal(kernel, params["layers"][1]["kernel"])
    with pytest.raises(KeyError, match="no model"):
        checkpoint.load_params(tmp_path, {"jdit": {}})
    bad = {"layers": {0: params["layers"][0]}}
    with pytest.raises(ValueError, match="missing layers.1.bias"):
        checkpoint.module_from_params(lambda: _Toy(3, 0.5), bad)
