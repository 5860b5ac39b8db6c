"""Episode latents: encoders, the latent cache (ArrayRecord shards) and the cache job.

    python -m lavin_jax.encode --config configs/lavin_dit.py:demo --workdir runs/demo \
        [--num_episodes N] [--cache_dir DIR]

renders episodes 0..N-1 (lavin_jax/data/episodes.py), encodes every item (each context input and
target, the query input and target) separately with the frozen ST-VAE (``config.data.
vae_checkpoint``; images as T = 1, the reference's inference) and writes one record per episode:
its normalised posterior-mean latents (``cond`` = items but the last, concatenated in frame order;
``target`` = the query's target) plus task and pairing metadata. Process p of P writes episodes
p, p + P, ... to ``latents-p-of-P.array_record``; each process encodes on all its local devices.
Training (lavin_jax/data/pipeline.py, ``data.mode = "cache"``) reads the shards back.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

log = logging.getLogger(__name__)

CACHE_META = "cache.json"
CACHE_FORMAT = 1


def shard_name(process_index: int, process_count: int) -> str:
    return f"latents-{process_index:05d}-of-{process_count:05d}.array_record"


# ------------------------------------------------------------------------------------------
# Encoders: uint8 frames [n, T, H, W, 3] -> normalised latents [n, T', h, w, C] float32.


def _latent_frames(t: int, levels: int) -> int:
    for _ in range(levels):  # the ST-VAE's causal temporal halving (see STVAEConfig)
        t = t // 2 + 1 if t % 2 else t // 2
    return t


class ToyEncoder:
    """A fixed, cheap stand-in for the ST-VAE with the same latent geometry (tests, benchmarks):
    frames subsampled in time, average-pooled in space, projected 3 -> C channels."""

    def __init__(self, spatial: int = 4, temporal_levels: int = 2, channels: int = 8,
                 seed: int = 0):
        self.spatial, self.levels, self.channels = spatial, temporal_levels, channels
        self.proj = np.random.default_rng(seed).standard_normal((3, channels)).astype(np.float32)

    def latent_shape(self, t: int, h: int, w: int) -> tuple[int, int, int, int]:
        return _latent_frames(t, self.levels), h // self.spatial, w // self.spatial, self.channels

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        n, t, h, w, _ = frames.shape
        lt, lh, lw, _ = self.latent_shape(t, h, w)
        idx = np.linspace(0, t - 1, lt).round().astype(int)
        s = self.spatial
        x = frames[:, idx, : lh * s, : lw * s].astype(np.float32) / 127.5 - 1.0
        x = x.reshape(n, lt, lh, s, lw, s, 3).mean((3, 5))
        return np.tanh(x @ self.proj).astype(np.float32)


class VaeEncoder:
    """The frozen ST-VAE's normalised posterior mean, jitted, batch split over local devices."""

    def __init__(self, vae: Any, chunk: int = 32):
        import jax
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.vae = vae
        self.channels = vae.cfg.latent_channels
        graphdef, state = nnx.split(vae)
        self._devices = jax.local_devices()
        self.chunk = -(-chunk // len(self._devices)) * len(self._devices)
        mesh = Mesh(np.asarray(self._devices), ("batch",))
        self._sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))

        @jax.jit
        def enc(state, x):
            model = nnx.merge(graphdef, state)
            mean, _ = model.encode(x.astype(np.float32) / 127.5 - 1.0)
            return model.normalize(mean)

        self._enc = enc

    def latent_shape(self, t: int, h: int, w: int) -> tuple[int, int, int, int]:
        return self.vae.cfg.latent_shape(t, h, w)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        import jax

        # Fixed-size chunks (padded): one compiled program per item shape.
        n, c = frames.shape[0], self.chunk
        pad = np.zeros((-n % c, *frames.shape[1:]), frames.dtype)
        x = np.concatenate([frames, pad])
        out = [np.asarray(self._enc(self._state, jax.device_put(x[i:i + c], self._sharding)))
               for i in range(0, len(x), c)]
        return np.concatenate(out)[:n]


