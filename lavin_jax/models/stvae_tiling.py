"""Tiled encode/decode for the ST-VAE: overlapping tiles, linear-ramp blended seams.

The scheme follows the released one. Space: tiles of ``tile`` (input units) start every
``tile * (1 - overlap)``; each output tile is blended with its already-blended upper and left
neighbours over ``blend`` output pixels (linear ramp), then cropped to the stride. Time: chunks
of ``frames`` overlap by one frame (1 + 4k structure); the first output frame of every chunk
but the first is dropped, no blending.

Tiles see only their own pixels and compute GroupNorm statistics over themselves, so tiled
output approximates the untiled one (tests/test_stvae.py states the tolerance); an input that
fits in one tile (per axis) is passed through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _starts(n: int, tile: int, stride: int) -> list[int]:
    return [0] if n <= tile else list(range(0, n, stride))


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """Ramps b's first ``extent`` rows along ``axis`` from a's last rows into b's own."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = e
    w = (jnp.arange(e, dtype=jnp.float32) / e).reshape(shape)
    a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - e, a.shape[axis], axis=axis)
    b_head = jax.lax.slice_in_dim(b, 0, e, axis=axis)
    mixed = (a_tail.astype(jnp.float32) * (1 - w) + b_head.astype(jnp.float32) * w).astype(b.dtype)
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, e, b.shape[axis], axis=axis)], axis)


def tile_2d(fn: Callable[[jax.Array], jax.Array], x: jax.Array, *, tile: int, stride: int,
            blend: int, keep: int) -> jax.Array:
    """Applies ``fn`` ([B, T, h, w, C] -> [B, T', h', w', C']) on overlapping H/W tiles of x.

    ``tile``/``stride`` are in input pixels; ``blend``/``keep`` (the cropped tile size, = stride
    times the scale) in output pixels. An axis no larger than ``tile`` is not split.
    """
    hs = _starts(x.shape[2], tile, stride)
    ws = _starts(x.shape[3], tile, stride)
    done: list[list[jax.Array]] = []
    out_rows = []
    for i, y0 in enumerate(hs):
        row, crops = [], []
        for j, x0 in enumerate(ws):
            t = fn(x[:, :, y0:y0 + tile, x0:x0 + tile])
            if i > 0:
                t = _blend(done[i - 1][j], t, blend, axis=2)
            if j > 0:
                t = _blend(row[j - 1], t, blend, axis=3)
            row.append(t)  # the blended tile is what later neighbours blend from
            t = t[:, :, :keep] if len(hs) > 1 else t
            crops.append(t[:, :, :, :keep] if len(ws) > 1 else t)
        done.append(row)
        out_rows.append(jnp.concatenate(crops, axis=3))
    return jnp.concatenate(out_rows, axis=2)


def tile_time(fn: Callable[[jax.Array], jax.Array], x: jax.Array, frames: int) -> jax.Array:
    """Applies ``fn`` on chunks of ``frames`` frames that share one boundary frame."""
    t = x.shape[1]
    if t <= frames:
        return fn(x)
    outs = []
    for k, s in enumerate(range(0, t, frames - 1)):
        if k > 0 and s + 1 >= t:  # a lone trailing frame is already covered
            break
        y = fn(x[:, s:s + frames])
        outs.append(y if k == 0 else y[:, 1:])
    return jnp.concatenate(outs, axis=1)


def tiled_encode(fn: Callable[[jax.Array], jax.Array], x: jax.Array, *, tile: int, frames: int,
                 overlap: float, spatial: int) -> jax.Array:
    """x [B, T, H, W, 3] -> fn's output tiled (H, W multiples of ``spatial``)."""
    if x.shape[2] % spatial or x.shape[3] % spatial:
        raise ValueError(f"tiled_encode: H, W = {x.shape[2:4]} must be multiples of the spatial "
                         f"compression {spatial}")
    lat = tile // spatial
    blend = int(lat * overlap)
    stride = tile - int(tile * overlap)
    f2d = lambda c: tile_2d(fn, c, tile=tile, stride=stride, blend=blend, keep=lat - blend)
    return tile_time(f2d, x, frames)


def tiled_decode(fn: Callable[[jax.Array], jax.Array], z: jax.Array, *, tile: int, frames: int,
                 overlap: float, spatial: int) -> jax.Array:
    """z [B, T', H', W', C] -> fn's output tiled; ``tile``/``frames`` in latent units."""
    blend = int(tile * spatial * overlap)
    stride = tile - int(tile * overlap)
    f2d = lambda c: tile_2d(fn, c, tile=tile, stride=stride, blend=blend,
                            keep=tile * spatial - blend)
    return tile_time(f2d, z, frames)
