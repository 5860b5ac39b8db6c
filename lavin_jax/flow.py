"""Flow matching for the J-DiT: the path, the released loss, context dropout and ODE samplers.

Convention (the release): t = 0 is noise, t = 1 is data, x_t = t * x_data + (1 - t) * noise, and
the model predicts the velocity u = x_data - noise. Only the target latent is noised; context and
query latents stay clean.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavin_jax import packing

# The release's fixed non-uniform grids (time points, not steps): dense on [0, 0.05], then growing.
OFFICIAL_GRIDS = {
    20: [0.0, 0.0056, 0.0111, 0.0167, 0.0222, 0.0278, 0.0333, 0.0389, 0.0444, 0.05,
         0.0524, 0.073, 0.1148, 0.1777, 0.2618, 0.3671, 0.4936, 0.6412, 0.81, 1.0],
    30: [0.0, 0.0036, 0.0071, 0.0107, 0.0143, 0.0179, 0.0214, 0.025, 0.0286, 0.0321,
         0.0357, 0.0393, 0.0429, 0.0464, 0.05, 0.0511, 0.06, 0.0779, 0.1049, 0.141,
         0.1862, 0.2403, 0.3036, 0.3759, 0.4573, 0.5477, 0.6472, 0.7557, 0.8733, 1.0],
    40: [0.0, 0.0026, 0.0053, 0.0079, 0.0105, 0.0132, 0.0158, 0.0184, 0.0211, 0.0237,
         0.0263, 0.0289, 0.0316, 0.0342, 0.0368, 0.0395, 0.0421, 0.0447, 0.0474, 0.05,
         0.0506, 0.0555, 0.0655, 0.0804, 0.1004, 0.1253, 0.1553, 0.1902, 0.2302, 0.2752,
         0.3251, 0.3801, 0.4401, 0.5051, 0.575, 0.65, 0.73, 0.815, 0.905, 1.0],
}


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """t' = t / (t + s (1 - t)); s > 1 spends more time near noise (t = 0)."""
    return t / (t + shift * (1.0 - t))


T_DISTS = ("logit_normal", "uniform")


class TimeDist(NamedTuple):
    """How training draws t (config.flow keys t_dist, t_loc, t_scale, time_shift).

    ``logit_normal``: sigmoid(N(loc, scale)), the release's (0, 1). It puts almost no weight
    near t = 0, where the official 20-point grid spends half its steps: short runs need a
    shift > 1 (the demo's 3) or ``uniform``, which trains every t equally."""
    dist: str = "logit_normal"
    loc: float = 0.0
    scale: float = 1.0
    shift: float = 1.0

    @classmethod
    def from_config(cls, flow_cfg) -> TimeDist:
        f = dict(flow_cfg)
        d = cls(str(f.get("t_dist", "logit_normal")), float(f.get("t_loc", 0.0)),
                float(f.get("t_scale", 1.0)), float(f.get("time_shift", 1.0)))
        if d.dist not in T_DISTS:
            raise ValueError(f"config.flow.t_dist={d.dist!r}; use one of {list(T_DISTS)}")
        if d.scale <= 0 or d.shift <= 0:
            raise ValueError(f"config.flow.t_scale={d.scale} and config.flow.time_shift="
                             f"{d.shift} must be > 0")
        return d


def sample_t(rng: jax.Array, shape: tuple[int, ...], dist: TimeDist = TimeDist()) -> jax.Array:
    """Training timesteps in [0, 1] drawn from ``dist``, then shifted by ``dist.shift``."""
    if dist.dist == "uniform":
        t = jax.random.uniform(rng, shape)
    else:
        t = jax.nn.sigmoid(dist.loc + dist.scale * jax.random.normal(rng, shape))
    return shift_time(t, dist.shift)


