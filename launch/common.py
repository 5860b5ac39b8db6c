"""Plumbing shared by the launchers: commands as argv lists, dry runs, the training command.

Every launcher builds plain argv lists and hands them to a :class:`Runner`. With ``--dry_run``
the runner prints each command (``$ ...``, shell-quoted, copy-pasteable) and runs nothing, so the
printed text is exactly what a real run executes; tests/test_launch.py checks it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(SystemExit):
    """A bad launcher argument: one line naming the flag and the fix (exit status 2)."""

    def __init__(self, message: str):
        super().__init__(f"launch: {message}")


class Runner:
    """Runs (or, dry, only prints) commands; every command is echoed first."""

    def __init__(self, dry_run: bool, out: TextIO | None = None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, cmd: Sequence[str], *, check: bool = True, capture: bool = False,
            stdin: str | None = None) -> str:
        self.say("$ " + shlex.join(cmd))
        if self.dry_run:
            return ""
        res = subprocess.run(list(cmd), check=check, text=True, input=stdin,
                             stdout=subprocess.PIPE if capture else None)
        return res.stdout or ""

    def wait_for(self, cmd: Sequence[str], done: Callable[[str], bool], what: str, *,
                 fail: Callable[[str], bool] = lambda s: False, every_s: float = 30,
                 timeout_s: float = 7 * 24 * 3600) -> str:
        """Polls ``cmd`` until ``done(stdout)``; raises when ``fail(stdout)`` or on timeout."""
        self.say(f"# poll every {every_s:.0f} s until {what}:")
        self.say("$ " + shlex.join(cmd))
        if self.dry_run:
            return ""
        start = time.time()
        while True:
            out = subprocess.run(list(cmd), text=True, stdout=subprocess.PIPE).stdout.strip()
            if done(out):
                return out
            if fail(out):
                raise LaunchError(f"gave up waiting for {what}: state {out!r}")
            if time.time() - start > timeout_s:
                raise LaunchError(f"timed out waiting for {what} (last state {out!r})")
            time.sleep(every_s)


def add_train_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Flags every launcher shares: what to train, where, and how to print instead of run."""
    p.add_argument("--config", required=required,
                   help="config file and variant as lavin_jax.train takes it, "
                        "e.g. configs/lavin_dit.py:1b")
    p.add_argument("--workdir", required=required,
                   help="run directory; the run resumes from its newest checkpoint (gs:// for "
                        "multi-host: every host must see it)")
    p.add_argument("--module", default="lavin_jax.train",
                   help="python -m MODULE to run (lavin_jax.encode builds the latent cache)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the training processes (repeatable)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the exact commands and files, run nothing")
    p.epilog = ("Flags after a lone -- go to lavin_jax.train unchanged, e.g. "
                "-- --config.total_steps=10 --config.mesh.tensor=4")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the launcher's flags; everything after ``--`` lands in ``.overrides``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    a.overrides = argv[cut + 1:]
    return a


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise LaunchError(f"--env {item!r}: use KEY=VALUE")
        env[key] = value
    return env


def train_argv(config: str, workdir: str, overrides: Sequence[str], python: str = "python3",
               module: str = "lavin_jax.train") -> list[str]:
    """``python -m lavin_jax.train --config=... --workdir=... [overrides]``."""
    for o in overrides:
        if not o.startswith("--"):
            raise LaunchError(f"training override {o!r}: pass flags like --config.total_steps=10")
    return [python, "-m", module, f"--config={config}", f"--workdir={workdir}", *overrides]


def env_prefix(env: dict[str, str]) -> str:
    """``K=V K2=V2 `` (shell-quoted) for one command line, or ``""``."""
    return "".join(f"{k}={shlex.quote(v)} " for k, v in sorted(env.items()))


def source_files(repo: str = REPO) -> list[str]:
    """Files that travel to the workers: tracked + untracked-but-not-ignored (local edits too)."""
    out = subprocess.run(["git", "-C", repo, "ls-files", "-co", "--exclude-standard"],
                         check=True, text=True, stdout=subprocess.PIPE).stdout
    return [f for f in out.splitlines() if f and os.path.isfile(os.path.join(repo, f))]
