"""bench train: the real train step's throughput and checkpoint stall, one JSON line."""

import json

import pytest

from configs import lavin_dit
from lavin_jax.data.batches import make_iterator
from lavin_jax.tools import bench_train

TINY_JDIT = ["--config.model.hidden_size=48", "--config.model.depth=2",
             "--config.model.num_heads=4", "--config.model.kv_group=2",
             "--config.data.global_batch=8", "--config.data.cond_len=128",
             "--config.data.target_len=32", "--latent_size=8"]
TINY_VAE = ["--config.model.block_out_channels=(8, 16)", "--config.model.latent_channels=4",
            "--config.model.norm_num_groups=4", "--config.model.spatial_norm_groups=4",
            "--config.model.temporal_compression_ratio=2", "--config.model.tile_sample_size=16",
            "--config.model.tile_sample_frames=3", "--config.objective.disc.channels=8",
            "--config.objective.disc.n_layers=2",
            "--config.data.global_batch=8", "--config.data.image_size=16"]
QUICK = ["--steps", "2", "--warmup", "0", "--settle", "2", "--saves", "1"]
KEYS = ("steps_per_s", "tokens_per_s", "step_s", "step_cpu_s", "checkpoint_save_call_s",
        "checkpoint_write_s", "checkpoint_overlap_steps")


def _run(argv, capsys) -> dict:
    result = bench_train.main(["bench"] + argv)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    for k in KEYS:
        assert last[k] > 0, k
    assert isinstance(last["checkpoint_stall_fraction"], float)  # noise may make it < 0
    assert len(last["checkpoint_stall_fractions"]) == last["saves"]
    assert last["checkpoint_writer_priority"] == "idle" and last["checkpoint_snapshot"] is True
    assert last["checkpoint_compression"] is True
    # float32 params and two Adam moments at least (+ EMA, step, rng)
    assert last["state_arrays"] > 4 and last["state_bytes"] > 3 * 4 * last["params"]
    assert last["data_kind"] == "synthetic"
    return last


def test_jdit_tiny_config(capsys):
    out = _run(["--config", "configs/lavin_dit.py:demo", "--spinner", "1"] + QUICK + TINY_JDIT,
               capsys)
    # the writer process (auto, one process) and its CPU; the spinning control, timed alike
    assert out["checkpoint_writer"] == "process" and out["checkpoint_writer_process_cpu_s"] >= 0
    assert len(out["idle_spinner_stall_fractions"]) == 1 and out["idle_spinner_cpu_s"] >= 0
    assert out["idle_spinner_steps"] == max(1, round(out["checkpoint_overlap_steps"]))
    # rows: 8x8 latents / patch 2 = 16 tokens a frame; Lx 32 -> 2 episodes of 4 + 1 frames
    assert out["batch_shapes"]["cond"] == [8, 128, 64] and out["batch_shapes"]["x"] == [8, 32, 64]
    assert out["tokens_per_s"] == pytest.approx(out["steps_per_s"] * 8 * (128 + 32))
    assert out["objective"] == "flow" and "model/loss" in out["loss"]


@pytest.mark.slow
def test_stvae_tiny_config(capsys):
    out = _run(["--config", "configs/stvae.py:demo", "--frames", "3"] + QUICK + TINY_VAE, capsys)
    assert out["batch_shapes"]["video"] == [8, 3, 16, 16, 3]
    # latent positions: 3 frames -> 2 (2x temporal), 16 px -> 8 (2x spatial)
    assert out["tokens_per_s"] == pytest.approx(out["steps_per_s"] * 8 * 2 * 8 * 8)


def test_overrides_and_synthetic_rows():
    args, over = bench_train.parse_args(["--config.data.global_batch=8",
                                         "--config.optim.lr=1", "--config.data.mode=cache"])
    cfg = lavin_dit.get_config("demo")
    bench_train.apply_overrides(cfg, over)
    assert cfg.data.global_batch == 8 and cfg.optim.lr == 1.0 and cfg.data.mode == "cache"
    bench_train.synthetic_data(cfg, args)
    d, want = cfg.data, lavin_dit.get_config("demo").data
    tpf = (d.latent_size // cfg.model.patch_size) ** 2
    assert d.kind == "synthetic" and d.global_batch == 8 and d.latent_size == 16
    assert d.episodes_per_row * tpf <= want.target_len
    assert d.episodes_per_row * d.cond_frames * tpf <= want.cond_len
    # rows padded (segment 0) to exactly the configured lengths
    batch = next(bench_train.PadRows(make_iterator(cfg), d.cond_len, d.target_len))
    assert batch["cond"].shape == (8, want.cond_len, 4 * cfg.model.in_channels)
    assert batch["x_pos"].shape == (8, want.target_len, 3)
    n = d.episodes_per_row * tpf
    assert (batch["x_seg"][:, :n] > 0).all() and (batch["x_seg"][:, n:] == 0).all()
    with pytest.raises(SystemExit, match="no block 'nope'"):
        bench_train.apply_overrides(cfg, [("nope.x", "1")])
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--bogus=1"])


def test_init_state_times_a_runs_own_state(tmp_path, capsys):
    """``--init_state WORKDIR[:STEP]`` starts from a run's checkpointed train state (here the
    bench's own kept checkpoints); a missing step or another config's state is a one-line exit."""
    run = tmp_path / "run"
    first = _run(["--config", "configs/lavin_dit.py:demo", "--workdir", str(run)] + QUICK
                 + TINY_JDIT, capsys)
    assert first["init_state"] is None
    assert first["checkpoint_blocking_s"] >= first["checkpoint_save_call_s"] > 0
    assert first["checkpoint_blocking_fraction"] > 0
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    args, over = bench_train.parse_args(["--config", "configs/lavin_dit.py:demo"] + TINY_JDIT)
    cfg = bench_train.load_config(args.config)
    bench_train.apply_overrides(cfg, over)
    bench_train.synthetic_data(cfg, args)
    r = bench_train.Runner(cfg)
    assert int(r.state["step"]) == 0
    assert bench_train.restore_state(r, f"{run}:{saved[0]}") == saved[0]
    assert int(r.state["step"]) == saved[0] > 0
    assert bench_train.restore_state(r, str(run)) == saved[-1]
    assert int(r.state["step"]) == saved[-1]
    with pytest.raises(SystemExit, match=r"--init_state=.*:999: no checkpoint 999"):
        bench_train.restore_state(r, f"{run}:999")
    bench_train.apply_overrides(cfg, [("model.depth", "3")])
    with pytest.raises(SystemExit, match=r"does not fit this run's state .*blocks/.* shape \(2, "):
        bench_train.restore_state(bench_train.Runner(cfg), str(run))


def test_bad_config_is_the_lines_alone():
    """A config error exits with its lines (no traceback), before anything is built."""
    from lavin_jax.tools import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["bench", "train", "--config", "configs/stvae.py:demo",
                    "--config.data.image_size=16"])
    assert str(e.value.code).startswith(
        "bench train: invalid config:\n  config.data.image_size=16 is too small for the "
        "discriminator's 3 layers"), e.value.code
