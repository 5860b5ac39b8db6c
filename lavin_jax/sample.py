"""Inference CLI: a task's context pairs from a template folder + query images -> predictions.

    python -m lavin_jax.sample --checkpoint=DIR --task_dir=template/depth_estimation \
        --query=a.png [--query=b.png ...] --output=out.png \
        [--num_pairs=4 --cfg_scale=1.5 --num_steps=20 --height=512 --width=512 --seed=0]
    python -m lavin_jax.sample --workdir=runs/demo [--step=N] [--vae_checkpoint=DIR] ...

Models: ``--checkpoint`` is a params checkpoint (``python -m lavin_jax.convert`` output) holding
"jdit" and, unless ``--vae_checkpoint`` names another one, "stvae". ``--workdir`` is a training
run: the J-DiT comes from WORKDIR/checkpoints/<step> (latest by default; EMA params when the run
keeps them, else the raw params) built from the run's stored config, the ST-VAE from
``--vae_checkpoint`` or else the run config's ``data.vae_checkpoint``; sampling defaults come
from the run config's ``sample`` block.
What it does (as the release's inference.py): ``--num_pairs`` pairs are drawn from the folder
(``<id>_input.png`` / ``<id>_target.png``; without replacement while there are enough, seeded),
every image is resized (bicubic) to height x width and encoded alone as a 1-frame clip (the
ST-VAE's posterior mean, tiled above its tile size), the queries are sampled in batches of
``--batch_size`` with the Euler / Heun ODE and classifier-free guidance, decoded (tiled), and
written as one PNG with a row per query: query | prediction (4 px black gaps, like
torchvision's make_grid). A JSON summary goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np
from etils import epath

from lavin_jax.data import template

DEFAULT_SAMPLE = {"num_steps": 20, "grid": "official", "method": "euler", "cfg_scale": 1.5,
                  "shift": 1.0}


# ---- models --------------------------------------------------------------------------------
def load_run(workdir: str | pathlib.Path, step: int | None = None, dtype: str | None = None):
    """(J-DiT module, run config dict, step, "ema" | "params") from a training run."""
    import jax
    from flax import nnx

    from lavin_jax import checkpoint
    from lavin_jax.models.jdit import JDiT, JDiTConfig
    from lavin_jax.train_checkpoint import restore_params

    made = {}

    def abstract_for(cfg: dict):
        model_cfg = dict(cfg.get("model") or {})
        if model_cfg.get("name") != "jdit":
            raise ValueError(f"--workdir={workdir} trains model {model_cfg.get('name')!r}, not "
                             "the J-DiT; point --workdir at a J-DiT run")
        if dtype:
            model_cfg["dtype"] = dtype
        jcfg = JDiTConfig.from_config(model_cfg)
        made["ctor"] = lambda: JDiT(jcfg, rngs=nnx.Rngs(0))
        with nnx.use_eager_sharding(False):
            tree = nnx.to_pure_dict(nnx.state(nnx.eval_shape(made["ctor"]), nnx.Param))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)

    try:
        params, cfg, step, which = restore_params(str(workdir), "model", abstract_for, step=step)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--workdir={workdir}: {e} (or give --checkpoint=DIR)") from None
    return checkpoint.module_from_params(made["ctor"], params), cfg, step, which


def load_models(args) -> tuple[Any, Any, dict, dict]:
    """(jdit, stvae, sample defaults, provenance) from the CLI arguments."""
    from lavin_jax import checkpoint

    over = {"dtype": args.dtype} if args.dtype else {}
    if bool(args.workdir) == bool(args.checkpoint):
        raise ValueError("give exactly one of --workdir=RUN_DIR or --checkpoint=PARAMS_DIR")
    if args.checkpoint:
        jdit = checkpoint.load_model(args.checkpoint, "jdit", **over)
        vae_dir = args.vae_checkpoint or args.checkpoint
        if not args.vae_checkpoint and "stvae" not in checkpoint.load_metadata(vae_dir)["items"]:
            raise ValueError(f"--checkpoint={args.checkpoint} holds no 'stvae'; pass "
                             "--vae_checkpoint=DIR (a params checkpoint with the ST-VAE)")
        sample, prov = {}, {"checkpoint": str(args.checkpoint)}
    else:
        jdit, cfg, step, which = load_run(args.workdir, args.step, args.dtype)
        vae_dir = args.vae_checkpoint or (cfg.get("data") or {}).get("vae_checkpoint", "")
        if not vae_dir or vae_dir == "toy":
            raise ValueError(f"--workdir={args.workdir}: the run config names no ST-VAE "
                             f"(data.vae_checkpoint={vae_dir!r}); pass --vae_checkpoint=DIR")
        sample = dict(cfg.get("sample") or {})
        prov = {"workdir": str(args.workdir), "step": step, "params": which}
    if not epath.Path(vae_dir).exists():
        raise FileNotFoundError(f"ST-VAE checkpoint {vae_dir} does not exist; fix "
                                "--vae_checkpoint")
    vae = checkpoint.load_model(vae_dir, "stvae")
    if vae.cfg.latent_channels != jdit.cfg.in_channels:
        raise ValueError(f"ST-VAE {vae_dir} has {vae.cfg.latent_channels} latent channels but "
                         f"the J-DiT expects {jdit.cfg.in_channels}")
    prov["vae_checkpoint"] = str(vae_dir)
    return jdit, vae, sample, prov


# ---- the pipeline ----------------------------------------------------------------------------
class Codec:
    """Jitted ST-VAE encode / decode between uint8 frames and normalised latents (tiled).

    ``sharding`` (e.g. NamedSharding(mesh, P("batch"))): inputs are split over its devices
    (the VAE must be replicated there, see :func:`replicate`)."""

    def __init__(self, vae, sharding=None):
        import jax
        from flax import nnx

        graphdef, self._state = nnx.split(vae)
        self.vae, self.sharding = vae, sharding
        self._enc = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
        self._dec = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))

    def encode(self, frames: np.ndarray, batch: int | None = None) -> np.ndarray:
        """uint8 [n, T, H, W, 3] -> normalised posterior means [n, T', h, w, C] float32.

        With ``batch``, runs in chunks of that many clips, the last one padded (one compiled
        shape per tile shape)."""
        def one(chunk):
            x = _put(chunk.astype(np.float32) / 127.5 - 1.0, self.sharding)
            mean, _ = self.vae.tiled_encode(x, encode_fn=lambda t: self._enc(self._state, t))
            return np.asarray(self.vae.normalize(mean), np.float32)

        return _chunked(one, frames, batch)

    def decode(self, z: np.ndarray, batch: int | None = None) -> np.ndarray:
        """Normalised latents [n, T', h, w, C] -> uint8 [n, T, H, W, 3] (chunked as encode)."""
        def one(chunk):
            x = self.vae.tiled_decode(self.vae.denormalize(_put(chunk, self.sharding)),
                                      decode_fn=lambda t: self._dec(self._state, t))
            return np.asarray(np.clip(np.rint((np.asarray(x) + 1.0) * 127.5), 0, 255), np.uint8)

        return _chunked(one, z, batch)


def _put(x: np.ndarray, sharding):
    import jax

    return x if sharding is None else jax.device_put(x, sharding)


def replicate(module, mesh):
    """``module`` with every variable replicated on ``mesh`` (data-parallel inference)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))


def _chunked(fn, x: np.ndarray, batch: int | None) -> np.ndarray:
    """fn over chunks of ``batch`` rows of x, the last chunk padded by repeating its last row."""
    if not batch:
        return fn(x)
    out = []
    for s in range(0, len(x), batch):
        rows = x[s:s + batch]
        idx = [min(i, len(rows) - 1) for i in range(batch)]
        out.append(fn(rows[idx])[:len(rows)])
    return np.concatenate(out)


def check_size(height: int, width: int, jdit, vae) -> None:
    m = vae.cfg.spatial_compression * jdit.cfg.patch_size
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % m:
            raise ValueError(f"--{name}={v} must be a positive multiple of {m} (ST-VAE "
                             f"{vae.cfg.spatial_compression}x times J-DiT patch "
                             f"{jdit.cfg.patch_size})")


def sample_targets(jdit, cond: np.ndarray, target_frames: int, *, seed: int,
                   first_index: int = 0, batch_size: int = 8, sharding=None,
                   **sample_kw) -> np.ndarray:
    """Target latents [B, target_frames, h, w, C] for cond [B, Tc, h, w, C].

    Row i starts from the noise of key fold_in(seed, first_index + i), so results do not
    depend on the batch size. Batches are padded to ``batch_size`` (one compiled shape) and
    split over ``sharding``'s devices when given (a multiple of their count).
    """
    import jax

    from lavin_jax import flow

    b, _, h, w, c = cond.shape
    out = []
    for s in range(0, b, batch_size):
        rows = cond[s:s + batch_size]
        n = len(rows)
        idx = [min(i, n - 1) for i in range(batch_size)]  # pad by repeating the last row
        keys = [jax.random.fold_in(jax.random.key(seed), first_index + s + i) for i in idx]
        noise = np.stack([jax.random.normal(k, (target_frames, h, w, c)) for k in keys])
        z = flow.sample_ode(jdit, _put(noise, sharding), _put(rows[idx], sharding), **sample_kw)
        out.append(np.asarray(z)[:n])
    return np.concatenate(out)


def make_grid(rows: list[list[np.ndarray]], pad: int = 4) -> np.ndarray:
    """uint8 [H, W, 3] tiles in rows -> one image with ``pad`` px black gaps and border."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.zeros((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), np.uint8)
    for i, r in enumerate(rows):
        for j, tile in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = tile
    return out


def choose_pairs(pairs: list[template.Pair], num: int, seed: int) -> list[template.Pair]:
    """``num`` pairs: distinct while the folder has enough, else drawn with replacement."""
    if num < 1:
        raise ValueError(f"--num_pairs={num} must be >= 1")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pairs), num, replace=num > len(pairs))
    return [pairs[i] for i in idx]


