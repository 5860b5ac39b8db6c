"""Train state and the generic train step shared by every objective.

The state is a plain pytree of arrays (pure dicts; optax states inside), so jit, donation and
Orbax see nothing framework-specific:

    {"step": int32[], "rng": uint32[2], "params": {group: pure dict},
     "rest": {group: pure dict of non-Param variables}, "opt": {group: optax state},
     "ema": {group: pure dict}, "skipped": int32[], "streak": int32[]}

Module structure (nnx GraphDefs) lives outside the state and is static under jit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lavin_jax import optim, sharding
from lavin_jax.objectives import Objective


@dataclasses.dataclass
class Trainable:
    """Everything static about a run's modules: structure, optimizers and shardings."""

    objective: Objective
    graphdefs: dict[str, Any]
    txs: dict[str, optax.GradientTransformation]
    ema_groups: tuple[str, ...]
    ema_decay: float
    microbatches: int
    state_shardings: Any = None
    abstract_state: Any = None

    def modules(self, state: Mapping[str, Any], params: Mapping[str, Any] | None = None):
        params = state["params"] if params is None else params
        return {g: nnx.merge(self.graphdefs[g], params[g], state["rest"][g])
                for g in self.graphdefs}


def _build(objective: Objective, seed: int):
    with nnx.use_eager_sharding(False):
        modules = objective.build(nnx.Rngs(seed))
    graphdefs, params, rest = {}, {}, {}
    for g, m in modules.items():
        graphdefs[g], params[g], rest[g] = nnx.split(m, nnx.Param, ...)
    return graphdefs, params, rest


def _init_fn(objective: Objective, seed: int, txs, ema_groups) -> Callable[[], dict[str, Any]]:
    """The state initialiser (traced under jit with out_shardings, or under eval_shape)."""

    def init() -> dict[str, Any]:
        _, params, rest = _build(objective, seed)
        params = {g: nnx.to_pure_dict(p) for g, p in params.items()}
        return {
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)),
            "params": params,
            "rest": {g: nnx.to_pure_dict(r) for g, r in rest.items()},
            "opt": {g: txs[g].init(params[g]) for g in objective.groups},
            "ema": {g: jax.tree.map(jnp.copy, params[g]) for g in ema_groups},
            "skipped": jnp.zeros((), jnp.int32),
            "streak": jnp.zeros((), jnp.int32),
        }

    return init


def abstract(
    objective: Objective, *, seed: int, mesh: Mesh, rules, ema_decay: float = 0.0,
    ema_groups: tuple[str, ...] | None = None, microbatches: int = 1,
) -> Trainable:
    """The Trainable with shardings and abstract state (ShapeDtypeStructs), no arrays built.

    ``mesh`` may hold compile-only devices (lavin_jax/aot.py compiles for a TPU topology).
    """
    txs = {g: objective.optimizer(g) for g in objective.groups}
    ema_groups = tuple(objective.groups[:1] if ema_groups is None else ema_groups)
    if ema_decay <= 0:
        ema_groups = ()
    graphdefs, abs_params, abs_rest = jax.eval_shape(lambda: _build(objective, seed))
    replicated = NamedSharding(mesh, PartitionSpec())
    p_shard = {g: nnx.to_pure_dict(sharding.state_shardings(p, mesh, rules))
               for g, p in abs_params.items()}
    r_shard = {g: nnx.to_pure_dict(sharding.state_shardings(r, mesh, rules))
               for g, r in abs_rest.items()}
    abstract = jax.eval_shape(_init_fn(objective, seed, txs, ema_groups))
    opt_shard = {
        g: optax.tree_map_params(
            txs[g], lambda _, s: s, abstract["opt"][g], p_shard[g],
            transform_non_params=lambda _: replicated,
        )
        for g in objective.groups
    }
    shardings = {
        "step": replicated, "rng": replicated, "params": p_shard, "rest": r_shard,
        "opt": opt_shard, "ema": {g: p_shard[g] for g in ema_groups},
        "skipped": replicated, "streak": replicated,
    }
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return Trainable(objective, graphdefs, txs, ema_groups, ema_decay, microbatches,
                     shardings, abstract)


def create(
    objective: Objective, *, seed: int, mesh: Mesh, rules, ema_decay: float = 0.0,
    ema_groups: tuple[str, ...] | None = None, microbatches: int = 1,
) -> tuple[Trainable, dict[str, Any]]:
    """Builds the train state directly sharded over ``mesh`` (never whole on one device)."""
    tr = abstract(objective, seed=seed, mesh=mesh, rules=rules, ema_decay=ema_decay,
                  ema_groups=ema_groups, microbatches=microbatches)
    init = _init_fn(objective, seed, tr.txs, tr.ema_groups)
    with sharding.use_rules(mesh, rules):
        state = jax.jit(init, out_shardings=tr.state_shardings)()
    return tr, state


