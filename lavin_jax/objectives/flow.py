"""The J-DiT flow-matching objective plug-in (one group, "model").

The batch is a packed row set (lavin_jax/packing.py field names) whose ``x`` holds the clean
target latent tokens; context dropout was applied per episode before packing.
``visualize`` (the trainer's sample grids) samples the first packed rows with the ODE and shows
a few of their episodes: context pairs | query | prediction | ground truth.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lavin_jax import flow, optim, packing
from lavin_jax.models.jdit import JDiT, JDiTConfig
from lavin_jax.objectives import preview

log = logging.getLogger(__name__)

VIS_EPISODES = 4  # episodes per grid
VIS_PAIRS = 4  # context pairs shown per episode (the first ones)


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """For validate_config (objectives.check_objective): the config.flow block."""
    if cfg.get("flow") is not None:
        flow.TimeDist.from_config(cfg.flow)


class FlowObjective:
    groups = ("model",)

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.model_cfg = JDiTConfig.from_config(cfg.model)
        self.flow_cfg = cfg.flow
        self.time_dist = flow.TimeDist.from_config(cfg.flow)
        self.vae = None
        self._decoder: preview.LatentDecoder | None = None  # built on the first visualize
        self._task_frames: dict[int, tuple[int, int]] | None = None
        self._vis_rows: int | None = None  # packed rows a grid samples (fixed on first use)
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
            time_dist=self.time_dist, l1_weight=self.flow_cfg.l1_weight,
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

    # ---- sample grids ----------------------------------------------------------------------

    def visualize(self, modules: dict[str, nnx.Module], batch: dict[str, Any], step: int
                  ) -> np.ndarray:
        """uint8 [H, W, 3]: a row per episode (up to VIS_EPISODES, context-dropped ones last)
        of process 0's first packed rows: context pairs | query | prediction | ground truth.

        The rows taken are as many as the first call's batch needed to hold VIS_EPISODES
        episodes (then fixed: one compiled sampler). The prediction is ``cfg.sample``'s ODE
        (steps, grid, method, CFG scale) run on those whole rows with ``modules["model"]``
        (the trainer passes EMA params once the EMA has warmed up). Frames are decoded with the
        frozen ST-VAE of ``data.vae_checkpoint`` (the first frame of each item), else shown as
        false-colour latents. Never raises: a failure is logged and a placeholder returned.
        """
        try:
            return self._visualize(modules["model"], batch, step)
        except Exception:  # noqa: BLE001 - a preview must never stop a training run
            log.exception("step %d: the sample grid failed; training continues", step)
            return preview.PLACEHOLDER

    def _visualize(self, model: nnx.Module, batch: dict[str, Any], step: int) -> np.ndarray:
        p = self.model_cfg.patch_size
        if self._decoder is None:
            self._decoder = preview.LatentDecoder(
                (self.cfg.get("data") or {}).get("vae_checkpoint", ""), self.vae)
        if self._vis_rows is None:
            counts = np.cumsum([len(set(r.tolist()) - {0}) for r in np.asarray(batch["x_seg"])])
            n = min(int(np.searchsorted(counts, VIS_EPISODES)) + 1, len(counts))
            self._vis_rows = int(preview.from_process0(np.int32(n)))
        row = preview.first_rows(batch, self._vis_rows)
        if "cond_src" in row:  # online mode: encode the pixels as the train step does
            row = {**row, **self._online_tokens(row)}
        eps = [e for e in row_episodes(row, p, self._frames_of) if e is not None]
        chosen = sorted(eps, key=lambda e: e.dropped)[:VIS_EPISODES]
        if not chosen:
            log.warning("step %d: no displayable episode in the first packed rows", step)
            return preview.PLACEHOLDER
        s = self.cfg.get("sample") or {}
        cfg_scale = float(s.get("cfg_scale", 1.0))
        packed = {k: row[k] for k in packing.Packed._fields}
        null = null_row(packed, chosen) if cfg_scale != 1.0 else None
        noise = np.random.default_rng((int(self.cfg.seed), int(step))).standard_normal(
            packed["x"].shape).astype(np.float32)
        pred = sample_packed(
            model, packed, noise, null, cfg_scale=cfg_scale,
            num_steps=int(s.get("num_steps", 20)), grid=str(s.get("grid", "official")),
            method=str(s.get("method", "euler")), shift=float(s.get("shift", 1.0)))
        if jax.process_index() != 0:
            return preview.PLACEHOLDER
        tiles, layout = [], []
        for e in chosen:
            z_pred = _unpatch(pred[e.row, e.x_idx], e.rows, e.cols, p)
            ctx = [e.cond[i] for i in e.context_starts[:2 * VIS_PAIRS]]
            frames = ctx + [e.cond[e.query_start], z_pred[0], e.target[0]]
            layout.append(len(ctx))
            tiles.extend(frames)
        pixels = preview.decode_groups(self._decoder, tiles)
        width, rows, o = max(layout), [], 0
        for n in layout:  # right-aligned: query | prediction | truth form the last 3 columns
            rows.append([None] * (width - n) + pixels[o:o + n + 3])
            o += n + 3
        return preview.grid(rows)

    def _frames_of(self, task_id: int) -> tuple[int, int] | None:
        """Latent frames of (input item, target item) of task ``task_id``, when known."""
        if self._task_frames is None:
            self._task_frames = {}
            tasks = (self.cfg.get("data") or {}).get("tasks")
            if tasks:
                from lavin_jax.data.episodes import task_entries

                self._task_frames = {i: e.make().frames
                                     for i, e in enumerate(task_entries(self.cfg.data))}
        frames = self._task_frames.get(int(task_id))
        if frames is None:
            return None
        lat = [self._decoder.latent_frames(f) for f in frames]
        return None if None in lat else (lat[0], lat[1])

    def _online_tokens(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An online row's cond / x tokens, encoded by the frozen VAE (its local device)."""
        with preview.local_device():
            out = _online_tokens(self.vae, row, self.model_cfg.patch_size)
        return jax.tree.map(np.asarray, out)


