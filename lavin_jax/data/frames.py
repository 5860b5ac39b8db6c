"""The ST-VAE's input pipeline: RGB images and clips in [-1, 1] as [B, T, H, W, 3] batches.

``config.data.sources`` lists {name, config, weight} entries (registered sources, e.g.
synthetic_scenes images "64" and clips "clips5_64", photos); an entry's optional ``tasks``
(task names) makes it yield, per record, the RGB frames or one task's rendered input/target
(depth maps, skeletons, boxes...) at random, so the VAE also learns what the J-DiT must draw.
Per source (Grain):
prepare on first use -> shuffle(seed) -> this process's slice [p::P] -> repeat -> decode + crop
to ``image_size`` (bad records -> dropped and counted) -> batch; the per-source batches are mixed
by weight (a batch never mixes image and clip shapes). The iterator's state is exact and
JSON-able, saved with every run checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from lavin_jax.data.episodes import resize_frames

log = logging.getLogger(__name__)


class BadRecordCounter:
    """Counts records dropped by a map; shared by the datasets of one iterator."""

    def __init__(self):
        self.count = 0


def example_frames(example: Mapping[str, Any]) -> np.ndarray:
    """A source example -> uint8 frames [T, H, W, 3] (images are T = 1)."""
    if "frames" in example:
        frames = np.asarray(example["frames"])
    elif "image" in example:
        frames = np.asarray(example["image"])[None]
    else:
        raise KeyError(f"example has neither 'image' nor 'frames' (keys: {sorted(example)})")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames of shape {frames.shape}, expected [T, H, W, 3]")
    return frames


def to_model_frames(frames: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random square crop (the whole clip shares it), resize to ``size``, map to [-1, 1]."""
    _, h, w, _ = frames.shape
    side = min(h, w)
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = frames[:, y:y + side, x:x + side]
    if side != size:
        crop = resize_frames(crop, (size, size))
    out = crop.astype(np.float32) / 127.5 - 1.0
    if not np.isfinite(out).all():
        raise ValueError("non-finite pixels")
    return out


def _source_dataset(entry: Mapping[str, Any], d: ml_collections.ConfigDict, seed: int,
                    pi: int, pc: int, bad: BadRecordCounter, source: Sequence[Any] | None):
    if source is None:
        from lavin_jax.data import prepare

        prepare.ensure_prepared(entry["name"], d.data_dir, entry.get("config") or None)
        source = prepare.load_source(entry["name"], d.data_dir, d.get("split", "train"),
                                     entry.get("config") or None)
    size = int(d.image_size)
    ds = grain.MapDataset.source(source).seed(seed).shuffle()[pi::pc].repeat()
    from lavin_jax.data.tasks import get_task

    tasks = [get_task(t) for t in entry.get("tasks") or ()]

    def decode(i: int, example: Any):
        try:
            rng = np.random.default_rng((seed, pi, i))
            frames = example_frames(example)
            k = int(rng.integers(len(tasks) + 1)) if tasks else 0
            if k:  # one task's rendered input or target instead of the RGB frames
                inputs, targets = tasks[k - 1].render(example, rng)
                frames = np.asarray(targets if rng.random() < 0.75 else inputs)
            return to_model_frames(frames, size, rng)
        except (KeyError, ValueError, TypeError) as e:
            bad.count += 1
            log.warning("skipping bad record %d of %s: %s", i, entry["name"], e)
            return None

    # Filtering and batching happen on the iterable side, where dropped records just vanish.
    ds = ds.map_with_index(decode).to_iter_dataset(grain.ReadOptions(
        num_threads=int(d.get("read_threads", 2)), prefetch_buffer_size=int(d.get("prefetch", 4))))
    return ds.filter(lambda x: x is not None)


class FramesIterator:
    """This process's [B/P, T, H, W, 3] batches ({"video": ...}) with exact JSON-able state."""

    def __init__(self, ds: grain.IterDataset, fingerprint: str, bad: BadRecordCounter):
        self._it, self._fp, self._bad = iter(ds), fingerprint, bad

    def __iter__(self) -> FramesIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {"video": next(self._it)}

    @property
    def bad_records(self) -> int:
        return self._bad.count

    def get_state(self) -> dict[str, Any]:
        return {"fingerprint": self._fp, "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fp:
            raise ValueError("data-iterator state was saved by a different pipeline "
                             "(config.data or process layout changed); use the same config")
        self._it.set_state(state["grain"])


def make_frames_iterator(cfg: ml_collections.ConfigDict, *, process_index: int | None = None,
                         process_count: int | None = None,
                         sources: Mapping[str, Sequence[Any]] | None = None) -> FramesIterator:
    """Per-process batches of frames for the VAE objective. ``sources`` (name -> examples)
    replaces prepared datasets in tests."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    d = cfg.data
    rows = int(d.global_batch)
    if rows % process_count:
        raise ValueError(f"config.data.global_batch={rows} must be a multiple of the "
                         f"{process_count} processes")
    bad = BadRecordCounter()
    entries = [dict(e) for e in d.sources]
    if not entries:
        raise ValueError("config.data.sources is empty; list at least one {name, weight}")
    batched = []
    for k, e in enumerate(entries):
        src = None if sources is None else sources[e["name"]]
        ds = _source_dataset(e, d, int(d.seed) + 1000 * k, process_index, process_count, bad, src)
        batched.append(ds.batch(rows // process_count, drop_remainder=True))
    weights = [float(e.get("weight", 1.0)) for e in entries]
    it_ds = batched[0] if len(batched) == 1 else grain.IterDataset.mix(batched, weights)
    blob = json.dumps({"data": d.to_dict(), "p": [process_index, process_count]},
                      sort_keys=True, default=str)
    return FramesIterator(it_ds, hashlib.sha1(blob.encode()).hexdigest()[:16], bad)
