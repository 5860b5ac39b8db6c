"""Copy probe: how fast a J-DiT config learns to carry the query's layout into the target.

  python -m lavin_jax.tools.bench copy --config configs/lavin_dit.py:demo --steps 300 \
      [--config.model.embed_bias_init=0.0] [--config.optim.lr=3e-3]

Every in-context task needs the target token at (row, col) to read the query token at the same
(row, col) through joint attention, while the target tokens are still noise. The probe isolates
that skill: spatially smooth random latents, one context pair (a, a) and the query q, target q
(the identity task). The config's model, optimizer (lr, warmup, clipping) and training-t
distribution train on fresh batches; every ``--probe_every`` steps the one-step prediction from
pure noise, x1_hat = x0 + v(x0, t=0, cond), is scored against q on a fixed held-out batch
(mean squared error; predicting zeros scores mean(q^2)). Minutes on a CPU, so shapes, inits and
optimisers can be screened before a demo-length run. A human line per probe, then one JSON object
on the last line: {one_step_mse: [[step, mse], ...], zero_mse, final_mse, steps, seconds}.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lavin_jax import flow, optim
from lavin_jax.models.jdit import JDiT, JDiTConfig
from lavin_jax.tools.bench_jdit import load_config
from lavin_jax.tools.bench_train import apply_overrides, parse_with_overrides


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    p = argparse.ArgumentParser(
        prog="bench copy", description=__doc__.splitlines()[0],
        epilog="--config.KEY=VALUE overrides any config key (Python literals, else strings).")
    p.add_argument("--config", default="configs/lavin_dit.py:demo", help="FILE:VARIANT")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch", type=int, default=8, help="episodes per step")
    p.add_argument("--latent", type=int, default=16, help="latent side (square)")
    p.add_argument("--smooth", type=int, default=4, help="latent side / random-field side")
    p.add_argument("--probe_every", type=int, default=50)
    args, overrides = parse_with_overrides(p, argv)
    if args.latent % args.smooth:
        p.error(f"--latent={args.latent} must be a multiple of --smooth={args.smooth}")
    return args, overrides


def smooth_latents(rng: jax.Array, n: int, side: int, channels: int, smooth: int) -> jax.Array:
    """Gaussian fields bilinearly upsampled by ``smooth`` (x1.5 restores about the unit variance
    the interpolation removes, like normalised VAE latents): [n, side, side, C]."""
    z = jax.random.normal(rng, (n, side // smooth, side // smooth, channels))
    return jax.image.resize(z, (n, side, side, channels), "linear") * 1.5


def copy_batch(rng: jax.Array, args, channels: int) -> tuple[jax.Array, jax.Array]:
    """(x [B, 1, h, w, C] = the query, cond [B, 3, h, w, C] = pair (a, a) + query)."""
    ka, kq = jax.random.split(rng)
    a = smooth_latents(ka, args.batch, args.latent, channels, args.smooth)
    q = smooth_latents(kq, args.batch, args.latent, channels, args.smooth)
    return q[:, None], jnp.stack([a, a, q], axis=1)


def run(args, cfg) -> dict:
    mcfg = JDiTConfig.from_config(cfg.model)
    time_dist = flow.TimeDist.from_config(cfg.flow)
    l1 = float(cfg.flow.get("l1_weight", 0.1))
    with nnx.use_eager_sharding(False):
        model = JDiT(mcfg, rngs=nnx.Rngs(int(cfg.seed)))
    opt = nnx.Optimizer(model, optim.make_optimizer(cfg.optim), wrt=nnx.Param)
    c = mcfg.in_channels

    @nnx.jit
    def train_step(model, opt, rng):
        x, cond = copy_batch(rng, args, c)
        loss_fn = lambda m: flow.training_loss(  # noqa: E731
            m, x, cond, jax.random.fold_in(rng, 1), time_dist=time_dist, l1_weight=l1)[0]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def probe(model, rng):
        x, cond = copy_batch(rng, args, c)
        x0 = jax.random.normal(jax.random.fold_in(rng, 7), x.shape)
        v = model(x0, jnp.zeros((x.shape[0],)), cond)
        return jnp.mean((x0 + v - x) ** 2), jnp.mean(x ** 2)

    held_out = jax.random.key(10**6)  # training batches use keys 0..steps-1
    curve, zero = [], None
    t0 = time.time()
    for i in range(args.steps + 1):
        if i % args.probe_every == 0 or i == args.steps:
            err, base = probe(model, held_out)
            curve.append([i, round(float(err), 4)])
            zero = round(float(base), 4)
            print(f"step {i}: one-step mse from noise {float(err):.3f} (predicting zeros "
                  f"{zero:.3f}), {time.time() - t0:.0f} s", flush=True)
        if i < args.steps:
            train_step(model, opt, jax.random.key(i))
    return {"one_step_mse": curve, "zero_mse": zero, "final_mse": curve[-1][1],
            "steps": args.steps, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv[1:])
    cfg = load_config(args.config)
    apply_overrides(cfg, overrides)
    print(json.dumps(run(args, cfg)))


if __name__ == "__main__":
    import sys

    main(sys.argv)
