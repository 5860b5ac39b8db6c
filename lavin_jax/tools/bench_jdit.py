"""J-DiT benchmark: train step (forward + backward + AdamW) and 20-point Euler + CFG sampling.

  python -m lavin_jax.tools.bench jdit --config configs/lavin_dit.py:bench \
      --batch 2 --context_frames 9 --latent 16x16 --dtype bf16

``--dtype bf16`` computes in bfloat16 with f32 parameters and optimizer state. FLOPs are analytic
(matmuls + attention, x3 for a train step: see :func:`analytic_flops`); the peak is a large
``jnp.dot`` in the same precision timed in the same run. A human summary comes first, then one
JSON object on the last line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lavin_jax import flow, hostmem
from lavin_jax.models.jdit import JDiT, JDiTConfig, num_params

_SHAPE_FLAGS = {"hidden": "hidden_size", "depth": "depth", "heads": "num_heads",
                "kv_group": "kv_group", "channels": "in_channels", "patch": "patch_size"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench jdit", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/lavin_dit.py:bench",
                   help="config file and variant, FILE:VARIANT")
    for flag in _SHAPE_FLAGS:
        p.add_argument(f"--{flag}", type=int, default=None, help="override model." + flag)
    p.add_argument("--batch", type=int, default=2)
    hostmem.add_flag(p)
    p.add_argument("--context_frames", type=int, default=9, help="cond frames (pairs + query)")
    p.add_argument("--target_frames", type=int, default=1)
    p.add_argument("--latent", default="16x16", help="latent HxW")
    p.add_argument("--dtype", choices=("f32", "bf16"), default="f32",
                   help="compute dtype; parameters and optimizer state stay f32")
    p.add_argument("--steps", type=int, default=5, help="timed train steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed train steps after compile")
    p.add_argument("--sample_reps", type=int, default=3, help="timed sampling runs")
    p.add_argument("--num_steps", type=int, default=20, help="sampler time points")
    p.add_argument("--cfg_scale", type=float, default=1.5)
    p.add_argument("--remat", default=None, help="override model.remat_policy")
    p.add_argument("--scan_layers", type=int, default=None, help="override model.scan_layers")
    p.add_argument("--backend", default=None, help="override model.attention_backend")
    p.add_argument("--peak_size", type=int, default=2048, help="square matmul size for the peak")
    p.add_argument("--skip_sample", action="store_true")
    return p.parse_args(argv)


def load_config(spec: str):
    """'path/to/file.py:VARIANT' -> the file's get_config(VARIANT)."""
    path, _, variant = spec.partition(":")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isfile(path) and os.path.isfile(os.path.join(repo, path)):
        path = os.path.join(repo, path)  # a repo-relative path works from any directory
    if not os.path.isfile(path):
        raise SystemExit(f"--config: no file {path!r}; pass e.g. configs/lavin_dit.py:bench")
    mod_spec = importlib.util.spec_from_file_location("_bench_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(variant) if variant else mod.get_config()


def model_config(args: argparse.Namespace) -> JDiTConfig:
    m = dict(load_config(args.config).model)
    for flag, key in _SHAPE_FLAGS.items():
        if getattr(args, flag) is not None:
            m[key] = getattr(args, flag)
    m["dtype"] = "bfloat16" if args.dtype == "bf16" else "float32"
    m["param_dtype"] = "float32"
    if args.remat is not None:
        m["remat_policy"] = args.remat
    if args.scan_layers is not None:
        m["scan_layers"] = bool(args.scan_layers)
    if args.backend is not None:
        m["attention_backend"] = args.backend
    return JDiTConfig.from_config(m)


def analytic_flops(cfg: JDiTConfig, batch: int, tc: int, tx: int, tokens_per_frame: int) -> float:
    """Forward FLOPs of one packed call: 2 * matmul MACs per token + 4 L^2 D attention per layer.

    Per-example work (timestep MLP, adaLN modulation) is counted too; norms, softmax and other
    elementwise ops are not. The last block's condition-stream output projection and MLP are
    left out: nothing reads them, so XLA removes them. A train step is taken as 3x the forward.
    """
    d, m, p = cfg.hidden_size, cfg.mlp_dim, cfg.token_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    lc, lx = tc * tokens_per_frame, tx * tokens_per_frame
    per_tok_layer = 2 * (d * d + 2 * d * kv + d * d + 3 * d * m)  # q, k, v, o, SwiGLU
    layer = (lc + lx) * per_tok_layer + 4 * (lc + lx) ** 2 * d
    per_example = 2 * (cfg.freq_dim * d + d * d + cfg.depth * 2 * d * 4 * d + d * d)
    dead = lc * 2 * (d * d + 3 * d * m)
    total = cfg.depth * layer - dead + 2 * (lc + lx) * p * d + per_example
    return float(batch * total)


def _median_time(fn, reps: int) -> tuple[float, float]:
    """Median (wall s, process CPU s) of ``reps`` calls. CPU seconds count all threads; on a
    shared host they are the figure that load doesn't inflate."""
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def matmul_peak(dtype: jnp.dtype, n: int, reps: int = 5) -> float:
    """FLOP/s of an n x n x n jnp.dot in ``dtype`` accumulating in f32."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, b))
    return 2.0 * n**3 / _median_time(lambda: f(a, b), reps)[0]


def make_train_step(graphdef, tx):
    def loss_fn(params, x, cond, rng):
        model = nnx.merge(graphdef, params)
        return flow.training_loss(model, x, cond, rng)

    def step(params, opt_state, x, cond, rng):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, cond, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def main(argv: list[str]) -> dict:
    args = parse_args(argv[1:])
    hostmem.configure(args.host_malloc)  # before the backend starts
    cfg = model_config(args)
    h, _, w = args.latent.partition("x")
    if not (h.isdigit() and w.isdigit()):
        raise SystemExit(f"--latent={args.latent!r}: use HxW, e.g. 16x16")
    h, w = int(h), int(w)
    b, tc, tx, c = args.batch, args.context_frames, args.target_frames, cfg.in_channels
    compute = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32

    with nnx.use_eager_sharding(False):
        model = JDiT(cfg, rngs=nnx.Rngs(0))
    n_params = num_params(model)
    graphdef, params = nnx.split(model, nnx.Param)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (b, tx, h, w, c), jnp.float32)
    cond = jax.random.normal(keys[1], (b, tc, h, w, c), jnp.float32)

    # Train step: donated params + AdamW state.
    tx_opt = optax.adamw(1e-4, weight_decay=0.0)
    opt_state = tx_opt.init(params)
    step = make_train_step(graphdef, tx_opt)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, x, cond, keys[2]).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float((cost or {}).get("flops", -1.0))
    state = [params, opt_state]

    def run_step(i=[0]):  # noqa: B006 - a counter for fresh rngs
        i[0] += 1
        state[0], state[1], loss = compiled(state[0], state[1], x, cond,
                                            jax.random.fold_in(keys[2], i[0]))
        return loss

    for _ in range(args.warmup):
        jax.block_until_ready(run_step())
    train_s, train_cpu = _median_time(run_step, args.steps)
    loss = float(run_step())

    tpf = (h // cfg.patch_size) * (w // cfg.patch_size)
    fwd = analytic_flops(cfg, b, tc, tx, tpf)
    train_flops = 3.0 * fwd

    result = dict(
        config=args.config, dtype=args.dtype, batch=b, context_frames=tc, target_frames=tx,
        latent=f"{h}x{w}", hidden=cfg.hidden_size, depth=cfg.depth, heads=cfg.num_heads,
        kv_group=cfg.kv_group, patch=cfg.patch_size, channels=c, params=n_params,
        tokens_per_row=(tc + tx) * tpf, remat=cfg.remat_policy, backend=cfg.attention_backend,
        compile_s=round(compile_s, 2), train_step_s=round(train_s, 4),
        train_step_cpu_s=round(train_cpu, 4), loss=round(loss, 4),
        train_flops=train_flops, flops_source="analytic (x3 forward)",
        xla_cost_analysis_flops=xla_flops,
    )

    if not args.skip_sample:
        sample_model = nnx.merge(graphdef, state[0])
        noise = jax.random.normal(keys[0], x.shape, jnp.float32)

        def sample():
            return flow.sample_ode(sample_model, noise, cond, cfg_scale=args.cfg_scale,
                                   num_steps=args.num_steps)

        t0 = time.perf_counter()
        jax.block_until_ready(sample())
        result["sample_compile_s"] = round(time.perf_counter() - t0, 2)
        sample_s, sample_cpu = _median_time(sample, args.sample_reps)
        per_step = analytic_flops(cfg, b, tc, tx, tpf)
        if args.cfg_scale != 1.0:  # the null branch: zero frame + query, its own 2-frame call
            per_step += analytic_flops(cfg, b, 2, tx, tpf)
        sample_flops = (args.num_steps - 1) * per_step
        result.update(sample_s=round(sample_s, 4), sample_cpu_s=round(sample_cpu, 4),
                      sample_flops=sample_flops,
                      sample_flops_per_s=sample_flops / sample_s)

    peak = matmul_peak(compute, args.peak_size)
    result.update(
        flops_per_s=train_flops / train_s, peak_flops_per_s=peak,
        peak_fraction=round(train_flops / train_s / peak, 3),
        peak_what=f"jnp.dot {args.peak_size}^3 {args.dtype} (f32 accumulate)",
        device=jax.devices()[0].device_kind, jax=jax.__version__,
    )
    if "sample_s" in result:
        result["sample_peak_fraction"] = round(result["sample_flops_per_s"] / peak, 3)

    print(f"J-DiT {cfg.hidden_size}x{cfg.depth} ({n_params / 1e6:.2f}M params), B={b}, "
          f"{tc}+{tx} frames of {h}x{w}, {args.dtype}, remat={cfg.remat_policy}")
    print(f"  train step  {train_s * 1e3:8.1f} ms  {train_flops / train_s / 1e9:7.1f} GFLOP/s "
          f"({result['peak_fraction']:.0%} of peak {peak / 1e9:.1f})  compile {compile_s:.1f} s")
    if "sample_s" in result:
        print(f"  sampling    {result['sample_s'] * 1e3:8.1f} ms  "
              f"{result['sample_flops_per_s'] / 1e9:7.1f} GFLOP/s "
              f"({result['sample_peak_fraction']:.0%} of peak), {args.num_steps} points, "
              f"cfg {args.cfg_scale}")
    print(json.dumps({k: (float(v) if isinstance(v, np.floating) else v)
                      for k, v in result.items()}))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv)
