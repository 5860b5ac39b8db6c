"""Prepare datasets and open them as random-access sources.

    python -m lavin_jax.data.prepare --dataset NAME --data_dir DIR [--config C] [--split S ...]

NAME is a registered source (lavin_jax/data/sources/__init__.py), optionally with a config as
"NAME/CONFIG" (e.g. synthetic_scenes/clips5_64). synthetic_scenes also takes --resolution,
--frames and --num_examples (cap every split; small runs get their own config name such as
"64_n20", so a capped set never stands in for the full one). TFDS prepares every split of a
config at once; --split names the splits to check afterwards (size + one decoded example).

Library: `load_source(name, data_dir, split)` -> random-access sequence of examples (a clear
FileNotFoundError naming the command above when not prepared); `ensure_prepared(...)` prepares
on first use, with a log line.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from lavin_jax.data.sources import get_source


def _split_name(name: str, config: str | None) -> tuple[str, str | None]:
    if "/" in name:
        name, from_name = name.split("/", 1)
        if config and config != from_name:
            raise ValueError(f"--dataset {name}/{from_name} and --config {config} disagree")
        config = from_name
    return name, config


def _is_builder(obj: Any) -> bool:
    import tensorflow_datasets as tfds

    return isinstance(obj, type) and issubclass(obj, tfds.core.DatasetBuilder)


def prepare_command(name: str, data_dir: str | Path, config: str | None = None) -> str:
    """The shell command that prepares a dataset (quoted in error messages)."""
    cfg = f" --config {config}" if config else ""
    return f"python -m lavin_jax.data.prepare --dataset {name}{cfg} --data_dir {data_dir}"


def make_builder(name: str, data_dir: str | Path, config: str | None = None, *,
                 resolution: int | None = None, frames: int | None = None,
                 num_examples: int | None = None, workers: int | None = None):
    """The TFDS builder of a registered builder-class source, with its config resolved."""
    if not data_dir:
        raise ValueError("data_dir is empty: pass --data_dir DIR (never the TFDS home default)")
    name, config = _split_name(name, config)
    cls = get_source(name)
    if not _is_builder(cls):
        raise ValueError(f"dataset {name!r} is not a TFDS builder class; use load_source/prepare")
    overrides = dict(resolution=resolution, frames=frames, num_examples=num_examples)
    if hasattr(cls, "make_config"):
        config = cls.make_config(config, **overrides)
    elif any(v is not None for v in overrides.values()):
        raise ValueError(f"dataset {name!r} takes --config only (no {list(overrides)})")
    kwargs = {"workers": workers} if workers and hasattr(cls, "make_config") else {}
    return cls(data_dir=str(data_dir), config=config, **kwargs)


def _config_name(builder) -> str | None:
    return builder.builder_config.name if builder.builder_config else None


def prepare(name: str, data_dir: str | Path, config: str | None = None, *,
            manual_dir: str | Path | None = None, **overrides):
    """Prepare a dataset (no-op when already prepared). Returns its builder or source object."""
    name, config = _split_name(name, config)
    src = get_source(name)
    if not _is_builder(src):
        if config or any(v is not None for v in overrides.values()):
            raise ValueError(f"dataset {name!r} has no configs or overrides to choose")
        src.prepare(data_dir, manual_dir=manual_dir)
        return src
    b = make_builder(name, data_dir, config, **overrides)
    if not b.is_prepared():
        t0 = time.time()
        b.download_and_prepare(file_format="array_record")
        logging.info("prepared %s/%s in %s (%.0f s)", name, _config_name(b), b.data_dir,
                     time.time() - t0)  # fmt: skip
    return b


def load_source(name: str, data_dir: str | Path, split: str, config: str | None = None,
                **overrides) -> Any:
    """A prepared split as a random-access sequence of examples (len, [i])."""
    name, config = _split_name(name, config)
    src = get_source(name)
    if not _is_builder(src):
        return src.open(data_dir, split)
    b = make_builder(name, data_dir, config, **overrides)
    if not b.is_prepared():
        raise FileNotFoundError(
            f"dataset {name}/{_config_name(b)} is not prepared in {data_dir}: run "
            f"`{prepare_command(name, data_dir, _config_name(b))}`"
        )
    if re.split(r"[\[+]", split)[0] not in b.info.splits:  # "train[:10%]" is fine too
        raise ValueError(f"dataset {name}/{_config_name(b)} has no split {split!r}; "
                         f"available: {', '.join(b.info.splits)}")  # fmt: skip
    return b.as_data_source(split=split)


def ensure_prepared(name: str, data_dir: str | Path, config: str | None = None, **overrides):
    """Prepare on first use (one log line), then return the builder / source object."""
    name, config = _split_name(name, config)
    src = get_source(name)
    if _is_builder(src):
        b = make_builder(name, data_dir, config, **overrides)
        if b.is_prepared():
            return b
        logging.info("dataset %s/%s not found in %s: preparing it now (first use)",
                     name, _config_name(b), data_dir)  # fmt: skip
        return prepare(name, data_dir, config, **overrides)
    try:
        src.open(data_dir, src.splits[0])
        return src
    except FileNotFoundError:
        logging.info("dataset %s not found in %s: preparing it now (first use)", name, data_dir)
        return prepare(name, data_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lavin_jax.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="NAME or NAME/CONFIG")
    p.add_argument("--data_dir", required=True, help="TFDS data directory")
    p.add_argument("--config", default=None, help="builder config, e.g. 64 or clips5_64")
    p.add_argument("--split", nargs="*", default=None, help="splits to check afterwards")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="clip length, 1 + 4k")
    p.add_argument("--num_examples", type=int, default=None, help="cap every split (small runs)")
    p.add_argument("--workers", type=int, default=None, help="render processes")
    p.add_argument("--manual_dir", default=None, help="manually downloaded files, if needed")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = dict(resolution=a.resolution, frames=a.frames, num_examples=a.num_examples)
    try:
        name, config = _split_name(a.dataset, a.config)
        if _is_builder(get_source(name)):
            out = prepare(name, a.data_dir, config, workers=a.workers, **overrides)
            config = _config_name(out)
            splits = a.split if a.split is not None else list(out.info.splits)
        else:
            prepare(name, a.data_dir, config, manual_dir=a.manual_dir, **overrides)
            splits = a.split or []
        for s in splits:
            src = load_source(name, a.data_dir, s, config)
            ex = src[0] if len(src) else {}
            keys = ", ".join(f"{k} {getattr(v, 'shape', ())}" for k, v in ex.items())
            print(f"{name}/{config or ''} {s}: {len(src)} examples; {keys}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