def load_encoder(cfg) -> Any:
    """The encoder ``config.data`` names: ``vae_checkpoint`` (a lavin_jax.checkpoint params
    directory holding "stvae"), or ``vae_checkpoint = "toy"`` for the ToyEncoder."""
    path = str(cfg.data.get("vae_checkpoint", "") or "")
    if path == "toy":
        return ToyEncoder(channels=int(cfg.model.in_channels))
    if not path:
        raise ValueError("config.data.vae_checkpoint is empty: point it at a trained ST-VAE "
                         "checkpoint directory (or 'toy' for the test stand-in encoder)")
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"config.data.vae_checkpoint={path!r} does not exist; train the "
                                f"ST-VAE first or fix the path")
    from lavin_jax import checkpoint

    vae = checkpoint.load_model(path, "stvae")
    if vae.cfg.latent_channels != int(cfg.model.in_channels):
        raise ValueError(f"ST-VAE {path} has {vae.cfg.latent_channels} latent channels but "
                         f"config.model.in_channels={cfg.model.in_channels}")
    return VaeEncoder(vae)


def encode_items(encoder: Callable, episodes: Sequence[Sequence[np.ndarray]]
                 ) -> list[list[np.ndarray]]:
    """Encodes every item of several episodes, batching items of equal shape together."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for e, items in enumerate(episodes):
        for i, it in enumerate(items):
            groups.setdefault(it.shape, []).append((e, i))
    out: list[list[Any]] = [[None] * len(items) for items in episodes]
    for where in groups.values():
        z = encoder(np.stack([episodes[e][i] for e, i in where]))
        for (e, i), zi in zip(where, z):
            out[e][i] = zi
    return out


def latent_episode(latents: Sequence[np.ndarray]) -> dict[str, Any]:
    """Item latents [in_1, tgt_1, ..., query_in, query_tgt] -> cond / target / query_frames."""
    return {
        "cond": np.concatenate(latents[:-1], axis=0),
        "target": latents[-1],
        "query_frames": int(latents[-2].shape[0]),
    }


def null_context(cond: np.ndarray, query_frames: int) -> np.ndarray:
    """The CFG null context (flow.null_context): one all-zero frame, then the query frames."""
    q = cond[cond.shape[0] - query_frames:]
    return np.concatenate([np.zeros_like(q[:1]), q], axis=0)


# ------------------------------------------------------------------------------------------
# Records.


def to_record(spec, examples: Sequence[int], ep: dict[str, Any], dtype: str = "float16") -> bytes:
    from flax import serialization

    return serialization.msgpack_serialize({
        "format": CACHE_FORMAT, "index": spec.index, "task": spec.task, "task_id": spec.task_id,
        "source": spec.source, "n_pairs": spec.n_pairs, "resolution": list(spec.resolution),
        "examples": [int(e) for e in examples], "query_frames": ep["query_frames"],
        "cond": np.asarray(ep["cond"], dtype), "target": np.asarray(ep["target"], dtype),
    })


class BadRecord(ValueError):
    """A cache record that cannot be used; ``reason`` is the counter's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def from_record(data: bytes, channels: int, patch: int) -> dict[str, Any]:
    """Decodes and validates one record (raises BadRecord: undecodable, shape, non_finite)."""
    from flax import serialization

    try:
        r = serialization.msgpack_restore(bytes(data))
        cond, target = np.asarray(r["cond"], np.float32), np.asarray(r["target"], np.float32)
        qf = int(r["query_frames"])
        meta = {k: int(r[k]) for k in ("index", "task_id", "n_pairs")}
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad record
        raise BadRecord("undecodable", f"undecodable record ({type(e).__name__}: {e})") from e
    if (cond.ndim != 4 or target.ndim != 4 or cond.shape[1:] != target.shape[1:]
            or cond.shape[-1] != channels or cond.shape[1] % patch or cond.shape[2] % patch
            or not 0 < qf < cond.shape[0] or target.shape[0] < 1):
        raise BadRecord("bad_shape", f"record {meta['index']}: cond {cond.shape}, target "
                        f"{target.shape}, query_frames {qf} (want [T,h,w,{channels}], h, w "
                        f"multiples of {patch})")
    if not (np.isfinite(cond).all() and np.isfinite(target).all()):
        raise BadRecord("non_finite", f"record {meta['index']}: non-finite latents")
    return {"cond": cond, "target": target, "query_frames": qf, **meta}


