"""ST-VAE benchmark: encode / decode frames per second and peak memory.

  python -m lavin_jax.tools.bench stvae --config configs/stvae.py:release

Cases (``--cases``): ``image`` (T=1 at --size px), ``clip`` (T=--frames at --size px),
``tiled`` (T=1 at --tiled_size px, untiled and tiled with --tile px tiles). Each runs for every
``--dtypes`` entry (compute dtype; parameters stay f32). Executables are compiled ahead of time
(compile time reported apart), then run --warmup untimed and --reps timed times (median).
Peak memory per executable is XLA's memory_analysis (arguments + outputs + temporaries; for
tiled runs the largest tile); the process peak RSS is reported once. Weights are random (speed
does not depend on them). Each timing is given as wall seconds and process CPU seconds (all
threads; comparable across runs on a shared host). A human summary comes first, then one JSON
object on the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lavin_jax import hostmem
from lavin_jax.models import stvae_tiling
from lavin_jax.models.stvae import STVAE, STVAEConfig
from lavin_jax.tools.bench_jdit import load_config

CASES = ("image", "clip", "tiled")
GIB = 2.0**30


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench stvae", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/stvae.py:release", help="FILE:VARIANT")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {CASES}")
    p.add_argument("--dtypes", default="f32,bf16", help="comma list of f32, bf16")
    p.add_argument("--size", type=int, default=256, help="image / clip side in pixels")
    p.add_argument("--frames", type=int, default=17, help="clip frames (1 + 4k)")
    p.add_argument("--tiled_size", type=int, default=512, help="side of the tiled case")
    p.add_argument("--tile", type=int, default=256, help="spatial tile in pixels (tiled case)")
    p.add_argument("--batch", type=int, default=1)
    hostmem.add_flag(p)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    p.add_argument("--reps", type=int, default=2, help="timed runs (median reported)")
    return p.parse_args(argv)


def _mem_gib(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return -1.0
    used = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return round((used - m.alias_size_in_bytes) / GIB, 3)


class Runner:
    """AOT-compiled encoder / decoder calls, one executable per input shape."""

    def __init__(self, model: STVAE):
        self.model = model
        self.enc_def, self.enc_state = nnx.split(model.encoder)
        self.dec_def, self.dec_state = nnx.split(model.decoder)
        lat = model.cfg.latent_channels
        self._jit = {
            "encode": jax.jit(lambda s, x: nnx.merge(self.enc_def, s)(x)[..., :lat]),
            "decode": jax.jit(lambda s, z: nnx.merge(self.dec_def, s)(z)),
        }
        self.compiled: dict[tuple, object] = {}
        self.used: set[tuple] = set()  # executables called since the last clear()
        self.compile_s = 0.0

    def get(self, kind: str, shape: tuple[int, ...], dtype) -> Callable:
        key = (kind, shape)
        if key not in self.compiled:
            state = self.enc_state if kind == "encode" else self.dec_state
            t0 = time.perf_counter()
            self.compiled[key] = self._jit[kind].lower(
                state, jax.ShapeDtypeStruct(shape, dtype)).compile()
            self.compile_s += time.perf_counter() - t0
        self.used.add(key)
        return self.compiled[key]

    def dry_fn(self, kind: str) -> Callable[[jax.Array], jax.Array]:
        """Compiles for each shape it sees and returns zeros of the output's shape (to compile
        every tile shape, and the eager seam ops, before timing a tiled run)."""
        state = self.enc_state if kind == "encode" else self.dec_state

        def f(a):
            self.get(kind, tuple(a.shape), a.dtype)
            out = jax.eval_shape(self._jit[kind], state, a)
            return jnp.zeros(out.shape, out.dtype)

        return f

    def fn(self, kind: str) -> Callable[[jax.Array], jax.Array]:
        state = self.enc_state if kind == "encode" else self.dec_state
        return lambda a: self.get(kind, tuple(a.shape), a.dtype)(state, a)


def _time(fn: Callable[[], jax.Array], warmup: int, reps: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) per run. CPU seconds (all threads) stay
    meaningful on a shared, loaded host where wall time does not."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    walls, cpus = [], []
    for _ in range(max(reps, 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def _entry(frames: int, seconds: tuple[float, float], mem: float) -> dict:
    wall, cpu = seconds
    return dict(seconds=round(wall, 3), frames_per_s=round(frames / wall, 4),
                cpu_seconds=round(cpu, 3), peak_gib=mem)


def bench_dense(runner: Runner, args, t: int, size: int) -> dict:
    """Untiled encode + decode of [batch, t, size, size, 3]."""
    cfg = runner.model.cfg
    x = jax.random.uniform(jax.random.key(0), (args.batch, t, size, size, 3), jnp.float32,
                           -1.0, 1.0)
    z = jnp.zeros((args.batch,) + cfg.latent_shape(t, size, size), jnp.float32)
    out = {}
    for kind, inp in (("encode", x), ("decode", z)):
        f = runner.fn(kind)
        compiled = runner.get(kind, tuple(inp.shape), inp.dtype)
        sec = _time(lambda f=f, inp=inp: f(inp), args.warmup, args.reps)
        out[kind] = _entry(args.batch * t, sec, _mem_gib(compiled))
    return out


def bench_tiled(runner: Runner, args) -> dict:
    """Tiled encode + decode of a [batch, 1, tiled_size, tiled_size, 3] image."""
    cfg = dataclasses.replace(runner.model.cfg, tile_sample_size=args.tile)
    cfg.validate()
    s = args.tiled_size
    x = jax.random.uniform(jax.random.key(0), (args.batch, 1, s, s, 3), jnp.float32, -1.0, 1.0)
    z = jnp.zeros((args.batch,) + cfg.latent_shape(1, s, s), jnp.float32)
    kw = dict(frames=cfg.tile_sample_frames, overlap=cfg.tile_overlap,
              spatial=cfg.spatial_compression)
    runs = {
        "encode": (x, lambda f, a: stvae_tiling.tiled_encode(f, a, tile=cfg.tile_sample_size,
                                                             **kw)),
        "decode": (z, lambda f, a: stvae_tiling.tiled_decode(
            f, a, tile=cfg.tile_latent_size, frames=cfg.tile_latent_frames,
            overlap=cfg.tile_overlap, spatial=cfg.spatial_compression)),
    }
    out = {}
    for kind, (inp, tiled) in runs.items():
        tiled(runner.dry_fn(kind), inp)
        f = runner.fn(kind)
        runner.used.clear()
        sec = _time(lambda f=f, inp=inp, tiled=tiled: tiled(f, inp), args.warmup, args.reps)
        mem = max(_mem_gib(runner.compiled[k]) for k in runner.used)
        out[kind] = _entry(args.batch, sec, mem)
    return out


def main(argv: list[str]) -> dict:
    args = parse_args(argv[1:])
    hostmem.configure(args.host_malloc)  # before the backend starts
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise SystemExit(f"--cases: unknown {bad}; use {CASES}")
    dtypes = {"f32": "float32", "bf16": "bfloat16"}
    if any(d not in dtypes for d in args.dtypes.split(",")):
        raise SystemExit(f"--dtypes={args.dtypes!r}: use a comma list of f32, bf16")
    base = STVAEConfig.from_config(load_config(args.config).model)
    if (args.frames - 1) % base.temporal_compression_ratio:
        raise SystemExit(f"--frames={args.frames} must be 1 + a multiple of "
                         f"{base.temporal_compression_ratio}")
    results: dict = dict(config=args.config, backend=jax.default_backend(),
                         device=str(jax.devices()[0].device_kind), batch=args.batch,
                         size=args.size, frames=args.frames, tiled_size=args.tiled_size,
                         tile=args.tile, warmup=args.warmup, reps=args.reps)
    for dname in args.dtypes.split(","):
        cfg = dataclasses.replace(base, dtype=dtypes[dname], param_dtype="float32")
        with nnx.use_eager_sharding(False):
            model = STVAE(cfg, rngs=nnx.Rngs(0))
        runner = Runner(model)
        res = {}
        if "image" in cases:
            res["image"] = bench_dense(runner, args, 1, args.size)
        if "clip" in cases:
            res["clip"] = bench_dense(runner, args, args.frames, args.size)
        if "tiled" in cases:
            res["untiled_big"] = bench_dense(runner, args, 1, args.tiled_size)
            res["tiled_big"] = bench_tiled(runner, args)
        res["compile_s"] = round(runner.compile_s, 1)
        results[dname] = res
        for case, r in res.items():
            if isinstance(r, dict):
                print(f"{dname:5s} {case:12s} " + "  ".join(
                    f"{k}: {v['frames_per_s']:.3f} frames/s ({v['seconds']:.2f} s wall, "
                    f"{v['cpu_seconds']:.1f} s CPU, {v['peak_gib']:.2f} GiB)"
                    for k, v in r.items()), flush=True)
    results["process_peak_rss_gib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)
    print(json.dumps(results))
    return results
