"""J-DiT configs: ``--config=configs/lavin_dit.py:VARIANT`` (demo, bench, 0.1b, 1b, 3.4b).

Shapes: 3.4b is the released model; 0.1b / 1b are ours (the paper's are unpublished), sized to
1.005e8 and 9.64e8 parameters (tests/test_jdit.py checks the counts).
"""

import ml_collections

from lavin_jax import optim, run_config

SHAPES = {
    # hidden, depth, heads, kv_group  (head_dim = hidden / heads, a multiple of 6)
    "demo": (192, 4, 4, 2),
    "bench": (396, 4, 6, 3),  # the issue-2 CPU benchmark shape (tools/bench_jdit.py)
    "0.1b": (576, 10, 8, 2),
    "1b": (1536, 14, 16, 4),
    "3.4b": (2304, 22, 32, 4),
}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in SHAPES:
        raise ValueError(f"configs/lavin_dit.py: unknown variant {arg!r}; use {list(SHAPES)}")
    hidden, depth, heads, kv_group = SHAPES[arg]
    cfg = run_config.base_config()
    cfg.variant = arg
    cfg.seed = 0
    cfg.total_steps = 2000 if arg == "demo" else 100_000
    cfg.log_every_steps = 50 if arg == "demo" else 100
    cfg.checkpoint_every_steps = 500 if arg == "demo" else 2000
    cfg.eval_every_steps = 1000 if arg == "demo" else 10_000
    cfg.sample_every_steps = 100 if arg == "demo" else 5000  # sample grids (0 = none)

    cfg.model = ml_collections.ConfigDict(dict(
        name="jdit",
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        kv_group=kv_group,
        patch_size=2,
        in_channels=16,
        attention_backend="xla",  # xla | cudnn | splash
        remat_policy="none" if arg in ("demo", "bench") else "full",
        # CPU: unrolled layers run ~30% faster than the scan (no stacked residual buffers)
        scan_layers=arg not in ("demo", "bench"),
        param_dtype="float32",
        dtype="float32" if arg in ("demo", "bench") else "bfloat16",
        # Patch-embedder LayerNorm bias drawn N(0, 1) instead of zeros (JDiTConfig): the demo
        # copy probe (`bench copy`, 300 steps) 0.28 -> 0.06; full configs keep the release's init.
        embed_bias_init=1.0 if arg == "demo" else 0.0,
    ))
    cfg.flow = ml_collections.ConfigDict(dict(
        # training t: logit_normal sigmoid(N(t_loc, t_scale)) (the release: 0, 1) | uniform
        t_dist="logit_normal", t_loc=0.0, t_scale=1.0,
        # t' = t / (t + s (1 - t)); 1 = the release. Demo: 3 -- the official 20-point grid
        # spends 10 steps below t = 0.05, where logit-normal(0, 1) puts 0.2% of training t;
        # measured on the demo (600 steps, same VAE and cache): task identification 0.70 ->
        # 0.77, normals 33.9 -> 30.1 deg (uniform t: 0.75, 31.5 deg).
        time_shift=3.0 if arg == "demo" else 1.0,
        l1_weight=0.1,  # released loss: MSE + 0.1 * L1 per example
        context_dropout=0.1,  # probability of the CFG null context
    ))
    cfg.objective.name = "flow"
    cfg.optim = optim.default_config(
        lr=1e-3 if arg == "demo" else 1e-4, warmup_steps=50 if arg == "demo" else 2000,
        weight_decay=0.0, schedule="constant", grad_clip=1.0)
    cfg.ema_decay = 0.99 if arg == "demo" else 0.9999  # demo: a few hundred steps
    cfg.sample = ml_collections.ConfigDict(dict(
        num_steps=20, grid="official", method="euler", cfg_scale=1.5, shift=1.0,
    ))
    cfg.data = data_config(arg)
    # Evaluation (lavin_jax/evaluate.py; keys as its flags override config.sample there).
    cfg.eval = ml_collections.ConfigDict(dict(
        tasks=[],  # [] = the training tasks (config.data.tasks)
        # In-training eval every eval_every_steps (lavin_jax/eval_periodic.py): a small fixed
        # subset, fewer ODE steps; needs config.data.vae_checkpoint to decode predictions.
        in_training=dict(num_examples=8 if arg == "demo" else 32, num_steps=10, grid="uniform",
                         task_identification=arg == "demo"),
    ))
    return cfg


