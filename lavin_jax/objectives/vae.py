"""The ST-VAE training objective: reconstruction + KL + perceptual + adversarial (two groups).

Group "vae" (the generator):
  loss = l1 * |x - x_rec| + l2 * (x - x_rec)^2 + perceptual_weight * LPIPS(x, x_rec)   (= nll)
       + kl_weight * KL(q || N(0, I))                    (KL summed over latents, batch mean)
       + [step >= disc_start] * w * g_adv,   g_adv = -sum_heads mean D(x_rec)
  with the taming-transformers adaptive weight
       w = disc_weight * clip(||d nll / d W|| / (||d g_adv / d W|| + 1e-4), 0, max), stop-grad,
  W = the decoder's last conv kernel.
Group "disc" (frame + clip PatchGANs, lavin_jax/models/discriminator.py):
  loss = [step >= disc_start] * sum_heads (mean relu(1 - D(x)) + mean relu(1 + D(sg(x_rec))))
  with x_rec handed over from the "vae" group's aux (no second VAE forward).
Before disc_start neither GAN term is computed (a ``lax.cond``, so the discriminator costs
nothing until it starts). Each group has its own AdamW. ``train_step_reference`` is the
two-group update cycle written out with optax (the pattern the trainer follows).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lavin_jax import optim
from lavin_jax.models.discriminator import DiscConfig, Discriminator, min_input_side
from lavin_jax.objectives import preview
from lavin_jax.objectives.perceptual import FeatureNet

log = logging.getLogger(__name__)

VIS_CLIPS = 4  # clips (rows) per grid
VIS_FRAMES = 4  # frames shown per clip (the first ones)


def default_config() -> ml_collections.ConfigDict:
    """The ``objective`` block of configs/stvae.py (every key the VAE objective reads)."""
    gan_adam = optim.default_config(b1=0.5, b2=0.9)  # the usual GAN betas (taming, pix2pix)
    return ml_collections.ConfigDict(dict(
        name="vae",
        input_key="video",  # batch[input_key]: [B, T, H, W, 3] in [-1, 1] (T = 1 for images)
        sample_posterior=True,  # decode a posterior sample (False: its mean)
        l1_weight=1.0,
        l2_weight=0.0,
        kl_weight=1e-6,
        perceptual_weight=0.0,  # > 0 needs perceptual_path; nothing is downloaded
        perceptual_path="",  # .npz / .safetensors VGG16 (+ LPIPS heads), see perceptual.py
        disc_weight=0.5,
        disc_start=5000,  # the GAN terms are off (x0) before this step
        adaptive_weight=True,  # False: the adversarial weight is disc_weight itself
        adaptive_weight_max=1e4,
        disc=dict(channels=64, n_layers=3, frame=True, clip=True, temporal_kernel=3,
                  param_dtype="float32", dtype="float32"),
        optim_vae=gan_adam,  # lavin_jax/optim.py keys
        optim_disc=gan_adam.copy_and_resolve_references(),
    ))


# ---------------------------------------------------------------------------------------------
# The terms, as pure functions.

def reconstruction_loss(x: jax.Array, x_rec: jax.Array, l1_weight: float, l2_weight: float
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """l1 * mean|x - x_rec| + l2 * mean (x - x_rec)^2 over every element."""
    err = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
    l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
    return l1_weight * l1 + l2_weight * l2, {"rec_l1": l1, "rec_l2": l2}


def hinge_d_loss(real: dict[str, jax.Array], fake: dict[str, jax.Array]) -> jax.Array:
    """Sum over heads of mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return sum(jnp.mean(jax.nn.relu(1.0 - real[k])) + jnp.mean(jax.nn.relu(1.0 + fake[k]))
               for k in sorted(real))