@functools.partial(nnx.jit, static_argnames=("p",))
def _online_tokens(vae: nnx.Module, row: dict[str, Any], p: int) -> dict[str, jax.Array]:
    from lavin_jax.data import online

    enc = lambda x: vae.normalize(vae.encode(x.astype(jnp.float32) / 127.5 - 1.0)[0])
    out = online.to_packed(row, enc, p)
    return {"cond": out.cond, "x": out.x}


# ---- packed episodes (numpy) ------------------------------------------------------------------


@dataclasses.dataclass
class Episode:
    row: int
    seg: int
    cond: np.ndarray  # [Tc, h, w, C] latents, items in order, query last
    target: np.ndarray  # [Tx, h, w, C]
    x_idx: np.ndarray  # the row's target token slots of this episode
    rows: int  # token grid
    cols: int
    context_starts: list[int]  # first latent frame of each context item (in, tgt, in, ...)
    query_start: int
    dropped: bool  # the CFG null context (a zero frame, then the query)


def split_items(tc: int, frames: tuple[int, int] | None) -> tuple[list[int], int, bool]:
    """(first latent frame of each context item, the query's, null context?) of an episode with
    ``tc`` cond latent frames whose items have ``frames`` = (input, target) latent frames
    (None: unknown, taken as 1 each; a count that does not fit: every frame an item)."""
    li, lo = frames or (1, 1)
    if tc == 1 + li:  # the null context: no real episode is this short (>= 2 li + lo)
        return [0], 1, True
    if (tc - li) % (li + lo) == 0:
        n = (tc - li) // (li + lo)
        return [k * (li + lo) + o for k in range(n) for o in (0, li)], tc - li, False
    return list(range(tc - 1)), tc - 1, False