def local_dir(path: str | os.PathLike, field: str = "config.data.cache_dir") -> pathlib.Path:
    """``path`` as a local directory. A URL (``gs://...``) is an error naming ``field``:
    open-source ArrayRecord (riegeli) opens local files only, so a cache there could be neither
    written nor read (pathlib would quietly make a local ``gs:`` folder instead)."""
    if "://" in str(path):
        raise ValueError(f"{field}={str(path)!r} is a URL, but the latent cache is ArrayRecord "
                         "files, which open-source ArrayRecord reads and writes on local paths "
                         "only: use a local disk or a gcsfuse mount of the bucket")
    return pathlib.Path(path)


def cache_files(cache_dir: str | os.PathLike) -> list[str]:
    d = local_dir(cache_dir)
    files = sorted(str(p) for p in d.glob("latents-*-of-*.array_record"))
    if not files:
        raise FileNotFoundError(
            f"no latent cache in {d}: run `python -m lavin_jax.encode --config ... --workdir ...` "
            f"(or set config.data.mode='online')")
    return files


def read_cache_meta(cache_dir: str | os.PathLike) -> dict[str, Any]:
    p = local_dir(cache_dir) / CACHE_META
    return json.loads(p.read_text()) if p.exists() else {}


# ------------------------------------------------------------------------------------------
# The cache job.


def write_cache(cfg, cache_dir: str | os.PathLike, encoder: Callable, num_episodes: int, *,
                process_index: int = 0, process_count: int = 1, chunk: int = 16,
                sources=None) -> dict:
    """Renders, encodes and writes this process's episodes; returns {"episodes", "seconds"}.
    ``sources`` ({name: examples}) replaces opening the configured sources (tests)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from lavin_jax.data import pipeline

    cache = local_dir(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    data = cfg.data
    sampler, sources, tasks = pipeline.episode_sources(cfg, sources)
    mine = list(range(process_index, num_episodes, process_count))
    out = cache / shard_name(process_index, process_count)
    tmp = out.with_suffix(".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    t0 = time.time()
    threads = max(1, int(data.get("read_threads", 2)))
    dtype = str(data.get("cache_dtype", "float16"))

    def render(i: int):
        spec = sampler.spec(i)
        return spec, pipeline.render_spec(spec, tasks, sources)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(mine), chunk):
            rendered = list(pool.map(render, mine[start:start + chunk]))
            lat = encode_items(encoder, [r["items"] for _, r in rendered])
            for (spec, r), z in zip(rendered, lat):
                writer.write(to_record(spec, r["examples"], latent_episode(z), dtype))
            log.info("encoded %d/%d episodes (%.1f s)", min(start + chunk, len(mine)),
                     len(mine), time.time() - t0)
    writer.close()
    tmp.rename(out)
    if process_index == 0:
        meta = {"format": CACHE_FORMAT, "num_episodes": num_episodes, "seed": int(data.seed),
                "tasks": list(dict(data.tasks)), "latent_channels": int(cfg.model.in_channels),
                "process_count": process_count, "dtype": dtype,
                "vae_checkpoint": str(data.get("vae_checkpoint", ""))}
        (cache / CACHE_META).write_text(json.dumps(meta, indent=1))
    return {"episodes": len(mine), "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lavin_jax.encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="FILE.py:VARIANT (configs/lavin_dit.py:demo)")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--num_episodes", type=int, default=None,
                   help="default: config.data.cache_episodes")
    p.add_argument("--cache_dir", default=None,
                   help="default: config.data.cache_dir, else WORKDIR/latents")
    p.add_argument("--vae_checkpoint", default=None,
                   help="default: config.data.vae_checkpoint ('toy': the test stand-in)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import jax

    from lavin_jax.tools.bench_jdit import load_config

    cfg = load_config(args.config)
    if args.vae_checkpoint is not None:
        cfg.data.vae_checkpoint = args.vae_checkpoint
    n = args.num_episodes or int(cfg.data.cache_episodes)
    cache_dir, field = args.cache_dir, "--cache_dir"
    if not cache_dir and cfg.data.get("cache_dir"):
        cache_dir, field = cfg.data.cache_dir, "config.data.cache_dir"
    if not cache_dir:
        cache_dir = os.path.join(args.workdir, "latents")
        field = "--cache_dir (default WORKDIR/latents)"
    try:
        local_dir(cache_dir, field)  # before loading the encoder
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    res = write_cache(cfg, cache_dir, load_encoder(cfg), n, process_index=jax.process_index(),
                      process_count=jax.process_count())
    print(json.dumps({"cache_dir": str(cache_dir), **res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
