"""Per-process batch iterators for the trainer, chosen by ``config.data.kind``.

Every iterator yields this process's slice of the global batch as a dict of numpy arrays and has
``get_state()`` / ``set_state()`` (JSON-able) so the trainer checkpoints it with the run, plus a
``bad_records`` counter.

- ``episodes``: Grain pipeline of task episodes packed into J-DiT rows (lavin_jax/data/pipeline).
- ``frames``:  RGB frames/clips in [-1, 1] for the ST-VAE (lavin_jax/data/frames).
- ``synthetic``: deterministic random batches of the right shapes, for benchmarks and for tests
  of the training loop itself (kill-and-resume, multi-process); no learning signal.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from lavin_jax import packing


class SyntheticBatches:
    """Random batches, row ``i`` of batch ``index`` keyed by (seed, index, i): exactly
    reproducible from the state, and the global batch is the same for any process count
    (process ``p`` yields global rows ``p * rows ... (p + 1) * rows - 1``)."""

    def __init__(self, cfg: ml_collections.ConfigDict, make_batch):
        self.seed = int(cfg.data.get("seed", cfg.seed))
        self.rows = int(cfg.data.global_batch) // jax.process_count()
        self.make_batch = make_batch
        self.index = 0
        self.bad_records = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        first = jax.process_index() * self.rows
        rows = [self.make_batch(np.random.default_rng((self.seed, self.index, first + i)), 1)
                for i in range(self.rows)]
        self.index += 1
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def synthetic_packed(cfg: ml_collections.ConfigDict):
    """Rows of ``episodes_per_row`` equal episodes: ``cond_frames`` cond + 1 target frame."""
    d, m = cfg.data, cfg.model
    rows_tok = (d.latent_size // m.patch_size) ** 2
    per_row = int(d.get("episodes_per_row", 1))
    tc = int(d.get("cond_frames", 3))
    feat = m.patch_size**2 * m.in_channels
    side = d.latent_size // m.patch_size
    cpos = np.tile(packing.grid_positions(tc, side, side), (per_row, 1))
    xpos = np.tile(packing.grid_positions(1, side, side, tc), (per_row, 1))
    cseg = np.repeat(np.arange(1, per_row + 1), tc * rows_tok).astype(np.int32)
    xseg = np.repeat(np.arange(1, per_row + 1), rows_tok).astype(np.int32)

    def make(rng: np.random.Generator, b: int) -> dict[str, np.ndarray]:
        return {
            "cond": rng.standard_normal((b, len(cseg), feat), np.float32),
            "x": rng.standard_normal((b, len(xseg), feat), np.float32),
            "cond_pos": np.broadcast_to(cpos, (b, *cpos.shape)).copy(),
            "x_pos": np.broadcast_to(xpos, (b, *xpos.shape)).copy(),
            "cond_seg": np.broadcast_to(cseg, (b, len(cseg))).copy(),
            "x_seg": np.broadcast_to(xseg, (b, len(xseg))).copy(),
            "t": np.zeros((b, per_row), np.float32),
        }

    return make


def synthetic_frames(cfg: ml_collections.ConfigDict):
    d = cfg.data
    shape = (int(d.get("frames", 1)), int(d.image_size), int(d.image_size), 3)

    def make(rng: np.random.Generator, b: int) -> dict[str, np.ndarray]:
        return {"video": rng.uniform(-1, 1, (b, *shape)).astype(np.float32)}

    return make


def make_iterator(cfg: ml_collections.ConfigDict, objective=None):
    """The per-process batch iterator for ``cfg.data.kind``."""
    kind = cfg.data.kind
    if kind == "synthetic":
        make = synthetic_frames(cfg) if cfg.objective.name == "vae" else synthetic_packed(cfg)
        return SyntheticBatches(cfg, make)
    if kind == "episodes":
        from lavin_jax.data import pipeline

        return pipeline.make_train_iterator(cfg)
    if kind == "frames":
        from lavin_jax.data import frames

        return frames.make_frames_iterator(cfg)
    raise ValueError(f"config.data.kind={kind!r}; use 'episodes', 'frames' or 'synthetic'")
