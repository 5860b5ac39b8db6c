"""ST-VAE configs: ``--config=configs/stvae.py:VARIANT`` with VARIANT in demo, release.

release: the published shapes (128/256/256/512, 3 resnets per encoder level, 16 latent
channels, 8x spatial, 4x temporal) and the published latent shift/scale.
demo: ours, for 64 px images on a CPU: 4x spatial (16x16 latents), 4x temporal, 16 latent
channels, so the demo J-DiT (in_channels=16, patch 2) sees 8x8 tokens per frame. 16 rather than
8 channels: in a few hundred steps the 8-channel bottleneck still blurred thin lines and masks
(edge / depth / normal reconstructions measured 1.5-2x worse; the J-DiT cost barely changes).
Its latent shift/scale start at (0, 1) and are measured on data after training.
"""

import ml_collections

from lavin_jax import run_config

SHAPES = {
    # block_out_channels, layers_per_block, latent_channels, norm groups, spatial-norm groups
    "demo": ((32, 64, 64), 1, 16, 8, 8),
    "release": ((128, 256, 256, 512), 3, 16, 32, 32),
}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in SHAPES:
        raise ValueError(f"configs/stvae.py: unknown variant {arg!r}; use {list(SHAPES)}")
    chans, layers, latent, groups, sgroups = SHAPES[arg]
    demo = arg == "demo"
    cfg = run_config.base_config()
    cfg.variant = arg
    cfg.seed = 0
    cfg.total_steps = 3000 if demo else 200_000
    cfg.log_every_steps = 50 if demo else 100
    cfg.checkpoint_every_steps = 500 if demo else 5000
    cfg.eval_every_steps = 1000 if demo else 10_000
    cfg.sample_every_steps = 100 if demo else 5000  # reconstruction grids (0 = none)

    cfg.model = ml_collections.ConfigDict(dict(
        name="stvae",
        block_out_channels=chans,  # levels; spatial compression = 2 ** (levels - 1)
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=groups,
        spatial_norm_groups=sgroups,  # the release hard-codes 32 in its spatial norms
        temporal_compression_ratio=4,
        tile_sample_size=64 if demo else 512,  # pixels; release inference uses 512
        tile_sample_frames=17 if demo else 129,
        tile_overlap=0.25,
        latent_shift=0.0 if demo else 0.032470703125,
        latent_scale=1.0 if demo else 1.08936170213,
        remat=not demo,
        param_dtype="float32",
        dtype="float32",
    ))
    # --- cfg.objective (owned by lavin_jax/objectives/vae.py, where every key is documented) ---
    from lavin_jax.objectives.vae import default_config as objective_defaults

    cfg.objective = objective_defaults()  # l1 1, kl 1e-6, hinge GAN (disc_weight 0.5, adaptive)
    cfg.objective.disc_start = 1000 if demo else 50_000
    cfg.objective.disc.channels = 32 if demo else 64
    # Perceptual (LPIPS) term: off; to use it set perceptual_weight (e.g. 1.0) and
    # perceptual_path to a .npz/.safetensors of VGG16 (+ LPIPS heads). Nothing is downloaded.
    # --- end cfg.objective ---
    cfg.ema_decay = 0.0
    # Images and 5-frame clips of the embedded synthetic scenes (prepared on first use).
    res = 64 if demo else 256
    cfg.data = ml_collections.ConfigDict(dict(
        kind="frames",
        data_dir="runs/data",
        sources=[
            dict(name="synthetic_scenes", config=str(res), weight=1.0),
            dict(name="synthetic_scenes", config=f"clips5_{res}", weight=0.25),
        ],
        image_size=res,
        global_batch=8 if demo else 256,
        seed=0,
        read_threads=2,
        prefetch=4,
    ))
    return cfg
