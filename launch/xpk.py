"""GKE launcher: the training job as an XPK workload (JobSet on TPU node pools).

  python -m launch.xpk create --cluster=my-cluster --workload=lavin-1b --tpu=v5p-128 \
      --docker_image=us-docker.pkg.dev/PROJECT/REPO/lavin_jax:TAG \
      --config=configs/lavin_dit.py:1b --workdir=gs://BUCKET/runs/1b [--num_slices=2] [--dry_run]

The image holds the code and ``requirements-tpu.txt`` (launch/Dockerfile builds one); or pass
``--base_docker_image`` and XPK layers this checkout (``--script-dir``) on top of it. GKE sets the
TPU worker and multislice (MEGASCALE_*) variables, so the trainer's jax.distributed auto-init
finds its peers. ``--max_restarts`` lets JobSet restart a preempted or failed workload; each
restart resumes from the newest Orbax checkpoint in the (gs://) workdir.
Other steps: ``wait`` (until the workload finishes), ``delete``.
"""

from __future__ import annotations

import argparse
import io
import shlex
from collections.abc import Sequence

from launch import common
from launch.tpu import ACCELERATOR, parse_tpu


def xpk_tpu_type(tpu: str) -> str:
    gen, n = parse_tpu(tpu)
    return f"{ACCELERATOR[gen]}-{n}"


def _where(a: argparse.Namespace) -> list[str]:
    out = [f"--cluster={a.cluster}"]
    out += [f"--project={a.project}"] if a.project else []
    out += [f"--zone={a.zone}"] if a.zone else []
    return out


def create_command(a: argparse.Namespace) -> list[str]:
    if not a.workdir.startswith("gs://"):
        raise common.LaunchError(f"--workdir={a.workdir}: GKE pods need a gs:// workdir")
    if bool(a.docker_image) == bool(a.base_docker_image):
        raise common.LaunchError("give exactly one of --docker_image (code baked in) or "
                                 "--base_docker_image (XPK adds this checkout)")
    overrides = list(a.overrides)
    if (a.num_slices > 1 and a.module == "lavin_jax.train"
            and not any(o.startswith("--config.num_slices") for o in overrides)):
        overrides.append(f"--config.num_slices={a.num_slices}")
    train = common.env_prefix(common.parse_env(a.env)) + shlex.join(
        common.train_argv(a.config, a.workdir, overrides, module=a.module))
    image = ([f"--docker-image={a.docker_image}"] if a.docker_image else
             [f"--base-docker-image={a.base_docker_image}", f"--script-dir={common.REPO}"])
    return ["xpk", "workload", "create", f"--workload={a.workload}", *_where(a),
            f"--tpu-type={xpk_tpu_type(a.tpu)}", f"--num-slices={a.num_slices}", *image,
            f"--max-restarts={a.max_restarts}", f"--priority={a.priority}",
            f"--command={train}"]


def main(argv: Sequence[str] | None = None, out: io.TextIOBase | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.xpk", description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["create", "wait", "delete"])
    p.add_argument("--cluster", required=True, help="XPK/GKE cluster with TPU node pools")
    p.add_argument("--workload", required=True, help="workload (JobSet) name")
    p.add_argument("--tpu", default="", help="slice type per slice: v5p-128, v6e-256, v5e-16")
    p.add_argument("--num_slices", type=int, default=1)
    p.add_argument("--project", default="")
    p.add_argument("--zone", default="")
    p.add_argument("--docker_image", default="", help="image with code + requirements-tpu")
    p.add_argument("--base_docker_image", default="", help="image with requirements-tpu only")
    p.add_argument("--max_restarts", type=int, default=10, help="JobSet restarts (preemption)")
    p.add_argument("--priority", default="medium",
                   choices=["very-low", "low", "medium", "high", "very-high"])
    common.add_train_args(p, required=False)
    a = common.parse(p, argv)
    r = common.Runner(a.dry_run, out)
    if a.step == "create":
        if not (a.config and a.workdir and a.tpu):
            raise common.LaunchError("create needs --tpu, --config and --workdir")
        if a.num_slices < 1:
            raise common.LaunchError(f"--num_slices={a.num_slices} must be >= 1")
        r.run(create_command(a))
        r.say(f"# logs: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name={a.workload} "
              "--max-log-requests=1000 --prefix")
    elif a.step == "wait":
        r.run(["xpk", "workload", "list", *_where(a),
               f"--wait-for-job-completion={a.workload}"], check=False)
    else:
        r.run(["xpk", "workload", "delete", f"--workload={a.workload}", *_where(a)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
