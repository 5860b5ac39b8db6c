"""Benchmarks: ``python -m lavin_jax.tools.bench {jdit,stvae,pipeline,train,copy} [flags]``.

Each subcommand prints one JSON object with its figures on its last line.
"""

import importlib
import sys

SUBCOMMANDS = {
    "jdit": "lavin_jax.tools.bench_jdit",
    "stvae": "lavin_jax.tools.bench_stvae",
    "pipeline": "lavin_jax.tools.bench_pipeline",
    "train": "lavin_jax.tools.bench_train",
    "copy": "lavin_jax.tools.bench_copy",
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
        sys.exit(f"usage: python -m lavin_jax.tools.bench {{{','.join(SUBCOMMANDS)}}} [flags]")
    from lavin_jax.run_config import ConfigError

    module = importlib.import_module(SUBCOMMANDS[argv[1]])
    try:
        module.main([argv[0]] + argv[2:])
    except ConfigError as e:  # its lines are the message, as the train binary prints them
        sys.exit(f"bench {argv[1]}: {e}")


if __name__ == "__main__":
    main(sys.argv)