def row_episodes(rows: dict[str, np.ndarray], p: int, frames_of) -> list[Episode | None]:
    """The episodes of packed rows, in row then segment order (None for one whose tokens do not
    form whole frames). ``frames_of(task_id)`` -> (input, target) latent frames of the task's
    items, or None."""
    out: list[Episode | None] = []
    task = rows.get("seg_task")
    for b in range(len(rows["x_seg"])):
        for s in sorted(set(np.unique(rows["x_seg"][b]).tolist()) - {0}):
            ci = np.nonzero(rows["cond_seg"][b] == s)[0]
            xi = np.nonzero(rows["x_seg"][b] == s)[0]
            pos = rows["cond_pos"][b, ci] if len(ci) else rows["x_pos"][b, xi]
            h, w = int(pos[:, 1].max()) + 1, int(pos[:, 2].max()) + 1
            if not len(ci) or len(ci) % (h * w) or len(xi) % (h * w):
                out.append(None)
                continue
            known = task is not None and task[b, s - 1] >= 0
            starts, q, dropped = split_items(len(ci) // (h * w),
                                             frames_of(task[b, s - 1]) if known else None)
            out.append(Episode(b, s, _unpatch(rows["cond"][b, ci], h, w, p),
                               _unpatch(rows["x"][b, xi], h, w, p), xi, h, w, starts, q,
                               dropped))
    return out


def _unpatch(tokens: np.ndarray, rows: int, cols: int, p: int) -> np.ndarray:
    """One episode's tokens [t*rows*cols, P] -> latent frames [t, rows*p, cols*p, C]."""
    t = len(tokens) // (rows * cols)
    return packing.unpatchify(np.asarray(tokens)[None], t, rows * p, cols * p, p)[0]


def null_row(packed: dict[str, np.ndarray], eps: list[Episode]) -> dict[str, np.ndarray]:
    """The CFG null branch of packed rows for ``eps``: each one's cond is a zero frame then its
    query (positions from 0), its target positions follow; other segments get no cond tokens
    (their predictions are not shown). Same shapes as ``packed``."""
    out = {k: np.array(v) for k, v in packed.items()}
    for k in ("cond", "cond_pos", "cond_seg"):
        out[k][:] = 0
    offset = [0] * len(packed["cond"])
    for e in eps:
        b, o, tc = e.row, offset[e.row], e.cond.shape[0]
        lq = tc - e.query_start
        n = (1 + lq) * e.rows * e.cols
        q = packed["cond"][b, packed["cond_seg"][b] == e.seg][-lq * e.rows * e.cols:]
        out["cond"][b, o + n - len(q):o + n] = q
        out["cond_pos"][b, o:o + n] = packing.grid_positions(1 + lq, e.rows, e.cols)
        out["cond_seg"][b, o:o + n] = e.seg
        out["x_pos"][b, e.x_idx, 0] += 1 + lq - tc
        offset[b] = o + n
    return out


# ---- the packed ODE sampler ---------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "out_sharding"))
def _sample_packed(graphdef, state, packed, null, noise, grid, cfg_scale, *, method,
                   out_sharding):
    model = nnx.merge(graphdef, state)

    def velocity(x, t):
        tt = jnp.full(packed.t.shape, t, jnp.float32)
        v = model.forward_packed(packed._replace(x=x, t=tt))
        if null is not None:  # classifier-free guidance: v_u + s (v_c - v_u)
            v_u = model.forward_packed(null._replace(x=x, t=tt))
            v = v_u + cfg_scale * (v - v_u)
        return v

    out = flow.integrate(velocity, noise, grid, method)
    if out_sharding is not None:
        out = jax.lax.with_sharding_constraint(out, out_sharding)
    return out


def sample_packed(model: nnx.Module, packed: dict[str, np.ndarray], noise: np.ndarray,
                  null: dict[str, np.ndarray] | None, *, cfg_scale: float = 1.0,
                  num_steps: int = 20, grid: str = "official", method: str = "euler",
                  shift: float = 1.0) -> np.ndarray:
    """Target tokens [B, Lx, P] integrated from ``noise`` (t = 0) to data (t = 1) for packed
    rows (numpy, equal on every process), every segment at the same t. ``null`` (same shapes)
    is the CFG null branch, used when given. Inputs are replicated over the model's mesh and
    the result too, so every process of a multi-host run makes the same calls and can read it.
    """
    flow.check_method(method)
    ts = flow.time_grid(num_steps, grid, shift)
    mesh = preview.module_mesh(model)
    args = preview.replicate(
        (packing.Packed(**packed), None if null is None else packing.Packed(**null), noise, ts,
         np.float32(cfg_scale)), mesh)
    graphdef, state = nnx.split(model)
    out = _sample_packed(graphdef, state, *args, method=method,
                         out_sharding=preview.replicated(mesh))
    return np.asarray(out)
