"""The J-DiT flow-matching objective plug-in (one group, "model").

The batch is a packed row set (lavin_jax/packing.py field names) whose ``x`` holds the clean
target latent tokens; context dropout was applied per episode before packing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from lavin_jax import flow, optim, packing
from lavin_jax.models.jdit import JDiT, JDiTConfig


class FlowObjective:
    groups = ("model",)

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.model_cfg = JDiTConfig.from_config(cfg.model)
        self.flow_cfg = cfg.flow
        self.vae = None
        data = cfg.get("data") or {}
        if data.get("kind") == "episodes" and data.get("mode") == "online":
            from lavin_jax.encode import load_encoder

            # The frozen ST-VAE encodes pixel rows inside the step (small runs, no cache).
            self.vae = load_encoder(cfg).vae

    def build(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        return {"model": JDiT(self.model_cfg, rngs=rngs)}

    def optimizer(self, group: str) -> optax.GradientTransformation:
        return optim.make_optimizer(self.cfg.optim)

    def loss(
        self, group: str, modules: dict[str, nnx.Module], batch: dict[str, Any],
        rng: jax.Array, step: jax.Array, aux: dict[str, Any],
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
        if "cond_src" in batch:  # online mode: pixels in, encoded here with the frozen VAE
            if self.vae is None:
                raise ValueError("online batch (cond_src) but config.data.mode != 'online'")
            from lavin_jax.data import online

            def encode(x):
                z = self.vae.normalize(self.vae.encode(x.astype(jnp.float32) / 127.5 - 1.0)[0])
                return jax.lax.stop_gradient(z)

            batch = online.to_packed(batch, encode, self.model_cfg.patch_size)._asdict()
        missing = sorted(set(packing.Packed._fields) - set(batch))
        if missing:
            raise ValueError(f"flow objective: batch lacks {missing}; it needs packed rows "
                             f"({', '.join(packing.Packed._fields)})")
        packed = packing.Packed(**{k: batch[k] for k in packing.Packed._fields})
        loss, logs = flow.packed_loss(
            modules["model"], packed, rng,
            time_shift=self.flow_cfg.time_shift, l1_weight=self.flow_cfg.l1_weight,
        )
        real = (jnp.sum(packed.cond_seg > 0) + jnp.sum(packed.x_seg > 0)) / (
            packed.cond_seg.size + packed.x_seg.size)
        return loss, ({**logs, "real_token_fraction": real}, {})

    def checkpoint_name(self, group: str) -> str:
        """The item of a params-only checkpoint (``init_from``) this group loads."""
        return "jdit"

    def tokens_per_batch(self, batch: dict[str, Any]) -> int:
        """Real tokens in a batch (both streams), for the tokens/s figure."""
        return int(jnp.sum(batch["cond_seg"] > 0) + jnp.sum(batch["x_seg"] > 0))
