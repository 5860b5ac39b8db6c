"""A frozen VGG-style feature network read from a user-given file, and the LPIPS distance on it.

Nothing is downloaded: the user converts weights once (e.g. torchvision's VGG16 and the LPIPS
package's linear heads) into a ``.npz`` or ``.safetensors`` file with PyTorch names and layouts:

  features.{i}.weight [out, in, 3, 3], features.{i}.bias [out]   (torchvision VGG ``features``;
      ``net.slice{k}.{i}.*`` from an LPIPS state dict is read the same way)
  lin{k}.model.{j}.weight [1, C_k, 1, 1]                           (optional LPIPS heads)

e.g. ``np.savez(p, **{k: v.numpy() for k, v in sd.items()})``. The layer order and the max-pools
come from the indices: a gap of 3 between two conv indices (conv, relu, pool) starts a new stage,
and the features are tapped after each stage's last ReLU (relu1_2 .. relu5_3 for VGG16, as
LPIPS does). Without ``lin*`` heads every channel weighs 1 (LPIPS's ``lpips=False`` baseline).
Used as the VAE's perceptual loss and by evaluation as LPIPS.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# LPIPS's input scaling for images in [-1, 1].
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)

_CONV = re.compile(r"^(?:features|net\.slice\d+)\.(\d+)\.(weight|bias)$")
_LIN = re.compile(r"^lin(\d+)\.model\.\d+\.weight$")


def load_arrays(path: str, field: str = "perceptual path") -> dict[str, np.ndarray]:
    """Reads every array of a ``.npz`` or ``.safetensors`` file, with a clear error if missing."""
    if not path:
        raise ValueError(f"{field} is empty; give a .npz/.safetensors of VGG weights "
                         "(nothing is downloaded)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}={path!r} does not exist; give a .npz/.safetensors of "
                                "VGG weights (see lavin_jax/objectives/perceptual.py)")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    raise ValueError(f"{field}={path!r}: use a .npz or .safetensors file")


class FeatureNet:
    """Frozen conv trunk (+ optional LPIPS heads). Weights are constants, not trainable state.

    ``stages``: list of stages, each a list of (kernel [3, 3, in, out], bias [out]);
    ``lins``: None or one [C_k] weight vector per stage.
    """

    def __init__(self, stages: list[list[tuple[jax.Array, jax.Array]]],
                 lins: list[jax.Array] | None = None, dtype: jnp.dtype = jnp.float32):
        if lins is not None:
            widths = [s[-1][1].shape[0] for s in stages]
            got = [int(w.shape[0]) for w in lins]
            if got != widths:
                raise ValueError(f"LPIPS heads have widths {got} but the stages end with {widths}")
        self.stages, self.lins, self.dtype = stages, lins, dtype

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], dtype=jnp.float32,
                    where: str = "weights") -> FeatureNet:
        convs: dict[int, dict[str, np.ndarray]] = {}
        lins: dict[int, np.ndarray] = {}
        for k, v in arrays.items():
            if m := _CONV.match(k):
                convs.setdefault(int(m.group(1)), {})[m.group(2)] = v
            elif m := _LIN.match(k):
                lins[int(m.group(1))] = v
        if not convs:
            raise ValueError(f"{where}: no 'features.{{i}}.weight' arrays (torchvision VGG names)")
        stages: list[list] = [[]]
        prev = None
        for i in sorted(convs):
            if "weight" not in convs[i] or "bias" not in convs[i]:
                raise ValueError(f"{where}: conv {i} needs both .weight and .bias")
            w, b = convs[i]["weight"], convs[i]["bias"]
            if w.ndim != 4 or w.shape[2:] != (3, 3):
                raise ValueError(f"{where}: features.{i}.weight has shape {w.shape}; "
                                 "expected PyTorch [out, in, 3, 3]")
            if prev is not None and i - prev > 2:  # conv, relu, pool, conv: a new stage
                stages.append([])
            stages[-1].append((jnp.asarray(w.transpose(2, 3, 1, 0)), jnp.asarray(b)))
            prev = i
        heads = None
        if lins:
            if sorted(lins) != list(range(len(stages))):
                raise ValueError(f"{where}: LPIPS heads lin{sorted(lins)} but {len(stages)} "
                                 "stages")
            heads = [jnp.asarray(lins[k].reshape(-1)) for k in range(len(stages))]
        return cls(stages, heads, dtype)

    @classmethod
    def from_file(cls, path: str, field: str = "perceptual path", dtype=jnp.float32):
        return cls.from_arrays(load_arrays(path, field), dtype, where=f"{field}={path!r}")

    def place(self, mesh: Mesh) -> FeatureNet:
        """Replicates the weights on ``mesh`` once (not re-sent with every step)."""
        rep = NamedSharding(mesh, PartitionSpec())
        put = lambda a: jax.device_put(a, rep)
        stages = [[(put(w), put(b)) for w, b in s] for s in self.stages]
        lins = None if self.lins is None else [put(w) for w in self.lins]
        return FeatureNet(stages, lins, self.dtype)

    def features(self, x: jax.Array) -> list[jax.Array]:
        """[N, H, W, 3] in [-1, 1] -> the tapped features, one [N, h_k, w_k, C_k] per stage."""
        h = ((x.astype(jnp.float32) - SHIFT) / SCALE).astype(self.dtype)
        taps = []
        for k, stage in enumerate(self.stages):
            if k:
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                          "VALID")
            for w, b in stage:
                h = jax.lax.conv_general_dilated(h, w.astype(self.dtype), (1, 1),
                                                 ((1, 1), (1, 1)),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
                h = jax.nn.relu(h + b.astype(self.dtype))
            taps.append(h)
        return taps

    def distance(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """LPIPS: [N, H, W, 3] x2 in [-1, 1] -> [N] (0 for identical images)."""
        total = jnp.zeros((x.shape[0],), jnp.float32)
        fx, fy = self.features(x), self.features(y)
        for k, (a, b) in enumerate(zip(fx, fy)):
            d = jnp.square(_unit(a) - _unit(b))
            d = d @ self.lins[k] if self.lins is not None else jnp.sum(d, axis=-1)
            total = total + jnp.mean(d, axis=(1, 2))
        return total


def _unit(f: jax.Array) -> jax.Array:
    """LPIPS's channel normalisation x / (||x||_2 + 1e-10), in f32.

    The max keeps the gradient finite where a position's features are all zero (ReLU); the
    value is unchanged there (the numerator is 0).
    """
    f = f.astype(jnp.float32)
    sq = jnp.maximum(jnp.sum(jnp.square(f), axis=-1, keepdims=True), 1e-20)
    return f / (jnp.sqrt(sq) + 1e-10)
