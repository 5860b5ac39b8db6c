"""Online mode (``data.mode = "online"``): the pipeline packs pixels, the train step encodes them.

For small runs without a latent cache. Image tasks only (every item is one frame, so one pixel
frame = one latent frame). A packed row carries, per configured resolution k, a frame buffer
``pix_k`` uint8 [F_k, H_k, W_k, 3] (F_k = (Lc + Lx) // tokens per frame: room for any row) and,
instead of tokens, ``cond_src`` [Lc] / ``x_src`` [Lx]: for each token slot the row of the token
table it takes, the table being every buffer's frames encoded, patchified and concatenated in k
order, plus one zero row at the end (padding, and the CFG null context's zero latent frame).
Positions, segment ids and ``t`` are exactly the latent mode's.

Inside the jitted step, :func:`to_packed` with the frozen VAE (``encode_fn``) gives the Packed
batch the loss takes: ``flow.packed_loss(model, online.to_packed(batch, encode_fn, p), rng)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lavin_jax import packing
from lavin_jax.data import packer


def tokens_per_frame(latent_shape: Callable, res: tuple[int, int], patch: int) -> int:
    lh, lw = latent_shape(1, *res)[1:3]
    return (lh // patch) * (lw // patch)


def pixel_item(items: Sequence[np.ndarray], res_k: int, latent_shape: Callable, patch: int,
               drop: bool, **meta: Any) -> dict[str, Any]:
    """Rendered image items [in_1, tgt_1, ..., query_in, query_tgt] (each [1, H, W, 3]) -> a
    packable pixel item. ``drop``: the null context (a zero latent frame, then the query)."""
    frames = [np.asarray(it[0], np.uint8) for it in items]
    h, w = frames[0].shape[:2]
    _, lh, lw, _ = latent_shape(1, h, w)
    rows, cols = lh // patch, lw // patch
    if drop:
        pix, cond_map = frames[-2:], [-1, 0]
    else:
        pix, cond_map = frames, list(range(len(frames) - 1))
    tc = len(cond_map)
    return {
        "pix": np.stack(pix), "res": res_k, "cond_map": cond_map, "x_map": [len(pix) - 1],
        "cond_pos": packing.grid_positions(tc, rows, cols),
        "x_pos": packing.grid_positions(1, rows, cols, frame_offset=tc),
        "nc": tc * rows * cols, "nx": rows * cols, "tpf": rows * cols,
        **{k: int(v) for k, v in meta.items()},
    }


class OnlineAssembler:
    """Items -> one online row (see the module docstring). ``resolutions`` [(H, W)] in config
    order; ``tpf`` their tokens per frame."""

    def __init__(self, spec: packer.RowSpec, resolutions: Sequence[tuple[int, int]],
                 tpf: Sequence[int]):
        self.spec, self.res, self.tpf = spec, list(resolutions), list(tpf)
        total = spec.cond_len + spec.target_len
        self.cap = [total // t for t in self.tpf]  # frames that could ever share a row
        self.offset = np.cumsum([0] + [c * t for c, t in zip(self.cap, self.tpf)]).tolist()
        self.zero = self.offset[-1]  # the table's zero row

    def __call__(self, items: Sequence[dict]) -> dict[str, np.ndarray]:
        spec = self.spec
        row = packer.empty_row(spec)
        del row["cond"], row["x"]
        row.update({f"pix_{k}": np.zeros((c, *r, 3), np.uint8)
                    for k, (c, r) in enumerate(zip(self.cap, self.res))})
        row["cond_src"] = np.full((spec.cond_len,), self.zero, np.int32)
        row["x_src"] = np.full((spec.target_len,), self.zero, np.int32)
        used = [0] * len(self.res)
        oc = ox = 0
        for s, it in enumerate(items, start=1):
            k, t = it["res"], it["tpf"]
            n = len(it["pix"])
            row[f"pix_{k}"][used[k]:used[k] + n] = it["pix"]
            first = self.offset[k] + used[k] * t  # table row of this episode's first token
            used[k] += n

            def src(fmap, first=first, t=t):
                return np.concatenate([np.full(t, self.zero) if f < 0 else
                                       first + f * t + np.arange(t) for f in fmap])

            nc, nx = it["nc"], it["nx"]
            row["cond_src"][oc:oc + nc] = src(it["cond_map"])
            row["x_src"][ox:ox + nx] = src(it["x_map"])
            row["cond_pos"][oc:oc + nc], row["x_pos"][ox:ox + nx] = it["cond_pos"], it["x_pos"]
            row["cond_seg"][oc:oc + nc], row["x_seg"][ox:ox + nx] = s, s
            row["seg_task"][s - 1] = it.get("task_id", -1)
            row["seg_episode"][s - 1] = it.get("index", -1)
            oc, ox = oc + nc, ox + nx
        return row


def to_packed(batch: dict[str, Any], encode_fn: Callable, patch: int) -> packing.Packed:
    """Jit-able: an online batch -> packing.Packed with encoded tokens.

    ``encode_fn(x uint8 [n, 1, H, W, 3]) -> normalised latents [n, 1, h, w, C]`` (the frozen
    ST-VAE's posterior mean; wrap it in stop_gradient).
    """
    import jax.numpy as jnp

    tables = []
    for k in range(len([key for key in batch if key.startswith("pix_")])):
        pix = batch[f"pix_{k}"]
        b, f = pix.shape[:2]
        z = encode_fn(pix.reshape(b * f, 1, *pix.shape[2:]))
        tok = packing.patchify(z, patch)  # [b*f, tokens per frame, P]
        tables.append(tok.reshape(b, -1, tok.shape[-1]))
    tables.append(jnp.zeros((tables[0].shape[0], 1, tables[0].shape[-1]), tables[0].dtype))
    table = jnp.concatenate(tables, axis=1)
    cond = jnp.take_along_axis(table, batch["cond_src"][..., None], axis=1)
    x = jnp.take_along_axis(table, batch["x_src"][..., None], axis=1)
    return packing.Packed(cond, x, batch["cond_pos"], batch["x_pos"], batch["cond_seg"],
                          batch["x_seg"], batch["t"])
