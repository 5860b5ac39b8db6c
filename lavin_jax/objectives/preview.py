"""Helpers for the sample grids objectives return from ``visualize(modules, batch, step)``.

The trainer calls ``visualize`` on every process at the same step (lavin_jax/train.py writes the
uint8 [H, W, 3] result to TensorBoard and DIR/samples/). To be multi-host safe an objective:
takes the rows to show from process 0 (:func:`first_rows` broadcasts them), runs its jitted work
on every process with replicated inputs (:func:`replicate`) and a replicated output (every
process can read it), and draws only on process 0 (others return :data:`PLACEHOLDER`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lavin_jax import sharding

log = logging.getLogger(__name__)

PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)  # what processes > 0 return
MAX_TILE = 128  # px: tiles are resized to one square size (mixed resolutions in one grid)
FALSE_COLOUR_RANGE = 2.5  # normalised latents in [-r, r] map to [0, 255]


def from_process0(tree: Any) -> Any:
    """Process 0's value of a numpy tree, on every process (a collective: all must call)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def first_rows(batch: dict[str, Any], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` rows of process 0's local batch, as numpy, on every process."""
    return from_process0({k: np.asarray(v[:n]) for k, v in batch.items()})


def module_mesh(module: nnx.Module) -> Mesh | None:
    """The mesh the module's (sharded) parameters live on, or None for plain arrays."""
    for x in jax.tree.leaves(nnx.state(module)):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Numpy leaves (equal on every process) -> global arrays replicated over ``mesh``."""
    if mesh is None:
        return jax.tree.map(np.asarray, tree)
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 (rounded, clipped)."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def false_colour(z: np.ndarray, upsample: int = 1) -> np.ndarray:
    """Normalised latents [..., h, w, C] -> uint8 [..., h*u, w*u, 3] from the first 3 channels
    (fewer channels repeat), a fixed range so prediction and truth compare."""
    z = np.asarray(z, np.float32)
    z = z[..., [min(i, z.shape[-1] - 1) for i in range(3)]]
    img = to_uint8(z / FALSE_COLOUR_RANGE)
    if upsample > 1:
        img = np.repeat(np.repeat(img, upsample, axis=-3), upsample, axis=-2)
    return img


def grid(rows: Sequence[Sequence[np.ndarray | None]]) -> np.ndarray:
    """uint8 tiles (None = blank) in rows -> one image; tiles resized to one square size (the
    largest tile side, at most MAX_TILE) with sample.make_grid's black gaps."""
    from lavin_jax.data.episodes import resize_frames
    from lavin_jax.sample import make_grid

    tiles = [t for r in rows for t in r if t is not None]
    if not tiles:
        return PLACEHOLDER
    size = min(MAX_TILE, max(max(t.shape[:2]) for t in tiles))
    blank = np.zeros((size, size, 3), np.uint8)
    fit = lambda t: blank if t is None else resize_frames(np.asarray(t)[None], (size, size))[0]
    return make_grid([[fit(t) for t in r] for r in rows])


def local_device():
    """Context for work on this process's first device (the frozen ST-VAE lives there): a
    1-device mesh turns the trainer's activation constraints (sharding.constrain) off."""
    devices = np.asarray(jax.local_devices()[:1]).reshape((1,) * len(sharding.MESH_AXES))
    return sharding.use_rules(Mesh(devices, sharding.MESH_AXES), ())


class LatentDecoder:
    """Normalised latent frames [n, h, w, C] -> uint8 pixels [n, H, W, 3] with the frozen ST-VAE
    of ``path`` (loaded once, on first use, on the default device), or false colour when no
    usable checkpoint is configured (one logged note, never an error)."""

    def __init__(self, path: str, vae: nnx.Module | None = None):
        self.path, self.vae, self._codec, self._tried = str(path or ""), vae, None, vae is not None

    def _load(self) -> None:
        self._tried = True
        if not self.path or self.path == "toy":
            log.info("sample grids: config.data.vae_checkpoint=%r names no ST-VAE; latents are "
                     "shown in false colour (first 3 channels)", self.path)
            return
        if not epath.Path(self.path).exists():
            log.warning("sample grids: config.data.vae_checkpoint=%s does not exist; latents "
                        "are shown in false colour", self.path)
            return
        try:
            from lavin_jax import checkpoint

            self.vae = checkpoint.load_model(self.path, "stvae")
        except Exception as e:  # noqa: BLE001 - a preview never stops training
            log.warning("sample grids: cannot load the ST-VAE from %s (%s); latents are shown "
                        "in false colour", self.path, e)

    @property
    def available(self) -> bool:
        if not self._tried:
            self._load()
        return self.vae is not None

    def latent_frames(self, frames: int) -> int | None:
        """Latent frames of a ``frames``-frame item (None when unknown: no VAE)."""
        if self.available:
            return self.vae.cfg.latent_shape(frames, 8, 8)[0]
        return 1 if frames == 1 else None

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, np.float32)
        if not self.available or z.shape[-1] != self.vae.cfg.latent_channels:
            return false_colour(z, upsample=4)
        if self._codec is None:
            from lavin_jax.sample import Codec

            self._codec = Codec(self.vae)
        # One latent frame decodes to one pixel frame (causal in time: the exact first frame
        # of its item). Chunks of 8: one compiled shape per latent size.
        with local_device():
            return self._codec.decode(z[:, None], batch=8)[:, 0]


def decode_groups(decode: LatentDecoder, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Decodes latent frames [h, w, C] of mixed sizes, batching equal sizes together."""
    out: list[Any] = [None] * len(frames)
    by_shape: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        by_shape.setdefault(tuple(f.shape), []).append(i)
    for idx in by_shape.values():
        pixels = decode(np.stack([frames[i] for i in idx]))
        for i, p in zip(idx, pixels):
            out[i] = p
    return out
