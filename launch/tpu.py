"""Cloud TPU launcher: a queued-resource slice (or several), the code on every worker, training.

  python -m launch.tpu submit --name=lavin-1b --tpu=v5p-128 --zone=us-east5-a --spot \
      --config=configs/lavin_dit.py:1b --workdir=gs://BUCKET/runs/1b [--num_slices=2] \
      [--dry_run] [-- --config.total_steps=100000]

``submit`` = ``up`` (create the queued resource, wait until ACTIVE, copy this checkout -- tracked
and untracked-not-ignored files -- to every worker, install requirements-tpu.txt into a Python 3.11
venv) + ``start`` (``python -m lavin_jax.train`` on all workers, detached, one log per worker) +
``logs`` (stream worker 0 until training exits) + ``collect`` (every worker's log to
WORKDIR/logs/) + ``down`` (delete the slice; ``--keep`` skips it). Each step is also its own
subcommand. A preempted (spot) run resumes from its newest Orbax checkpoint when the same
``submit`` is run again with the same ``--workdir``: an existing queued resource that is no longer
ACTIVE is deleted and created afresh.

Multislice (``--num_slices N``): one queued resource with N nodes NAME-0..N-1 over DCN; the
trainer gets ``--config.num_slices=N``. jax.distributed finds its peers from the TPU metadata;
the launcher sets JAX_COORDINATOR_ADDRESS (node 0 worker 0) so the trainer initialises it.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import tarfile
import tempfile
from collections.abc import Sequence

from launch import common

RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
           "v6e": "v2-alpha-tpuv6e"}
ACCELERATOR = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}
CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}  # what the slice name counts
COORDINATOR_PORT = 8476
CODE, VENV, LOGS = "~/lavin_jax", "~/lavin_venv", "~/lavin_logs"


def parse_tpu(name: str) -> tuple[str, int]:
    """``v5p-128`` / ``v5litepod-16`` / ``v6e-256`` -> (generation, number in the name)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise common.LaunchError(f"--tpu={name!r}: use e.g. v5p-128, v6e-256, v5e-16, v4-32")
    gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    return gen, int(m.group(2))


def hosts_per_slice(gen: str, n: int) -> int:
    chips = n // CORES_PER_CHIP[gen]
    return 1 if chips <= (8 if gen in ("v5e", "v6e") else 4) else chips // 4