# ---- data (issue 4: episodes, latent cache, packing, the Grain pipeline) ---------------------
# Training tasks (foreground / single_detection are held out, as in the paper).
IMAGE_TASKS = ("depth", "normals", "panoptic", "detection", "pose", "edges", "colorization",
               "inpainting", "gaussian_deblur", "motion_deblur", "deraining", "denoising",
               "low_light", "depth_to_image", "normal_to_image", "pose_to_image")
# The demo mixture (a 4-layer J-DiT, minutes on a CPU): dense maps, edges and one
# restoration -- tasks whose 64 px targets the demo ST-VAE reconstructs well enough for their
# metric. Measured through the demo VAE (its reconstruction of the clean target, decoded and
# scored, i.e. the best any demo J-DiT could do): depth AbsRel 0.05, normals 10.7 deg, edges
# ODS-F 0.92, foreground mIoU 0.77, low-light 22.0 dB -- but detection mAP 0, pose OKS-AP 0,
# panoptic PQ 0.04 (1 px box outlines / limb sticks / per-segment random colours at 64 px do
# not survive a few-minute VAE), so those train in the full configs, not the demo. Also left
# out: restorations whose copy-the-input baseline is above what the demo VAE reconstructs
# (inpainting 26.7 dB, deraining 27.7 dB; denoising, the deblurs and colorization are close),
# and foreground: which object is the foreground is defined only by the context pairs (a shared
# class), an in-context skill ~10 CPU-minutes of J-DiT do not reach (mIoU 0.01-0.02 against the
# VAE's 0.77; predictions lack the object), and its dark predictions made edges unidentifiable
# (BENCHMARKS.md "make demo"). It stays held out, as in the paper.
DEMO_TASKS = ("depth", "normals", "edges", "low_light")
VIDEO_TASKS = ("frame_prediction", "video_depth", "video_normals", "optical_flow",
               "video_segmentation", "depth_to_video", "normal_to_video")


def data_config(arg: str) -> ml_collections.ConfigDict:
    demo = arg == "demo"
    res = 64 if demo else 256
    tasks = {t: 1.0 for t in DEMO_TASKS} if demo else {
        **{t: 1.0 for t in IMAGE_TASKS}, **{t: 0.5 for t in VIDEO_TASKS}}
    return ml_collections.ConfigDict(dict(
        kind="episodes",  # lavin_jax/data/batches.py -> lavin_jax/data/pipeline.py
        # "cache": latents from `python -m lavin_jax.encode`; "online": pixels packed, encoded in
        # the train step (data/online.py; image tasks); "render": encoded on the host (tests).
        mode="cache",
        data_dir="runs/data",  # TFDS sources (prepared on first use)
        split="train",
        sources={"image": f"synthetic_scenes/{res}", "video": f"synthetic_scenes/clips5_{res}"},
        task_sources={},  # {task: source} overrides
        tasks=tasks,  # {task: weight}; task ids follow the sorted names
        # Tasks kept out of training, evaluated given only as context (as the paper's).
        held_out_tasks=["foreground", "single_detection"],
        task_options={},  # {task: {option: value}}
        # weights of N = 1..8 context pairs (demo: 1-3, short rows train faster on a CPU)
        pairs=[1.0] * 3 if demo else [1.0] * 8,
        # Square pixel sizes (or [h, w]); rows mix resolutions. Demo: 64 px = 16x16 latents =
        # 64 tokens/frame with the demo VAE (4x) and patch 2; 48 px = 36 tokens/frame.
        resolutions=[64, 48] if demo else [256, 192],
        resolution_weights=[1.0, 1.0],
        # Packed rows: Lc cond + Lx target tokens, <= max_segments episodes. Lx is chosen from the
        # mixture for this Lc (`python -m lavin_jax.tools.bench pipeline` prints the best).
        cond_len=512 if demo else 10240,  # demo: short rows, less masked-out attention
        target_len=112 if demo else 1168,
        max_segments=16 if demo else 48,
        lookahead=64,  # episodes the packer looks ahead
        global_batch=8 if demo else 256,  # packed rows per step, all processes
        seed=0,  # episodes, cache shuffling, context dropout (cfg.flow.context_dropout)
        read_threads=2,  # map threads per process
        workers=0,  # Grain worker processes per process (mp_prefetch); 0 = in-process
        prefetch=2,  # batches prefetched by a thread
        cache_dir="runs/demo/latents" if demo else "",  # or [(dir, weight), ...] to mix
        cache_episodes=1024 if demo else 1_000_000,  # episodes the cache job writes
        cache_dtype="float16",
        vae_checkpoint="",  # ST-VAE params checkpoint (lavin_jax.checkpoint) for the cache job
    ))
