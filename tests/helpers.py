"""Shared test utilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lavin_jax.models.jdit import JDiT, JDiTConfig

TINY = dict(hidden_size=48, depth=2, num_heads=4, kv_group=2, patch_size=2, in_channels=4)


def perturb(model: nnx.Module, seed: int = 0, scale: float = 0.2) -> nnx.Module:
    """Adds noise to every parameter so zero-initialised paths (adaLN, final layer) are live."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def tiny_jdit(seed: int = 0, **overrides) -> JDiT:
    cfg = JDiTConfig(**{**TINY, **overrides})
    with nnx.use_eager_sharding(False):
        return perturb(JDiT(cfg, rngs=nnx.Rngs(seed)), seed)


def latents(key: int, *shape: int) -> jax.Array:
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def tiny_eval_config(res: int):
    """The demo J-DiT config shrunk for eval tests: the TINY model, in-memory sources
    ("mem_images" / "mem_clips"), one resolution."""
    import ml_collections

    from configs.lavin_dit import get_config

    cfg = get_config("demo")
    cfg.model = ml_collections.ConfigDict({"name": "jdit", **TINY})
    cfg.data.sources = {"image": "mem_images", "video": "mem_clips"}
    cfg.data.resolutions = [res]
    return cfg