class Slice:
    """gcloud commands for one queued resource (one or ``num_slices`` nodes)."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.gen, self.n = parse_tpu(a.tpu)
        self.accelerator = f"{ACCELERATOR[self.gen]}-{self.n}"
        self.multi = a.num_slices > 1
        self.node0 = f"{a.name}-0" if self.multi else a.name
        self.hosts = hosts_per_slice(self.gen, self.n) * a.num_slices

    def _where(self) -> list[str]:
        return [f"--zone={self.a.zone}"] + ([f"--project={self.a.project}"]
                                            if self.a.project else [])

    def qr(self, verb: str, *args: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", verb, self.a.name, *args,
                *self._where()]

    def create(self) -> list[str]:
        nodes = ([f"--node-count={self.a.num_slices}", f"--node-prefix={self.a.name}"]
                 if self.multi else [f"--node-id={self.a.name}"])
        kind = ["--spot"] if self.a.spot else ["--reserved"] if self.a.reserved else []
        return self.qr("create", f"--accelerator-type={self.accelerator}",
                       f"--runtime-version={self.a.runtime_version or RUNTIME[self.gen]}",
                       *nodes, *kind)

    def state(self) -> list[str]:
        return self.qr("describe", "--format=value(state.state)")

    def ssh(self, command: str, workers: str = "all") -> list[str]:
        nodes = "all" if workers == "all" else "0"
        return self.qr("ssh", f"--worker={workers}", f"--node={nodes}", f"--command={command}")

    def scp(self, local: str, remote: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", "scp", local,
                f"{self.a.name}:{remote}", "--worker=all", "--node=all", *self._where()]

    def worker0_ip(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.node0, *self._where(),
                "--format=value(networkEndpoints[0].ipAddress)"]


# ------------------------------------------------------------------------------------------
# Steps.


def pack_code(dest: str) -> int:
    """This checkout (tracked + untracked-not-ignored files) as a .tar.gz; returns the count."""
    files = common.source_files()
    with tarfile.open(dest, "w:gz") as tar:
        for f in files:
            tar.add(os.path.join(common.REPO, f), arcname=f)
    return len(files)


def setup_command() -> str:
    """On every worker: unpack the code, a Python 3.11 venv (uv), pinned TPU requirements."""
    return " && ".join([
        "set -e", f"rm -rf {CODE}", f"mkdir -p {CODE}", f"tar xzf ~/lavin_jax.tar.gz -C {CODE}",
        "python3 -m pip install -q --user uv",
        f"python3 -m uv venv -q --allow-existing --python 3.11 {VENV}",
        f"python3 -m uv pip install -q --python {VENV}/bin/python "
        f"-r {CODE}/requirements-tpu.txt",
    ])


def start_command(a: argparse.Namespace, sl: Slice, coordinator_ip: str) -> str:
    overrides = list(a.overrides)
    if (sl.multi and a.module == "lavin_jax.train"
            and not any(o.startswith("--config.num_slices") for o in overrides)):
        overrides.append(f"--config.num_slices={a.num_slices}")
    env = {**common.parse_env(a.env)}
    if sl.hosts > 1:
        env["JAX_COORDINATOR_ADDRESS"] = f"{coordinator_ip}:{COORDINATOR_PORT}"
    argv = common.train_argv(a.config, a.workdir, overrides, module=a.module)
    train = f"{VENV}/bin/python " + shlex.join(argv[1:])  # the ~ must stay unquoted
    return (f"cd {CODE} && mkdir -p {LOGS} && {common.env_prefix(env)}setsid nohup {train} "
            f"> {LOGS}/train-$(hostname).log 2>&1 < /dev/null & echo $! > {LOGS}/train.pid")


LOGS_COMMAND = (f"log={LOGS}/train-$(hostname).log; pid=$(cat {LOGS}/train.pid); "
                'if kill -0 "$pid" 2>/dev/null; then tail -n +1 -f --pid="$pid" "$log"; '
                'else cat "$log"; fi')


def up(r: common.Runner, a: argparse.Namespace, sl: Slice) -> None:
    state = r.run(sl.state(), check=False, capture=True).strip()
    if state and state != "ACTIVE":  # preempted / failed / suspended: start over
        r.say(f"# queued resource {a.name} is {state}: deleting it to create a fresh one")
        down(r, a, sl)
    if state != "ACTIVE":
        r.run(sl.create())
    r.wait_for(sl.state(), lambda s: s == "ACTIVE", f"{a.name} is ACTIVE",
               fail=lambda s: s in ("FAILED", "SUSPENDED"))
    tar = os.path.join(tempfile.gettempdir(), f"{a.name}-lavin_jax.tar.gz")
    if r.dry_run:
        r.say(f"# pack this checkout (git ls-files -co --exclude-standard) into {tar}")
    else:
        r.say(f"# packed {pack_code(tar)} files into {tar}")
    r.run(sl.scp(tar, "~/lavin_jax.tar.gz"))
    r.run(sl.ssh(setup_command()))


def start(r: common.Runner, a: argparse.Namespace, sl: Slice) -> None:
    multi_host = sl.hosts > 1
    if multi_host and not a.workdir.startswith("gs://"):
        raise common.LaunchError(f"--workdir={a.workdir}: {sl.hosts} hosts need a shared "
                                 "gs:// workdir for checkpoints")
    ip = r.run(sl.worker0_ip(), capture=True).strip() if multi_host else ""
    if multi_host and r.dry_run:
        r.say("# (dry run: WORKER0_IP below is the address the describe above prints)")
    r.run(sl.ssh(start_command(a, sl, ip or "WORKER0_IP")))


def logs(r: common.Runner, a: argparse.Namespace, sl: Slice) -> None:
    r.run(sl.ssh(LOGS_COMMAND, workers="0"), check=False)


def collect(r: common.Runner, a: argparse.Namespace, sl: Slice) -> None:
    if not a.workdir.startswith("gs://"):
        r.say(f"# logs stay on the workers in {LOGS}/ (collect needs a gs:// workdir)")
        return
    dest = a.workdir.rstrip("/") + "/logs/"
    r.run(sl.ssh(f"gcloud storage cp {LOGS}/train-*.log {shlex.quote(dest)}"), check=False)


def down(r: common.Runner, a: argparse.Namespace, sl: Slice) -> None:
    r.run(sl.qr("delete", "--force", "--quiet"))


def submit(r: common.Runner, a: argparse.Namespace, sl: Slice) -> None:
    up(r, a, sl)
    start(r, a, sl)
    if a.detach:
        r.say(f"# detached: python -m launch.tpu logs|collect|down --name={a.name} ...")
        return
    try:
        logs(r, a, sl)
        collect(r, a, sl)
    finally:
        if not a.keep:
            down(r, a, sl)


STEPS = {"submit": submit, "up": up, "start": start, "logs": logs, "collect": collect,
         "down": down}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n")[0])
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--name", required=True, help="queued resource (and node) name")
    p.add_argument("--tpu", required=True, help="slice type: v5p-128, v6e-256, v5e-16, v4-32")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="", help="default: gcloud's configured project")
    p.add_argument("--num_slices", type=int, default=1, help="multislice: slices over DCN")
    p.add_argument("--runtime_version", default="", help="default: by generation " + str(RUNTIME))
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    kind.add_argument("--reserved", action="store_true", help="your reservation")
    p.add_argument("--detach", action="store_true", help="submit: return after starting")
    p.add_argument("--keep", action="store_true", help="submit: keep the slice at the end")
    common.add_train_args(p, required=False)
    return p


def main(argv: Sequence[str] | None = None, out: io.TextIOBase | None = None) -> int:
    a = common.parse(parser(), argv)
    if a.num_slices < 1:
        raise common.LaunchError(f"--num_slices={a.num_slices} must be >= 1")
    if a.step in ("submit", "start", "collect") and not (a.config and a.workdir):
        raise common.LaunchError(f"{a.step} needs --config and --workdir")
    sl = Slice(a)
    STEPS[a.step](common.Runner(a.dry_run, out), a, sl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
