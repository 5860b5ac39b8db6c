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

    cfg.model = ml_collections.ConfigDict(dict(
        name="jdit",
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        kv_group=kv_group,
        patch_size=2,
        in_channels=8 if arg == "demo" else 16,
        attention_backend="xla",  # xla | cudnn | splash
        remat_policy="none" if arg in ("demo", "bench") else "full",
        param_dtype="float32",
        dtype="float32" if arg in ("demo", "bench") else "bfloat16",
    ))
    cfg.flow = ml_collections.ConfigDict(dict(
        time_shift=1.0,  # t' = t / (t + s (1 - t)); 1 = the release
        l1_weight=0.1,  # released loss: MSE + 0.1 * L1 per example
        context_dropout=0.1,  # probability of the CFG null context
    ))
    cfg.objective.name = "flow"
    cfg.optim = optim.default_config(
        lr=3e-4 if arg == "demo" else 1e-4, warmup_steps=100 if arg == "demo" else 2000,
        weight_decay=0.0, schedule="constant", grad_clip=1.0)
    cfg.ema_decay = 0.999 if arg == "demo" else 0.9999
    cfg.sample = ml_collections.ConfigDict(dict(
        num_steps=20, grid="official", method="euler", cfg_scale=1.5, shift=1.0,
    ))
    return cfg