def hinge_g_loss(fake: dict[str, jax.Array]) -> jax.Array:
    """Sum over heads of -mean D(fake)."""
    return sum(-jnp.mean(fake[k]) for k in sorted(fake))


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def adaptive_weight(nll_grad: Any, g_grad: Any, max_weight: float = 1e4) -> jax.Array:
    """||nll_grad|| / (||g_grad|| + 1e-4), clipped to [0, max_weight], stop-gradiented."""
    w = _global_norm(nll_grad) / (_global_norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def decode_with_pullback(vae: nnx.Module, z: jax.Array) -> tuple[jax.Array, Callable]:
    """x_rec = vae.decode(z) and the VJP of the decoder w.r.t. its last conv kernel only.

    Splitting that one Param out makes the kernel an explicit input; only the last conv's
    backward runs when the pullback is applied. x_rec stays differentiable for the outer grad.
    """
    kernel = vae.last_decoder_layer_kernel()
    path = next((p for p, node in nnx.iter_graph(vae) if node is kernel), None)
    if path is None:
        raise ValueError("vae.last_decoder_layer_kernel() is not a Param of the VAE")
    graphdef, last, rest = nnx.split(vae, lambda p, _: tuple(p) == tuple(path), ...)
    # Pure dicts: merge must make fresh Variables inside the vjp trace (nnx.remat in the model
    # writes back into them, which NNX forbids for Variables of an outer trace).
    last, rest = nnx.to_pure_dict(last), nnx.to_pure_dict(rest)
    x_rec, vjp = jax.vjp(lambda w: nnx.merge(graphdef, w, rest).decode(z), last)
    return x_rec, lambda ct: vjp(ct)[0]


# ---------------------------------------------------------------------------------------------
# The plug-in.

def _checked_blocks(cfg: ml_collections.ConfigDict
                    ) -> tuple[ml_collections.ConfigDict, DiscConfig]:
    """config.objective over ``default_config()`` (nested blocks merged key by key) and its
    discriminator config, checked against ``config.data.image_size``."""
    o = default_config()
    given = dict(cfg.get("objective", None) or {})
    unknown = sorted(set(given) - set(o))
    if unknown:
        raise ValueError(f"config.objective has unknown keys {unknown}; known: {sorted(o)}")
    for k, v in given.items():
        if isinstance(o[k], ml_collections.ConfigDict):
            o[k].update(dict(v))
        else:
            o[k] = v
    disc = DiscConfig.from_config(o.disc)
    size = (cfg.get("data") or {}).get("image_size")
    need = min_input_side(disc.n_layers)
    if isinstance(size, int) and size < need:  # else the first trace fails, deep in jit
        raise ValueError(f"config.data.image_size={size} is too small for the discriminator's "
                         f"{disc.n_layers} layers (needs >= {need}); raise it or lower "
                         f"config.objective.disc.n_layers")
    return o, disc


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """For validate_config (objectives.check_objective)."""
    _checked_blocks(cfg)


class VAEObjective:
    """The ST-VAE objective plug-in (see lavin_jax/objectives/__init__.py for the protocol).

    ``model_ctor(rngs) -> nnx.Module`` overrides the ST-VAE built from ``cfg.model``; it needs
    ``posterior(x)`` (with ``sample(rng)``, ``mode()``, ``kl()``), ``decode(z)`` and
    ``last_decoder_layer_kernel()``.
    """

    groups = ("vae", "disc")

    def __init__(self, cfg: ml_collections.ConfigDict, model_ctor: Callable | None = None):
        o, self.disc_cfg = _checked_blocks(cfg)
        self.cfg, self.ocfg = cfg, o
        self.model_ctor = model_ctor
        self.perceptual = None
        if o.perceptual_weight > 0:
            self.perceptual = FeatureNet.from_file(o.perceptual_path, "objective.perceptual_path")

    def checkpoint_name(self, group: str) -> str:
        """The item of a params-only checkpoint (``init_from``) this group loads: the VAE
        from "stvae" (what lavin_jax.convert and the demo export write)."""
        return {"vae": "stvae"}.get(group, group)
    def build(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        if self.model_ctor is not None:
            vae = self.model_ctor(rngs)
        else:
            from lavin_jax.models.stvae import STVAE, STVAEConfig

            vae = STVAE(STVAEConfig.from_config(self.cfg.model), rngs=rngs)
        return {"vae": vae, "disc": Discriminator(self.disc_cfg, rngs=rngs)}

    def optimizer(self, group: str) -> optax.GradientTransformation:
        if group not in self.groups:
            raise ValueError(f"VAE objective: unknown group {group!r}; use one of {self.groups}")
        return optim.make_optimizer(self.ocfg[f"optim_{group}"])

    def loss(self, group: str, modules: dict[str, nnx.Module], batch: dict[str, Any],
             rng: jax.Array, step: jax.Array, aux: dict[str, Any]
             ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
        x = batch.get(self.ocfg.input_key)
        if x is None:
            raise ValueError(f"batch has no {self.ocfg.input_key!r} (objective.input_key); "
                             f"keys: {sorted(batch)}")
        if x.ndim != 5:
            raise ValueError(f"batch[{self.ocfg.input_key!r}] must be [B, T, H, W, 3], "
                             f"got {x.shape}")
        on = (step >= self.ocfg.disc_start).astype(jnp.float32)  # traced: no Python branch
        if group == "vae":
            return self._generator_loss(modules, x.astype(jnp.float32), rng, on)
        if group == "disc":
            if "recon" not in aux:
                raise ValueError("the 'disc' loss needs aux['recon'] from the 'vae' group's loss")
            return self._disc_loss(modules["disc"], x.astype(jnp.float32), aux["recon"], on)
        raise ValueError(f"VAE objective: unknown group {group!r}; use one of {self.groups}")

    def _nll(self, x: jax.Array, x_rec: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        o = self.ocfg
        nll, logs = reconstruction_loss(x, x_rec, o.l1_weight, o.l2_weight)
        if self.perceptual is not None:
            frames = lambda v: v.reshape((-1,) + v.shape[2:])  # [B, T, H, W, 3] -> [BT, H, W, 3]
            p = jnp.mean(self.perceptual.distance(frames(x), frames(x_rec)))
            nll, logs = nll + o.perceptual_weight * p, {**logs, "perceptual": p}
        return nll, logs

    def _generator_loss(self, modules, x, rng, on):
        o = self.ocfg
        vae, disc = modules["vae"], modules["disc"]
        q = vae.posterior(x)
        z = q.sample(rng) if o.sample_posterior else q.mode()
        kl = jnp.mean(q.kl())
        x_rec, pullback = decode_with_pullback(vae, z)
        # value_and_grad w.r.t. x_rec: the values stay differentiable for the outer (trainer)
        # grad; the x_rec-gradients feed only the stop-gradiented adaptive weight.
        (nll, logs), d_nll = jax.value_and_grad(lambda r: self._nll(x, r), has_aux=True)(x_rec)

        def gan_terms(r):
            g_adv, d_g = jax.value_and_grad(lambda r: hinge_g_loss(disc(r)))(r)
            if o.adaptive_weight:
                w = adaptive_weight(pullback(d_nll), pullback(d_g), o.adaptive_weight_max)
            else:
                w = jnp.float32(1.0)
            return g_adv, w * o.disc_weight

        # Before disc_start the discriminator does not run at all (a cond, not a x0 factor):
        # its forward, backward and the adaptive weight's pullbacks cost ~40% of a demo step.
        zeros = lambda r: (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        g_adv, w = jax.lax.cond(on > 0, gan_terms, zeros, x_rec)
        loss = nll + o.kl_weight * kl + w * g_adv  # w = g_adv = 0 before disc_start
        logs = {**logs, "loss": loss, "nll": nll, "kl": kl, "kl_weighted": o.kl_weight * kl,
                "g_adv": g_adv, "adaptive_weight": w, "disc_factor": on}
        return loss, (logs, {"recon": jax.lax.stop_gradient(x_rec)})

    def _disc_loss(self, disc, x, recon, on):
        # Two passes rather than one on concat([x, fake]): a concat along the sharded batch axis
        # would reshuffle whole clips between devices.
        def terms(x, recon):
            real, fake_l = disc(x), disc(jax.lax.stop_gradient(recon))
            mean_of = lambda t: sum(jnp.mean(v) for v in t.values()) / len(t)
            return hinge_d_loss(real, fake_l), mean_of(real), mean_of(fake_l)

        # Off before disc_start: nothing runs, the disc gets zero gradients (Adam idles).
        zeros = lambda x, r: (jnp.zeros((), jnp.float32),) * 3
        d, logits_real, logits_fake = jax.lax.cond(on > 0, terms, zeros, x, recon)
        loss = d  # 0 before disc_start (the cond)
        logs = {"loss": loss, "d_loss": d, "logits_real": logits_real,
                "logits_fake": logits_fake, "disc_factor": on}
        return loss, (logs, {})

    def visualize(self, modules: dict[str, nnx.Module], batch: dict[str, Any], step: int
                  ) -> np.ndarray:
        """uint8 [H, W, 3]: a row per clip (up to VIS_CLIPS of process 0's batch): its first
        VIS_FRAMES input frames | their reconstructions (posterior mean, decoded). Never
        raises: a failure is logged and a placeholder returned."""
        try:
            return self._visualize(modules["vae"], batch)
        except Exception:  # noqa: BLE001 - a preview must never stop a training run
            log.exception("step %d: the reconstruction grid failed; training continues", step)
            return preview.PLACEHOLDER

    def _visualize(self, vae: nnx.Module, batch: dict[str, Any]) -> np.ndarray:
        x = preview.first_rows({"x": batch[self.ocfg.input_key]}, VIS_CLIPS)["x"]
        mesh = preview.module_mesh(vae)
        graphdef, state = nnx.split(vae)
        rec = np.asarray(_reconstruct(graphdef, state, preview.replicate(x, mesh),
                                      out_sharding=preview.replicated(mesh)))
        if jax.process_index() != 0:
            return preview.PLACEHOLDER
        x, rec = preview.to_uint8(x[:, :VIS_FRAMES]), preview.to_uint8(rec[:, :VIS_FRAMES])
        return preview.grid([list(a) + list(b) for a, b in zip(x, rec)])


@functools.partial(jax.jit, static_argnames=("graphdef", "out_sharding"))
def _reconstruct(graphdef, state, x, *, out_sharding):
    """The posterior mean decoded: x [B, T, H, W, 3] in [-1, 1] -> its reconstruction."""
    vae = nnx.merge(graphdef, state)
    out = vae.decode(vae.posterior(x.astype(jnp.float32)).mode())
    if out_sharding is not None:
        out = jax.lax.with_sharding_constraint(out, out_sharding)
    return out


# ---------------------------------------------------------------------------------------------
# The update cycle, written out (the trainer's pattern).

def split_modules(modules: dict[str, nnx.Module]):
    """{group: module} -> (graphdefs, params, rest): each a {group: ...} dict; params are Params."""
    out = {n: nnx.split(m, nnx.Param, ...) for n, m in modules.items()}
    return ({n: v[0] for n, v in out.items()}, {n: v[1] for n, v in out.items()},
            {n: v[2] for n, v in out.items()})


def train_step_reference(objective, graphdefs: dict, params: dict, rest: dict, opt_states: dict,
                         batch: dict, rng: jax.Array, step: jax.Array,
                         groups: tuple[str, ...] | None = None, aux: dict | None = None):
    """One update of every group in order -> (params, opt_states, logs). Pure; jit it with
    ``functools.partial(train_step_reference, objective, graphdefs)``.

    Group g differentiates only its own Params; the others enter as constants. Non-Param state
    (``rest``) is read, not updated. ``groups`` restricts the cycle and ``aux`` seeds the
    hand-over dict (tests).
    """
    params, opt_states, aux, logs = dict(params), dict(opt_states), dict(aux or {}), {}
    for i, g in enumerate(groups or objective.groups):
        def f(p, g=g, key=jax.random.fold_in(rng, i), aux=aux):
            mods = {n: nnx.merge(graphdefs[n], p if n == g else params[n], rest[n])
                    for n in graphdefs}
            return objective.loss(g, mods, batch, key, step, aux)

        (_, (glogs, gaux)), grads = jax.value_and_grad(f, has_aux=True)(params[g])
        updates, opt_states[g] = objective.optimizer(g).update(grads, opt_states[g], params[g])
        params[g] = optax.apply_updates(params[g], updates)
        aux = {**aux, **gaux}
        logs.update({f"{g}/{k}": v for k, v in glogs.items()})
    return params, opt_states, logs
