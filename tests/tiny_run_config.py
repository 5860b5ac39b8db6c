"""A tiny J-DiT run on synthetic rows: ``--config=tests/tiny_run_config.py:TOTAL_STEPS``.

The training tests use it in-process (test_train.tiny_config) and through the train binary
(test_multiprocess.py): 8 packed rows of 2 episodes (3 cond + 1 target frame of 4x4 tokens).
"""

import ml_collections

from configs import lavin_dit


def get_config(arg: str = "4") -> ml_collections.ConfigDict:
    cfg = lavin_dit.get_config("demo")
    # Everything the tests rely on is pinned here (the demo variant's tuning may change).
    cfg.model.update(hidden_size=48, depth=2, num_heads=4, kv_group=2, in_channels=4,
                     scan_layers=True, dtype="float32", param_dtype="float32")
    cfg.data = ml_collections.ConfigDict(dict(
        kind="synthetic", global_batch=8, latent_size=8, cond_frames=3, episodes_per_row=2))
    cfg.total_steps = int(arg)
    cfg.checkpoint_every_steps = 2
    cfg.log_every_steps = 2
    cfg.eval_every_steps = 0  # no in-training eval (it needs a trained ST-VAE)
    cfg.optim.update(lr=3e-4, warmup_steps=0, schedule="constant", weight_decay=0.0,
                     grad_clip=1.0)
    cfg.ema_decay = 0.999
    cfg.flow.update(time_shift=1.0, l1_weight=0.1, context_dropout=0.1)
    return cfg