def segment_loss(
    pred: jax.Array, target: jax.Array, seg: jax.Array, num_segments: int, l1_weight: float = 0.1
) -> tuple[jax.Array, jax.Array]:
    """The released loss per segment: MSE + l1_weight * L1, each a mean over the segment's tokens.

    pred/target [B, L, P], seg [B, L] (0 = padding). Returns (mean over real segments,
    per-segment losses [B, S] with 0 where a segment is absent).
    """
    err = pred.astype(jnp.float32) - target.astype(jnp.float32)
    per_tok = jnp.mean(jnp.square(err), -1) + l1_weight * jnp.mean(jnp.abs(err), -1)  # [B, L]
    onehot = (seg[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)  # [B,L,S]
    count = onehot.sum(1)
    per_seg = jnp.einsum("bl,bls->bs", per_tok, onehot) / jnp.maximum(count, 1.0)
    present = (count > 0).astype(jnp.float32)
    return jnp.sum(per_seg * present) / jnp.maximum(present.sum(), 1.0), per_seg


def packed_loss(
    model: nnx.Module, clean: packing.Packed, rng: jax.Array, *,
    time_dist: TimeDist = TimeDist(), l1_weight: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss on a packed batch whose ``x`` holds the clean target tokens.

    Draws one t per segment and Gaussian noise per token, noises only the target stream.
    """
    k_t, k_n = jax.random.split(rng)
    t = sample_t(k_t, clean.t.shape, time_dist)  # [B, S]
    noise = jax.random.normal(k_n, clean.x.shape, jnp.float32)
    idx = jnp.clip(clean.x_seg - 1, 0, t.shape[1] - 1)
    t_tok = jnp.take_along_axis(t, idx, axis=1)[..., None]
    data = clean.x.astype(jnp.float32)
    x_t = t_tok * data + (1.0 - t_tok) * noise
    pred = model.forward_packed(clean._replace(x=x_t, t=t))
    loss, per_seg = segment_loss(pred, data - noise, clean.x_seg, t.shape[1], l1_weight)
    return loss, {"loss": loss, "t_mean": jnp.mean(t)}


def null_context(cond: jax.Array, cond_frames: jax.Array | None = None):
    """The CFG null context: one all-zero frame, then the query (the last real cond frame).

    cond [B, Tc, h, w, C] -> (cond' of the same shape with frames >= 2 as padding, frames [B] = 2).
    """
    b, tc = cond.shape[:2]
    n = jnp.full((b,), tc, jnp.int32) if cond_frames is None else cond_frames
    query = jnp.take_along_axis(cond, (n - 1)[:, None, None, None, None], axis=1)
    out = jnp.zeros_like(cond).at[:, 1:2].set(query)
    return out, jnp.full((b,), 2, jnp.int32)


def drop_context(
    rng: jax.Array, cond: jax.Array, prob: float, cond_frames: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """With probability ``prob`` per example, replace the context by :func:`null_context`."""
    b, tc = cond.shape[:2]
    n = jnp.full((b,), tc, jnp.int32) if cond_frames is None else cond_frames
    null, null_n = null_context(cond, n)
    drop = jax.random.bernoulli(rng, prob, (b,))
    return jnp.where(drop[:, None, None, None, None], null, cond), jnp.where(drop, null_n, n)


def training_loss(
    model: nnx.Module, x: jax.Array, cond: jax.Array, rng: jax.Array, *,
    time_dist: TimeDist = TimeDist(), l1_weight: float = 0.1, context_dropout: float = 0.0,
    cond_frames: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Dense convenience: x [B, Tx, h, w, C] clean target latents, cond [B, Tc, h, w, C]."""
    k_drop, k_loss = jax.random.split(rng)
    cond, n = drop_context(k_drop, cond, context_dropout, cond_frames)
    clean = packing.pack_latents(x, jnp.zeros(x.shape[:1]), cond, model.cfg.patch_size, n)
    return packed_loss(model, clean, k_loss, time_dist=time_dist, l1_weight=l1_weight)


# ------------------------------------------------------------------------------------------
# Sampling.


def time_grid(num_steps: int, grid: str = "official", shift: float = 1.0) -> np.ndarray:
    """``num_steps`` time points from 0 to 1 (num_steps - 1 integration steps)."""
    if grid == "official":
        if num_steps not in OFFICIAL_GRIDS:
            raise ValueError(
                f"sample.num_steps={num_steps}: the official grid exists for "
                f"{sorted(OFFICIAL_GRIDS)} points; use grid='uniform' or 'shifted' for others"
            )
        return np.asarray(OFFICIAL_GRIDS[num_steps], np.float32)
    if num_steps < 2:
        raise ValueError(f"sample.num_steps={num_steps} must be >= 2 time points")
    ts = np.linspace(0.0, 1.0, num_steps, dtype=np.float64)
    if grid == "uniform":
        return ts.astype(np.float32)
    if grid == "shifted":
        return (ts / (ts + shift * (1.0 - ts))).astype(np.float32)
    raise ValueError(f"sample.grid={grid!r}; use 'official', 'uniform' or 'shifted'")


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "use_cfg"))
def _sample(graphdef, state, x, cond, cond_frames, grid, cfg_scale, *, method, use_cfg):
    model = nnx.merge(graphdef, state)
    b, tx, h, w, _ = x.shape
    p = model.cfg.patch_size
    base = packing.pack_latents(x, jnp.zeros((b,)), cond, p, cond_frames)
    if use_cfg:  # the null branch (zero frame + query) runs at its own, shorter length
        null, _ = null_context(cond, cond_frames)
        null_base = packing.pack_latents(x, jnp.zeros((b,)), null[:, :2], p)

    def velocity(z, t):
        tok = packing.patchify(z, p)
        v = model.forward_packed(base._replace(x=tok, t=jnp.full((b, 1), t)))
        if use_cfg:
            v_u = model.forward_packed(null_base._replace(x=tok, t=jnp.full((b, 1), t)))
            v = v_u + cfg_scale * (v - v_u)
        return packing.unpatchify(v, tx, h, w, p)

    return integrate(velocity, x, grid, method)


def check_method(method: str) -> None:
    if method not in ("euler", "heun"):
        raise ValueError(f"sample.method={method!r}; use 'euler' or 'heun'")


def integrate(velocity, x: jax.Array, grid: jax.Array, method: str) -> jax.Array:
    """Euler or Heun from grid[0] to grid[-1] under a ``fori_loop`` (one compiled step):
    ``velocity(x, t)`` -> dx/dt, any shape (latents or packed tokens); float32 state."""

    def step(i, z):
        t0, t1 = grid[i], grid[i + 1]
        d0 = velocity(z, t0)
        if method == "euler":
            return z + (t1 - t0) * d0
        return z + (t1 - t0) * 0.5 * (d0 + velocity(z + (t1 - t0) * d0, t1))

    return jax.lax.fori_loop(0, grid.shape[0] - 1, step, x.astype(jnp.float32))


def sample_ode(
    model: nnx.Module,
    x_init: jax.Array,
    cond: jax.Array,
    *,
    cfg_scale: float = 1.0,
    num_steps: int = 20,
    grid: str = "official",
    method: str = "euler",
    shift: float = 1.0,
    cond_frames: jax.Array | None = None,
) -> jax.Array:
    """Integrates the velocity ODE from noise (t=0) to data (t=1) for a batch of queries.

    x_init [B, Tx, h, w, C] noise, cond [B, Tc, h, w, C] = context pairs then the query
    (``cond_frames`` [B] optional: only the first n frames of a row are real). With
    ``cfg_scale != 1`` the null branch (zero frame + query) runs as a second, 2-frame call (as
    the release does: padding it to the full context would cost ~1.5x the work) and
    v = v_u + s (v_c - v_u). The whole loop is one jitted computation.
    """
    check_method(method)
    ts = jnp.asarray(time_grid(num_steps, grid, shift))
    b, tc = cond.shape[:2]
    n = jnp.full((b,), tc, jnp.int32) if cond_frames is None else jnp.asarray(cond_frames)
    graphdef, state = nnx.split(model)
    return _sample(
        graphdef, state, x_init, cond, n, ts, jnp.float32(cfg_scale),
        method=method, use_cfg=cfg_scale != 1.0,
    )
