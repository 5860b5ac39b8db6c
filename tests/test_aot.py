"""AOT fit check (lavin_jax/aot.py): topology parsing, fit arithmetic, FLOP extrapolation, and
(slow) a real TPU compile of the demo config on a small topology (needs libtpu)."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from configs import lavin_dit
from lavin_jax import aot

GiB = 2**30


@pytest.mark.parametrize("name, gen, shape", [
    ("v5p-128", "v5p", (4, 4, 4)), ("v5p-8", "v5p", (2, 2, 1)), ("v5p-1024", "v5p", (8, 8, 8)),
    ("v4-32", "v4", (2, 2, 4)), ("v6e-256", "v6e", (16, 16)), ("v6e-8", "v6e", (2, 4)),
    ("v5e-16", "v5e", (4, 4)), ("v5litepod-64", "v5e", (8, 8)), ("v6e-1", "v6e", (1, 1)),
    ("v5p:4x4x12", "v5p", (4, 4, 12)),
])
def test_parse_topology(name, gen, shape):
    topo = aot.parse_topology(name, num_slices=2)
    assert (topo.generation, topo.shape) == (gen, shape)
    assert topo.chips == 2 * topo.chips_per_slice
    assert topo.libtpu_name == f"{gen}:{'x'.join(map(str, shape))}"
    if "-" in name:  # Cloud TPU's accelerator type names the slice as given
        assert topo.accelerator_type == name.replace("v5e-", "v5litepod-")


@pytest.mark.parametrize("name, message", [("v7-8", "use e.g."), ("v5p-7", "2 per chip"),
                                           ("v5p-24", "explicitly"), ("v6e:4x4x4", "2-D")])
def test_parse_topology_errors(name, message):
    with pytest.raises(ValueError, match=message):
        aot.parse_topology(name)


def test_fit_report_arithmetic_and_boundary():
    topo = aot.parse_topology("v5e-16")  # 16 chips x 16 GiB
    mem = dict(argument_bytes=10 * GiB, output_bytes=9 * GiB, alias_bytes=9 * GiB,
               temp_bytes=5 * GiB, code_bytes=GiB)
    r = aot.fit_report(mem, topo, model_flops=16 * 197e12, mfu=0.5)
    assert r["per_chip_bytes"] == 16 * GiB and r["hbm_bytes"] == 16 * GiB and r["fits"]
    assert r["step_time_s"] == pytest.approx(2.0)  # flops / (16 chips x 197 TFLOP/s x 0.5)
    r = aot.fit_report({**mem, "temp_bytes": 5 * GiB + 1}, topo, 1.0, 0.4)
    assert not r["fits"] and r["per_chip_bytes"] == 16 * GiB + 1
    assert {"fits", "per_chip_bytes", "hbm_bytes", "flops_per_step"} <= set(r)


def test_oom_message_parsing():
    msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
           "space hbm. Used 120.50G of 95.74G hbm. Exceeded hbm capacity by 24.76G.")
    assert aot._oom_bytes(msg) == int(120.5 * GiB)
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (130.56G) exceeds available HBM (15.75G).")  # libtpu 0.0.42, verbatim
    assert aot._oom_bytes(msg) == int(130.56 * GiB)
    assert aot._oom_bytes("some other error") is None


def test_episode_rows_match_the_paper_shapes():
    cfg = lavin_dit.get_config("1b")
    assert aot.episode_rows(cfg, 256, 8, 640) == aot.Rows(640, 4352, 256, 1)
    assert aot.episode_rows(cfg, 512, 8, 640) == aot.Rows(640, 17408, 1024, 1)
    with pytest.raises(ValueError, match="resolution"):
        aot.episode_rows(cfg, 250, 8, 640)
    b = aot.batch_struct(cfg, aot.Rows(4, 64, 16, 3))
    assert b["cond"].shape == (4, 64, 64) and b["x_pos"].shape == (4, 16, 3)
    assert b["t"].shape == (4, 3) and b["cond_seg"].dtype == jax.numpy.int32


def test_flops_extrapolated_from_depth_1_and_2_equal_the_unrolled_step():
    from lavin_jax import sharding

    cfg = lavin_dit.get_config("demo")
    cfg.model.depth = 3
    rows = aot.Rows(2, 256, 64, 1)
    got = aot.step_flops(cfg, rows, remat="none")
    ref = copy.deepcopy(cfg)
    ref.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, context=1))
    ref.model.scan_layers = False
    mesh = sharding.make_mesh(ref, jax.devices()[:1])
    want = aot._lower(ref, mesh, aot.batch_struct(ref, rows)).cost_analysis()["flops"]
    # Not bit-equal: the unrolled reference also adds each layer's gradient into the stacked
    # [depth, ...] arrays (a depth^2 term the scanned step does not have).
    assert got == pytest.approx(float(want), rel=1e-3)
    # Microbatches (a scan, counted once by XLA) still count every row; the optimizer update,
    # counted once per microbatch, is the small difference.
    cfg.microbatches = 2
    assert got < aot.step_flops(cfg, rows, remat="none") < 1.03 * got


def test_validation_before_renting_needs_no_cache_or_checkpoint():
    """The fit check runs before the latent cache / init checkpoint exist; mesh errors remain."""
    from lavin_jax.run_config import ConfigError, validate_config

    cfg = lavin_dit.get_config("1b")
    cfg.data.cache_dir, cfg.init_from = "", "/nonexistent/ckpt"
    cfg.data.global_batch = 640
    with pytest.raises(ConfigError, match="cache_dir"):
        validate_config(cfg, 64)
    validate_config(aot._without_data_paths(cfg), 64)  # no error
    assert cfg.data.mode == "cache" and cfg.init_from  # the caller's config is untouched
    cfg.mesh.context = 3
    with pytest.raises(ConfigError, match="config.mesh"):
        validate_config(aot._without_data_paths(cfg), 64)


def test_missing_libtpu_fails_with_the_install_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(SystemExit, match="pip install -r requirements-tpu.txt"):
        aot.topology_devices(aot.parse_topology("v5e-4"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -r requirements-tpu.txt)")
def test_demo_config_compiles_for_v5e_4():
    """The CLI end to end: TPU compile on this CPU machine, last line one JSON object."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "lavin_jax.aot", "--config=configs/lavin_dit.py:demo",
         "--topology=v5e-4", "--resolution=64", "--pairs=2", "--vae_stride=4",
         "--global_batch=8"], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["fits"] and report["chips"] == 4 and report["hbm_bytes"] == 16 * GiB
    assert 0 < report["per_chip_bytes"] < report["hbm_bytes"]
    assert report["temp_bytes"] > 0 and report["alias_bytes"] > 0  # state donated
    assert report["batch"] == {"rows": 8, "cond_len": 5 * 64, "target_len": 64, "segments": 1}
    assert report["mesh"]["fsdp"] == 4 and report["flops_per_step"] > 1e9
    assert any("FITS" in line for line in lines[:-1])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -r requirements-tpu.txt)")
def test_config_that_does_not_fit_fails_with_the_numbers():
    """18k-token rows with the XLA attention ([L, L] logits) on 16 GiB chips: exit 1 + numbers."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "lavin_jax.aot", "--config=configs/lavin_dit.py:demo",
         "--topology=v5e-4", "--resolution=256", "--pairs=8", "--vae_stride=4",
         "--global_batch=16", "--skip_flops"], cwd=root, env=env, capture_output=True,
        text=True, timeout=1200)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["fits"] and report["per_chip_bytes"] > 4 * report["hbm_bytes"]
    assert "RESOURCE_EXHAUSTED" in report["compile_error"]
    assert "DOES NOT FIT" in proc.stdout
