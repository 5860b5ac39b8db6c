"""The Grain input pipeline: episodes -> packed J-DiT rows -> per-process batches.

Per process (``process_index`` of ``process_count``) it builds one MapDataset of episodes, the
stream, whose element at position ``pos`` is a packable item (packer.episode_item) or a
``{"bad": reason}`` marker:

  mode "cache":  ArrayRecord shards of the latent cache (lavin_jax/encode.py) -> shuffle(seed)
                 -> this process's slice [p::P] (disjoint) -> repeat (reshuffled each epoch);
                 several caches (``data.cache_dir`` = [(dir, weight), ...]) are mixed by weight.
  mode "render": episode indices p, p + P, ... -> render (episodes.py) -> encode on the host
                 with the given encoder (small runs, tests; the cache job uses the same path).
  mode "online": like "render" but packs pixels; the train step encodes (data/online.py).

Context dropout (CFG) is drawn per stream position and applied before packing. Then:
to_iter_dataset (read threads) -> optional mp_prefetch (``data.workers`` processes) ->
PackIterDataset (look-ahead best-fill; drops and counts bad records) -> batch(rows per process)
-> thread prefetch (``data.prefetch``). :class:`TrainIterator` wraps it for the trainer:
``next()`` is this process's numpy batch (packing.Packed field names + seg_task/seg_episode),
``get_state()/set_state()`` are JSON-able and exact (also with worker processes), and
``bad_records`` is the skip counter the trainer logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from lavin_jax.data import episodes, packer

log = logging.getLogger(__name__)

STREAM_LEN = 2**62  # render mode: episode indices are unbounded


def row_spec(cfg: ml_collections.ConfigDict) -> packer.RowSpec:
    d, m = cfg.data, cfg.model
    spec = packer.RowSpec(int(d.cond_len), int(d.target_len), int(d.max_segments),
                          int(m.patch_size) ** 2 * int(m.in_channels))
    spec.validate()
    return spec


def episode_sources(cfg: ml_collections.ConfigDict,
                    sources: Mapping[str, Sequence[Any]] | None = None):
    """(EpisodeSampler, {source name: random-access examples}, [Task] by task id).

    ``sources`` given (tests: in-memory lists) replaces opening the configured ones; otherwise
    each source is prepared on first use in ``data.data_dir`` and its ``data.split`` opened.
    """
    entries = episodes.task_entries(cfg.data)
    if sources is None:
        from lavin_jax.data import prepare

        sources = {}
        for name in sorted({e.source for e in entries}):
            prepare.ensure_prepared(name, cfg.data.data_dir)
            sources[name] = prepare.load_source(name, cfg.data.data_dir, cfg.data.split)
    sizes = {k: len(v) for k, v in sources.items()}
    sampler = episodes.EpisodeSampler.from_config(cfg.data, sizes)
    return sampler, dict(sources), [e.make() for e in entries]


def render_spec(spec: episodes.EpisodeSpec, tasks: Sequence[Any],
                sources: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    return episodes.render_episode(spec, tasks[spec.task_id], sources[spec.source])


def spec_sizes(sampler: episodes.EpisodeSampler, tasks: Sequence[Any],
               latent_shape: Callable, patch: int, dropout: float, indices: Sequence[int],
               seed: int = 0) -> list[tuple[int, int]]:
    """(cond, target) token counts of episodes from their specs alone (no rendering)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in indices:
        s = sampler.spec(i)
        h, w = s.resolution
        frames = [latent_shape(t, h, w)[0] for t in episodes.item_frames(tasks[s.task_id],
                                                                        s.n_pairs)]
        lh, lw = latent_shape(1, h, w)[1:3]
        tpf = (lh // patch) * (lw // patch)
        cond = 1 + frames[-2] if rng.random() < dropout else sum(frames[:-1])
        out.append((cond * tpf, frames[-1] * tpf))
    return out


def largest_episode(sampler: episodes.EpisodeSampler, tasks: Sequence[Any],
                    latent_shape: Callable, patch: int) -> tuple[int, int]:
    """The most (cond, target) tokens one episode of the mixture can have (max pairs)."""
    big = []
    for t in tasks:
        for h, w in sampler.resolutions:
            frames = [latent_shape(f, h, w)[0] for f in episodes.item_frames(t, sampler.max_pairs)]
            lh, lw = latent_shape(1, h, w)[1:3]
            tpf = (lh // patch) * (lw // patch)
            big.append((sum(frames[:-1]) * tpf, frames[-1] * tpf))
    return max(b[0] for b in big), max(b[1] for b in big)


def check_fits(cfg, sampler, tasks, latent_shape) -> None:
    """A clear error when the mixture's largest episode cannot fit an empty row."""
    nc, nx = largest_episode(sampler, tasks, latent_shape, int(cfg.model.patch_size))
    spec = row_spec(cfg)
    if not spec.fits(nc, nx):
        raise ValueError(f"the largest episode of config.data's mixture has {nc} cond + {nx} "
                         f"target tokens but rows hold data.cond_len={spec.cond_len} + "
                         f"data.target_len={spec.target_len}: raise them or lower the pairs "
                         f"or resolutions")


# ------------------------------------------------------------------------------------------
# Stream elements.


def _bad(pos: int, reason: str, detail: str) -> dict[str, Any]:
    return {"bad": reason, "detail": detail, "pos": int(pos)}


def make_item(ep: Mapping[str, Any], pos: int, drop: bool, patch: int) -> dict[str, Any]:
    """A decoded latent episode -> packable item (context dropout applied when ``drop``)."""
    from lavin_jax.encode import null_context

    cond = null_context(ep["cond"], ep["query_frames"]) if drop else ep["cond"]
    meta = {k: ep[k] for k in ("task_id", "index", "n_pairs")}
    return packer.episode_item(cond, ep["target"], patch, pos=pos, **meta)


def _dropped(seed: int, salt: int, pos: int, prob: float) -> bool:
    return prob > 0 and np.random.default_rng([seed, 0xD0, salt, pos]).random() < prob


def cache_stream(cfg, process_index: int, process_count: int) -> grain.MapDataset:
    from lavin_jax.encode import BadRecord, cache_files, from_record, read_cache_meta

    d = cfg.data
    dirs = d.cache_dir
    if isinstance(dirs, str):
        if not dirs:
            raise ValueError("config.data.cache_dir is empty: name the latent cache written by "
                             "`python -m lavin_jax.encode` (or set config.data.mode='online')")
        dirs = [(dirs, 1.0)]
    dirs = list(dict(dirs).items()) if hasattr(dirs, "items") else [tuple(x) for x in dirs]
    want_tasks = list(dict(d.tasks))
    parts, weights = [], []
    for k, (cache_dir, weight) in enumerate(dirs):
        meta = read_cache_meta(cache_dir)
        if meta.get("vae_checkpoint") == "toy":
            log.warning("latent cache %s was written by the ToyEncoder (tests only)", cache_dir)
        if meta and meta.get("tasks") != want_tasks:
            raise ValueError(f"latent cache {cache_dir} was written for tasks {meta['tasks']} "
                             f"but config.data.tasks is {want_tasks}; re-run the cache job")
        src = grain.sources.ArrayRecordDataSource(cache_files(cache_dir))
        if len(src) < process_count:
            raise ValueError(f"latent cache {cache_dir} has {len(src)} episodes for "
                             f"{process_count} processes")
        ds = grain.MapDataset.source(src).shuffle(seed=int(d.seed) + k)
        parts.append(ds[process_index::process_count].repeat())
        weights.append(float(weight))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    channels, patch = int(cfg.model.in_channels), int(cfg.model.patch_size)
    seed, prob = int(d.seed), float(cfg.flow.context_dropout)

    def read(pos: int, raw: bytes) -> dict[str, Any]:
        try:
            ep = from_record(raw, channels, patch)
        except BadRecord as e:
            return _bad(pos, e.reason, str(e))
        return make_item(ep, pos, _dropped(seed, process_index, pos, prob), patch)

    return ds.map_with_index(read)


def render_stream(cfg, process_index: int, process_count: int, encoder: Callable,
                  sources: Mapping[str, Sequence[Any]] | None = None) -> grain.MapDataset:
    from lavin_jax.encode import encode_items, latent_episode

    sampler, sources, tasks = episode_sources(cfg, sources)
    check_fits(cfg, sampler, tasks, encoder.latent_shape)
    patch = int(cfg.model.patch_size)
    channels = int(cfg.model.in_channels)
    seed, prob = int(cfg.data.seed), float(cfg.flow.context_dropout)

    def make(pos: int, index: int) -> dict[str, Any]:
        try:
            spec = sampler.spec(index)
            r = render_spec(spec, tasks, sources)
            ep = latent_episode(encode_items(encoder, [r["items"]])[0])
        except Exception as e:  # noqa: BLE001 - an unreadable example is skipped and counted
            log.warning("episode %d: rendering failed: %r", index, e)
            return _bad(pos, "render_error", f"episode {index}: {type(e).__name__}: {e}")
        if ep["cond"].shape[-1] != channels:
            return _bad(pos, "bad_shape", f"episode {index}: latents {ep['cond'].shape}")
        if not (np.isfinite(ep["cond"]).all() and np.isfinite(ep["target"]).all()):
            return _bad(pos, "non_finite", f"episode {index}: non-finite latents")
        ep.update(index=index, task_id=spec.task_id, n_pairs=spec.n_pairs)
        return make_item(ep, pos, _dropped(seed, 0, index, prob), patch)

    ds = grain.MapDataset.range(process_index, STREAM_LEN, process_count)
    return ds.map_with_index(make)


def online_stream(cfg, process_index: int, process_count: int, latent_shape: Callable,
                  sources: Mapping[str, Sequence[Any]] | None = None):
    """Mode "online": rendered pixel items (data/online.py); returns (stream, assembler)."""
    from lavin_jax.data import online

    sampler, sources, tasks = episode_sources(cfg, sources)
    video = sorted({t.name for t in tasks if tuple(t.frames) != (1, 1)})
    if video:
        raise ValueError(f"config.data.mode='online' takes image tasks only; {video} have "
                         f"multi-frame items: use the latent cache (mode='cache')")
    check_fits(cfg, sampler, tasks, latent_shape)
    patch = int(cfg.model.patch_size)
    seed, prob = int(cfg.data.seed), float(cfg.flow.context_dropout)
    res_k = {r: k for k, r in enumerate(sampler.resolutions)}

    def make(pos: int, index: int) -> dict[str, Any]:
        try:
            spec = sampler.spec(index)
            r = render_spec(spec, tasks, sources)
        except Exception as e:  # noqa: BLE001 - an unreadable example is skipped and counted
            log.warning("episode %d: rendering failed: %r", index, e)
            return _bad(pos, "render_error", f"episode {index}: {type(e).__name__}: {e}")
        return online.pixel_item(r["items"], res_k[spec.resolution], latent_shape, patch,
                                 _dropped(seed, 0, index, prob), pos=pos, index=index,
                                 task_id=spec.task_id, n_pairs=spec.n_pairs)

    tpf = [online.tokens_per_frame(latent_shape, r, patch) for r in sampler.resolutions]
    assemble = online.OnlineAssembler(row_spec(cfg), sampler.resolutions, tpf)
    ds = grain.MapDataset.range(process_index, STREAM_LEN, process_count)
    return ds.map_with_index(make), assemble


def vae_latent_shape(cfg) -> Callable:
    """The configured ST-VAE's latent_shape, from its checkpoint's stored config."""
    from lavin_jax import checkpoint
    from lavin_jax.models.stvae import STVAEConfig

    path = str(cfg.data.get("vae_checkpoint", "") or "")
    if not path:
        raise ValueError("config.data.mode='online' needs config.data.vae_checkpoint (the "
                         "frozen ST-VAE the train step encodes with)")
    return STVAEConfig.from_config(checkpoint.load_metadata(path)["configs"]["stvae"]).latent_shape


# ------------------------------------------------------------------------------------------
# The iterator the trainer uses.


def fingerprint(cfg, process_index: int, process_count: int) -> str:
    """What a saved iterator state depends on; a restore into a different pipeline fails."""
    d = cfg.data
    keys = ("mode", "tasks", "task_options", "sources", "pairs", "resolutions",
            "resolution_weights", "cond_len", "target_len", "max_segments", "lookahead",
            "global_batch", "seed", "workers", "cache_dir", "split")
    blob = {k: (d.get(k).to_dict() if hasattr(d.get(k), "to_dict") else d.get(k)) for k in keys}
    blob.update(process=[process_index, process_count], dropout=cfg.flow.context_dropout)
    return hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrainIterator:
    """This process's packed batches with exact, JSON-able state (see the module docstring)."""

    def __init__(self, ds: grain.IterDataset, fingerprint: str):
        self._fp = fingerprint
        self._it = iter(ds)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def _packer(self) -> packer.PackIterator | None:
        todo = [self._it]
        while todo:
            it = todo.pop()
            if isinstance(it, packer.PackIterator):
                return it
            todo.extend(getattr(it, "_parents", ()))
        return None

    @property
    def bad_records(self) -> int:
        p = self._packer()
        return p.bad_records if p is not None else 0

    def stats(self) -> dict[str, float]:
        p = self._packer()
        return p.stats() if p is not None else {}

    def get_state(self) -> dict[str, Any]:
        return {"fingerprint": self._fp, "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fp:
            raise ValueError("data-iterator state was saved by a different pipeline (config.data, "
                             "dropout or process layout changed); restore with the same config")
        self._it.set_state(state["grain"])

    def close(self) -> None:
        self._it.close()


def make_train_iterator(cfg: ml_collections.ConfigDict, *, process_index: int | None = None,
                        process_count: int | None = None, encoder: Callable | None = None,
                        sources: Mapping[str, Sequence[Any]] | None = None) -> TrainIterator:
    """The trainer's per-process iterator of packed local batches [global_batch / P rows].

    ``process_index/count`` default to jax's. ``encoder`` (mode "render"; default: the
    configured VAE, encode.load_encoder; mode "online" takes only its latent_shape) and
    ``sources`` (in-memory sources) serve tests.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    d = cfg.data
    rows = int(d.global_batch)
    if rows % process_count:
        raise ValueError(f"config.data.global_batch={rows} must be a multiple of the "
                         f"{process_count} processes")
    spec = row_spec(cfg)
    mode = str(d.get("mode", "cache"))
    assemble = None
    if mode == "cache":
        stream = cache_stream(cfg, process_index, process_count)
    elif mode == "render":
        if encoder is None:
            from lavin_jax.encode import load_encoder

            encoder = load_encoder(cfg)
        stream = render_stream(cfg, process_index, process_count, encoder, sources)
    elif mode == "online":
        shape = encoder.latent_shape if encoder is not None else vae_latent_shape(cfg)
        stream, assemble = online_stream(cfg, process_index, process_count, shape, sources)
    else:
        raise ValueError(f"config.data.mode={mode!r}; use 'cache', 'online' or 'render'")
    ds = stream.to_iter_dataset(grain.ReadOptions(
        num_threads=int(d.get("read_threads", 2)),
        prefetch_buffer_size=int(d.get("read_buffer", 16))))
    workers = int(d.get("workers", 0))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads absl flags in its workers
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=int(d.get("worker_buffer", 4))))
    ds = packer.PackIterDataset(ds, spec, int(d.lookahead), lookup=stream.__getitem__,
                                assemble=assemble)
    ds = ds.batch(rows // process_count, drop_remainder=True)
    if int(d.get("prefetch", 0)) > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(
            ds, prefetch_buffer_size=int(d.prefetch))
    return TrainIterator(ds, fingerprint(cfg, process_index, process_count))


def global_batches(it: TrainIterator, mesh, rules):
    """Yields each local batch assembled into global sharded arrays (sharding.shard_batch)."""
    from lavin_jax import sharding

    for batch in it:
        yield sharding.shard_batch(batch, mesh, rules)
