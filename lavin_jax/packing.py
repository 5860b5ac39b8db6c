"""The J-DiT's packed input and the conversions between latents and tokens.

A packed row holds one or more episodes (segments). Both streams are packed in parallel:
  cond tokens [B, Lc, p*p*C] and target tokens [B, Lx, p*p*C],
  integer (t, h, w) positions per token [B, L, 3], segment ids per token [B, L] (0 = padding),
  and one timestep per segment t [B, S] (segment s uses t[:, s - 1]).
Token features are laid out (ph, pw, C), the official order.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Packed(NamedTuple):
    cond: jax.Array  # [B, Lc, P]
    x: jax.Array  # [B, Lx, P]
    cond_pos: jax.Array  # [B, Lc, 3] int32
    x_pos: jax.Array  # [B, Lx, 3] int32
    cond_seg: jax.Array  # [B, Lc] int32, 0 = padding
    x_seg: jax.Array  # [B, Lx] int32, 0 = padding
    t: jax.Array  # [B, S] float


def patchify(z: jax.Array, p: int) -> jax.Array:
    """[B, T, h, w, C] -> [B, T*(h/p)*(w/p), p*p*C] tokens in (t, row, col) order."""
    b, t, h, w, c = z.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size={p}")
    z = z.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return z.reshape(b, t * (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, t: int, h: int, w: int, p: int) -> jax.Array:
    """Inverse of :func:`patchify`: [B, t*(h/p)*(w/p), p*p*C] -> [B, t, h, w, C]."""
    b, _, f = tokens.shape
    c = f // (p * p)
    z = tokens.reshape(b, t, h // p, w // p, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return z.reshape(b, t, h, w, c)


def grid_positions(frames: int, rows: int, cols: int, frame_offset: int = 0) -> np.ndarray:
    """(t, h, w) integer positions [frames*rows*cols, 3] in token order."""
    tt, hh, ww = np.meshgrid(
        np.arange(frames) + frame_offset, np.arange(rows), np.arange(cols), indexing="ij"
    )
    return np.stack([tt, hh, ww], axis=-1).reshape(-1, 3).astype(np.int32)


def pack_latents(
    x: jax.Array,
    t: jax.Array,
    cond: jax.Array,
    patch_size: int,
    cond_frames: jax.Array | None = None,
) -> Packed:
    """One episode per row: x [B, Tx, h, w, C], t [B], cond [B, Tc, h, w, C].

    ``cond_frames`` [B] (optional) keeps only the first n cond frames of each row real; the rest
    become padding (segment 0). Positions follow the official model: cond frames 0..Tc-1, target
    frames after the row's real cond frames.
    """
    b, tx, h, w, _ = x.shape
    tc = cond.shape[1]
    rows, cols = h // patch_size, w // patch_size
    per = rows * cols
    cond_tok, x_tok = patchify(cond, patch_size), patchify(x, patch_size)
    cond_pos = jnp.broadcast_to(jnp.asarray(grid_positions(tc, rows, cols)), (b, tc * per, 3))
    x_pos = jnp.broadcast_to(jnp.asarray(grid_positions(tx, rows, cols)), (b, tx * per, 3))
    if cond_frames is None:
        cond_seg = jnp.ones((b, tc * per), jnp.int32)
        x_pos = x_pos + jnp.array([tc, 0, 0], jnp.int32)
    else:
        frame = jnp.arange(tc * per) // per
        cond_seg = (frame[None] < cond_frames[:, None]).astype(jnp.int32)
        x_pos = x_pos.at[..., 0].add(cond_frames[:, None].astype(jnp.int32))
    x_seg = jnp.ones((b, tx * per), jnp.int32)
    return Packed(cond_tok, x_tok, cond_pos, x_pos, cond_seg, x_seg, t.reshape(b, 1))
