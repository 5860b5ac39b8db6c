"""``python -m lavin_jax.convert --dit PATH [--vae PATH] --out DIR``.

Converts the released weights into one params checkpoint (lavin_jax/checkpoint.py) holding
the model(s) given and their configs; ``checkpoint.load_model(DIR, "jdit")`` restores them.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from absl import app, flags

from lavin_jax import checkpoint
from lavin_jax.convert import jdit as jdit_convert

RS = jdit_convert.RELEASE_SHAPE
FLAGS = flags.FLAGS
flags.DEFINE_string("dit", None, "official J-DiT .safetensors (e.g. weights/lavin_dit.safetensors)")
flags.DEFINE_string("vae", None, "official ST-VAE checkpoint (e.g. weights/stvae.pt)")
flags.DEFINE_string("out", None, "output directory (must not hold a checkpoint yet)")
flags.DEFINE_integer("hidden_size", RS["hidden_size"], "J-DiT hidden size")
flags.DEFINE_integer("depth", RS["depth"], "J-DiT number of blocks")
flags.DEFINE_integer("num_heads", RS["num_heads"], "J-DiT attention heads")
flags.DEFINE_integer("kv_group", RS["kv_group"], "J-DiT query heads per kv head")
flags.DEFINE_integer("patch_size", RS["patch_size"], "J-DiT patch size")
flags.DEFINE_integer("in_channels", RS["in_channels"], "latent channels")
flags.DEFINE_string("param_dtype", "float32", "stored parameter dtype (float32 | bfloat16)")


def _config_dict(model) -> dict:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return {}
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.out:
        raise app.UsageError("--out DIR is required")
    if not (FLAGS.dit or FLAGS.vae):
        raise app.UsageError("give --dit PATH and/or --vae PATH")
    params, configs, sources = {}, {}, {}
    if FLAGS.dit:
        cfg = jdit_convert.make_config(
            hidden_size=FLAGS.hidden_size, depth=FLAGS.depth, num_heads=FLAGS.num_heads,
            kv_group=FLAGS.kv_group, patch_size=FLAGS.patch_size, in_channels=FLAGS.in_channels,
            param_dtype=FLAGS.param_dtype,
        )
        sd = jdit_convert.read_safetensors(FLAGS.dit)
        try:
            params["jdit"] = jdit_convert.jdit_params_from_state_dict(sd, cfg)
        except ValueError as e:
            raise app.UsageError(f"--dit {FLAGS.dit}: {e}") from None
        configs["jdit"] = dataclasses.asdict(cfg)
        sources["jdit"] = FLAGS.dit
        logging.info("J-DiT: %d tensors from %s", len(sd), FLAGS.dit)
        del sd
    if FLAGS.vae:
        from flax import nnx

        from lavin_jax.convert.stvae import load_official_stvae

        vae = load_official_stvae(FLAGS.vae)
        params["stvae"] = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
        configs["stvae"] = _config_dict(vae)
        sources["stvae"] = FLAGS.vae
    path = checkpoint.save_params(FLAGS.out, params, {"configs": configs, "sources": sources})
    print(json.dumps({"out": str(path), "items": sorted(params)}))


if __name__ == "__main__":
    app.run(main)