def run(args) -> dict[str, Any]:
    pairs = template.read_template(args.task_dir)
    if not args.query:
        raise ValueError("give at least one --query=IMAGE")
    for q in args.query:
        template.check_image(q, "query")
    t0 = time.time()
    jdit, vae, sample_cfg, prov = load_models(args)
    opts = {**DEFAULT_SAMPLE, **{k: v for k, v in sample_cfg.items() if k in DEFAULT_SAMPLE}}
    opts.update({k: getattr(args, k) for k in DEFAULT_SAMPLE if getattr(args, k) is not None})
    check_size(args.height, args.width, jdit, vae)
    size = (args.height, args.width)
    chosen = choose_pairs(pairs, args.num_pairs, args.seed)
    ctx_imgs = [template.load_image(p, size, "template image")
                for pr in chosen for p in (pr.input, pr.target)]
    queries = [template.load_image(q, size, "query") for q in args.query]
    codec = Codec(vae)
    n_ctx, bs = len(ctx_imgs), args.batch_size
    lat = codec.encode(np.stack(ctx_imgs + queries)[:, None], bs)  # every image alone, T = 1
    ctx_lat = lat[:n_ctx].reshape(1, n_ctx, *lat.shape[2:])  # [1, 2N, h, w, C] in pair order
    cond = np.concatenate([np.repeat(ctx_lat, len(queries), 0), lat[n_ctx:]], axis=1)
    z = sample_targets(jdit, cond, 1, seed=args.seed, batch_size=bs, **opts)
    preds = codec.decode(z, bs)[:, 0]
    grid = make_grid([[q, p] for q, p in zip(queries, preds)])
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(grid).save(out)
    return {"output": str(out), "shape": list(grid.shape), "queries": list(args.query),
            "pairs": [p.id for p in chosen], "seconds": round(time.time() - t0, 2),
            "sample": opts, **prov}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavin_jax.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="", help="training run directory (J-DiT run)")
    p.add_argument("--checkpoint", default="", help="params checkpoint (lavin_jax.convert)")
    p.add_argument("--step", type=int, default=None, help="run step (default: latest)")
    p.add_argument("--vae_checkpoint", default="", help="params checkpoint holding 'stvae'")
    p.add_argument("--task_dir", required=True, help="folder of <id>_input.png/_target.png")
    p.add_argument("--query", action="append", default=[], help="query image (repeatable)")
    p.add_argument("--output", required=True, help="output PNG (rows: query | prediction)")
    p.add_argument("--num_pairs", type=int, default=4, help="context pairs (release: 4)")
    p.add_argument("--cfg_scale", type=float, default=None, help="CFG scale (default 1.5)")
    p.add_argument("--num_steps", type=int, default=None, help="ODE time points (default 20)")
    p.add_argument("--grid", default=None, help="official | uniform | shifted")
    p.add_argument("--method", default=None, help="euler | heun")
    p.add_argument("--shift", type=float, default=None, help="time shift of the shifted grid")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="pair choice and noise")
    p.add_argument("--batch_size", type=int, default=8, help="queries per sampler call")
    p.add_argument("--dtype", default="", help="J-DiT compute dtype override (bfloat16, ...)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
