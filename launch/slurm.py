"""SLURM launcher for GPU clusters: a batch script from launch/slurm_template.sh, then sbatch.

  python -m launch.slurm --nodes=4 --gpus_per_node=8 --partition=gpu \
      --config=configs/lavin_dit.py:1b --workdir=/shared/runs/1b [--per=node] [--dry_run]

``--per=gpu`` (default): one process per GPU (tasks per node = GPUs per node); jax.distributed
gives each process the GPU of its SLURM_LOCALID. ``--per=node``: one process per node that drives
all of the node's GPUs (JAX_LOCAL_DEVICE_IDS lists them). Either way the trainer's auto-init reads
the coordinator, process count and id from SLURM. ``--requeue`` is set: a preempted job that SLURM
requeues resumes from the workdir's newest checkpoint (it must be on a shared filesystem or gs://).
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
from collections.abc import Sequence

from launch import common

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_template.sh")


def render(a: argparse.Namespace) -> str:
    """The batch script text for the parsed arguments."""
    per_gpu = a.per == "gpu"
    tasks = a.gpus_per_node if per_gpu else 1
    cpus = a.cpus_per_task or (8 if per_gpu else 8 * a.gpus_per_node)
    extra = [f"#SBATCH --{k}={v}" for k, v in (("partition", a.partition),
                                               ("account", a.account), ("qos", a.qos)) if v]
    extra += [] if per_gpu else ["#SBATCH --exclusive"]
    if per_gpu:
        process_env = "# one process per GPU: jax.distributed uses GPU $SLURM_LOCALID"
    else:
        ids = ",".join(str(i) for i in range(a.gpus_per_node))
        process_env = f"export JAX_LOCAL_DEVICE_IDS={ids}  # one process drives all local GPUs"
    env = common.parse_env(a.env)
    env_lines = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    train = shlex.join(common.train_argv(a.config, a.workdir, a.overrides, a.python, a.module))
    with open(TEMPLATE) as f:
        text = f.read()
    return text.format(
        job_name=a.job_name, nodes=a.nodes, tasks_per_node=tasks, gpus_per_node=a.gpus_per_node,
        cpus_per_task=cpus, time=a.time, log_dir=a.log_dir, extra_sbatch="\n".join(extra),
        repo=shlex.quote(common.REPO), setup=a.setup, process_env=process_env, env=env_lines,
        train=train)


def main(argv: Sequence[str] | None = None, out: io.TextIOBase | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n")[0])
    p.add_argument("--job_name", default="lavin_jax")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--per", choices=["gpu", "node"], default="gpu",
                   help="one process per GPU or per node")
    p.add_argument("--cpus_per_task", type=int, default=0, help="0 = 8 per GPU")
    p.add_argument("--time", default="48:00:00")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--setup", default="source .venv/bin/activate",
                   help="shell line before srun (venv with requirements.txt + jax[cuda12])")
    p.add_argument("--python", default="python")
    p.add_argument("--log_dir", default=os.path.join(common.REPO, "runs", "slurm"))
    p.add_argument("--script", default="", help="where to write the batch script "
                   "(default LOG_DIR/JOB_NAME.sbatch)")
    common.add_train_args(p)
    a = common.parse(p, argv)
    if a.nodes < 1 or a.gpus_per_node < 1:
        raise common.LaunchError("--nodes and --gpus_per_node must be >= 1")
    script = a.script or os.path.join(a.log_dir, f"{a.job_name}.sbatch")
    text = render(a)
    r = common.Runner(a.dry_run, out)
    if a.dry_run:
        r.say(f"# write {script}:")
        r.say(text.rstrip("\n"))
    else:
        os.makedirs(os.path.dirname(os.path.abspath(script)), exist_ok=True)
        os.makedirs(a.log_dir, exist_ok=True)
        with open(script, "w") as f:
            f.write(text)
        r.say(f"# wrote {script}")
    r.run(["sbatch", script])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
