"""Input-pipeline benchmark: packing efficiency vs pad-to-max, and episodes/s vs what training eats.

  python -m lavin_jax.tools.bench pipeline --config configs/lavin_dit.py:demo

1. Packing: the (cond, target) token counts of ``--episodes`` episode specs of the configured
   mixture (VAE geometry, context dropout included) packed into [Lc] + [Lx] rows by the packer;
   pad-to-max puts one episode per row padded to the mixture's largest episode. Also prints the
   best Lx for this Lc (packer.suggest_target_len).
2. Pipeline: writes a small latent cache (``--cache_episodes``; the configured ST-VAE, or a
   randomly initialised one of ``--vae`` when ``data.vae_checkpoint`` is empty: same compute),
   then times the training input pipeline (``data.mode = "cache"``: read, decode, dropout,
   pack, batch) -> ``episodes_per_s``; the cache job's rate (render + encode + write) too.
3. Train: the demo J-DiT's train step (flow.packed_loss grad + AdamW, jitted) on real packed
   batches -> ``train_episodes_per_s`` = rows x episodes/row x steps/s.
A human summary first, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time

import numpy as np

from lavin_jax import encode
from lavin_jax.data import packer, pipeline
from lavin_jax.tools.bench_jdit import load_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/lavin_dit.py:demo")
    p.add_argument("--data_dir", default=None, help="default: config.data.data_dir")
    p.add_argument("--vae", default="configs/stvae.py:demo",
                   help="ST-VAE config for a random-init encoder when no checkpoint is set")
    p.add_argument("--episodes", type=int, default=3000, help="specs in the packing simulation")
    p.add_argument("--cache_episodes", type=int, default=160)
    p.add_argument("--cache_dir", default=None, help="default: a temporary directory")
    p.add_argument("--batches", type=int, default=30, help="timed pipeline batches")
    p.add_argument("--train_steps", type=int, default=3, help="timed train steps (median)")
    p.add_argument("--skip_train", action="store_true")
    return p.parse_args(argv)


def make_encoder(cfg, vae_spec: str):
    if cfg.data.get("vae_checkpoint"):
        return encode.load_encoder(cfg), f"checkpoint {cfg.data.vae_checkpoint}"
    from flax import nnx

    from lavin_jax.models.stvae import STVAE, STVAEConfig

    vcfg = STVAEConfig.from_config(load_config(vae_spec).model)
    with nnx.use_eager_sharding(False):
        vae = STVAE(vcfg, rngs=nnx.Rngs(0))
    return encode.VaeEncoder(vae), f"random-init {vae_spec}"


def packing_figures(cfg, sampler, tasks, latent_shape, n: int) -> dict:
    d, patch = cfg.data, int(cfg.model.patch_size)
    drop = float(cfg.flow.context_dropout)
    spec = pipeline.row_spec(cfg)
    sizes = pipeline.spec_sizes(sampler, tasks, latent_shape, patch, drop, range(n))
    fit = [s for s in sizes if spec.fits(*s)]
    eff = packer.efficiency(packer.plan_rows(fit, spec, int(d.lookahead)), spec)
    max_nc, max_nx = pipeline.largest_episode(sampler, tasks, latent_shape, patch)
    lx, lx_eff = packer.suggest_target_len(sizes[:1500], spec.cond_len, spec.max_segments,
                                           int(d.lookahead), step=4)
    return {
        **{k: round(float(v), 4) for k, v in eff.items()},
        "pad_to_max_efficiency": round(packer.pad_to_max_efficiency(sizes, max_nc, max_nx), 4),
        "pad_to_max_row": [max_nc, max_nx],
        "too_long": len(sizes) - len(fit),
        "suggested_target_len": lx, "suggested_efficiency": round(lx_eff, 4),
    }


def time_pipeline(cfg, n_batches: int) -> tuple[float, dict, list]:
    it = pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    batches = [next(it)]  # start-up (opening shards, filling the look-ahead) not timed
    eps0 = it.stats()["episodes"]
    t0 = time.perf_counter()
    for _ in range(n_batches):
        batches.append(next(it))
    dt = time.perf_counter() - t0
    st = it.stats()
    it.close()
    return (st["episodes"] - eps0) / dt, st, batches


def time_train(cfg, batches: list, steps: int) -> float:
    """Median seconds of the demo train step on real packed batches."""
    import jax
    import optax
    from flax import nnx

    from lavin_jax import flow, packing
    from lavin_jax.models.jdit import JDiT, JDiTConfig

    with nnx.use_eager_sharding(False):
        model = JDiT(JDiTConfig.from_config(cfg.model), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-4)

    @jax.jit
    def step(params, opt_state, batch, rng):
        def loss_fn(p):
            return flow.packed_loss(nnx.merge(graphdef, p), batch, rng)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    packed = [packing.Packed(**{k: b[k] for k in packing.Packed._fields}) for b in batches]
    opt_state = tx.init(params)
    params, opt_state, loss = step(params, opt_state, packed[0], jax.random.key(0))  # compile
    jax.block_until_ready(loss)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, packed[(i + 1) % len(packed)],
                                       jax.random.key(i + 1))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str]) -> dict:
    args = parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.config)
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    sampler, sources, tasks = pipeline.episode_sources(cfg)
    enc, enc_name = make_encoder(cfg, args.vae)
    pack = packing_figures(cfg, sampler, tasks, enc.latent_shape, args.episodes)
    print(f"packing ({args.episodes} episodes, Lc={cfg.data.cond_len}, Lx={cfg.data.target_len})"
          f": {pack['packing_efficiency']:.4f} real tokens (cond {pack['cond_efficiency']:.4f}, "
          f"target {pack['target_efficiency']:.4f}); pad-to-max {pack['pad_to_max_efficiency']:.4f}"
          f"; best Lx for this Lc: {pack['suggested_target_len']}")

    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="lavin_cache_")
    for res in sampler.resolutions:  # compile outside the timing
        enc(np.zeros((1, 1, *res, 3), np.uint8))
    job = encode.write_cache(cfg, cache_dir, enc, args.cache_episodes, sources=sources)
    cache_eps = job["episodes"] / job["seconds"]
    print(f"cache job ({enc_name}): {cache_eps:.2f} episodes/s")

    cfg.data.mode, cfg.data.cache_dir = "cache", cache_dir
    eps, st, batches = time_pipeline(cfg, args.batches)
    if args.cache_dir is None:
        shutil.rmtree(cache_dir)
    print(f"training pipeline (cache): {eps:.1f} episodes/s, live packing "
          f"{st['packing_efficiency']:.4f}, {st['episodes_per_row']:.2f} episodes/row")

    result = {
        "config": args.config, "encoder": enc_name, "cond_len": int(cfg.data.cond_len),
        "target_len": int(cfg.data.target_len), "global_batch": int(cfg.data.global_batch),
        **pack, "pipeline_packing_efficiency": round(st["packing_efficiency"], 4),
        "episodes_per_s": round(eps, 2), "cache_job_episodes_per_s": round(cache_eps, 3),
        "bad_records": st["bad_records"],
    }
    if not args.skip_train:
        step_s = time_train(cfg, batches, args.train_steps)
        train_eps = int(cfg.data.global_batch) * st["episodes_per_row"] / step_s
        result.update(train_step_s=round(step_s, 3), train_episodes_per_s=round(train_eps, 3),
                      pipeline_over_train=round(eps / train_eps, 1))
        print(f"demo train step: {step_s:.2f} s -> {train_eps:.2f} episodes/s; the pipeline "
              f"delivers {eps / train_eps:.0f}x that")
    print(json.dumps(result))
    return result
