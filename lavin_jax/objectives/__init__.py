"""Training objectives as plug-ins of the one training loop.

An objective owns its trainable module groups, one optimizer per group, and a loss per group.
The trainer, for each group in ``groups`` order, takes ``value_and_grad`` of ``loss`` w.r.t. that
group's ``nnx.Param``s only (the other groups' modules are constants), applies that group's
optimizer, and hands the returned ``aux`` to the next group's loss (e.g. the VAE's stop-gradiented
reconstruction to the discriminator) so no forward pass is repeated.
``lavin_jax/objectives/vae.py: train_step_reference`` is that cycle written out with optax.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import jax
import ml_collections
import optax
from flax import nnx


class Objective(Protocol):
    groups: tuple[str, ...]  # trainable module groups in update order, e.g. ("vae", "disc")

    def build(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        """One freshly initialised module per group."""
        ...

    def optimizer(self, group: str) -> optax.GradientTransformation:
        """The group's own optimizer (each group keeps its own state)."""
        ...

    def loss(
        self, group: str, modules: dict[str, nnx.Module], batch: dict[str, Any],
        rng: jax.Array, step: jax.Array, aux: dict[str, Any],
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
        """(scalar loss, (logs, aux for later groups)); ``step`` is a traced int32 scalar."""
        ...


# name -> "module:factory"; imported on first use so an objective's deps load only when asked for.
REGISTRY: dict[str, str] = {
    "vae": "lavin_jax.objectives.vae:VAEObjective",
    "flow": "lavin_jax.objectives.flow:FlowObjective",
}


def _module(name: str) -> tuple[Any, str]:
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; use one of {sorted(REGISTRY)}")
    module, factory = REGISTRY[name].split(":")
    try:
        return importlib.import_module(module), factory
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ValueError(f"objective {name!r}: {module} is not written yet") from e


def get_objective(name: str, cfg: ml_collections.ConfigDict) -> Objective:
    """The objective ``name`` built from the full run config (it reads its own block)."""
    mod, factory = _module(name)
    return getattr(mod, factory)(cfg)


def check_objective(name: str, cfg: ml_collections.ConfigDict) -> None:
    """The objective module's ``check_config(cfg)``, if it has one: its config blocks checked
    without building anything (loads no file, compiles nothing); raises ValueError."""
    mod, _ = _module(name)
    check = getattr(mod, "check_config", None)
    if check is not None:
        check(cfg)