def _split_micro(batch: Any, k: int) -> Any:
    """[B, ...] -> [k, B/k, ...] taking every k-th row, so each device's rows spread evenly."""

    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} not divisible by microbatches={k}")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(one, batch)


def _join_micro(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def _group_grads(tr: Trainable, g: str, state, params, batch, rng, aux):
    """Mean loss, grads, logs and aux of group ``g`` over the microbatches (lax.scan)."""
    step = state["step"]

    def f(p, mb, key, mb_aux):
        mods = tr.modules(state, {**params, g: p})
        return tr.objective.loss(g, mods, mb, key, step, mb_aux)

    grad_fn = jax.value_and_grad(f, has_aux=True)
    if tr.microbatches == 1:
        (loss, (logs, gaux)), grads = grad_fn(params[g], batch, rng, aux)
        return loss, grads, logs, gaux

    micro, micro_aux = _split_micro(batch, tr.microbatches), _split_micro(aux, tr.microbatches)
    keys = jax.random.split(rng, tr.microbatches)

    def body(acc, xs):
        mb, key, mb_aux = xs
        (loss, (logs, gaux)), grads = grad_fn(params[g], mb, key, mb_aux)
        acc = jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, (loss, grads, logs))
        return acc, gaux

    zeros = jax.eval_shape(lambda: grad_fn(params[g], jax.tree.map(lambda x: x[0], micro),
                                           keys[0], jax.tree.map(lambda x: x[0], micro_aux)))
    (_, (z_logs, _)), z_grads = zeros
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                        (zeros[0][0], z_grads, z_logs))
    (loss, grads, logs), gaux = jax.lax.scan(body, init, (micro, keys, micro_aux))
    scale = lambda t: jax.tree.map(lambda x: x / tr.microbatches, t)
    gaux = _join_micro(gaux)
    return scale(loss), scale(grads), scale(logs), gaux


def train_step(tr: Trainable, state: dict[str, Any], batch: Any) -> tuple[dict, dict]:
    """One update of every group in order; a non-finite loss or gradient skips the whole step.

    Logs per group ``<group>/loss``, ``<group>/grad_norm``, the objective's logs, and the
    learning rate used (``lr``; ``lr/<group>`` with several groups) when the optimizer records
    it (lavin_jax/optim.py).
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    params, opt, aux, logs = dict(state["params"]), dict(state["opt"]), {}, {}
    ok = jnp.array(True)
    for i, g in enumerate(tr.objective.groups):
        loss, grads, glogs, gaux = _group_grads(
            tr, g, state, params, batch, jax.random.fold_in(rng, i), aux)
        gnorm = optax.global_norm(grads)
        ok = ok & jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt[g] = tr.txs[g].update(grads, opt[g], params[g])
        params[g] = optax.apply_updates(params[g], updates)
        aux = {**aux, **gaux}
        logs.update({f"{g}/{k}": v for k, v in glogs.items()})
        logs[f"{g}/loss"], logs[f"{g}/grad_norm"] = loss, gnorm
        lr = optim.current_lr(opt[g])  # the rate this update used (optim.record_lr)
        if lr is not None:
            logs["lr" if len(tr.objective.groups) == 1 else f"lr/{g}"] = lr

    ema = {g: jax.tree.map(lambda e, p: tr.ema_decay * e + (1 - tr.ema_decay) * p,
                           state["ema"][g], params[g]) for g in tr.ema_groups}
    new = {**state, "params": params, "opt": opt, "ema": ema, "step": state["step"] + 1}
    keep = lambda n, o: jnp.where(ok, n, o)
    out = {
        **state,
        "step": state["step"] + 1,
        "params": jax.tree.map(keep, new["params"], state["params"]),
        "opt": jax.tree.map(keep, new["opt"], state["opt"]),
        "ema": jax.tree.map(keep, new["ema"], state["ema"]),
        "skipped": state["skipped"] + (~ok).astype(jnp.int32),
        "streak": jnp.where(ok, 0, state["streak"] + 1),
    }
    logs.update(skipped_steps=out["skipped"], nonfinite=(~ok).astype(jnp.int32))
    return out, logs


def jit_train_step(tr: Trainable, batch_shardings: Any) -> Callable:
    """train_step jitted with explicit shardings and the state donated."""
    return jax.jit(
        lambda s, b: train_step(tr, s, b),
        in_shardings=(tr.state_shardings, batch_shardings),
        out_shardings=(tr.state_shardings, None),
        donate_argnums=(0,),
    )


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
