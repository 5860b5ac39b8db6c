"""Launchers' --dry_run output: the exact commands for a few topologies (nothing is run)."""

import io
import shlex

import pytest

from launch import common, slurm, tpu, xpk


@pytest.fixture(autouse=True)
def _no_real_commands(monkeypatch):
    """A dry run must never execute anything (gcloud may well be installed and logged in)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a launcher tried to run {args[0] if args else kwargs}")

    monkeypatch.setattr(common.subprocess, "run", refuse)


def _dry(main, *argv: str) -> list[str]:
    out = io.StringIO()
    assert main(["--dry_run", *argv], out=out) == 0
    return out.getvalue().splitlines()


def _commands(lines: list[str]) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in lines if line.startswith("$ ")]


def _remote(cmd: list[str]) -> str:
    return next(a for a in cmd if a.startswith("--command="))[len("--command="):]


def test_tpu_single_slice_v5p_spot_full_cycle():
    cmds = _commands(_dry(tpu.main, "submit", "--name=lavin-1b", "--tpu=v5p-128",
                          "--zone=us-east5-a", "--project=proj", "--spot",
                          "--config=configs/lavin_dit.py:1b", "--workdir=gs://bkt/runs/1b",
                          "--", "--config.total_steps=100"))
    verbs = [c[4] for c in cmds]
    assert verbs == ["describe", "create", "describe", "scp", "ssh", "describe", "ssh", "ssh",
                     "ssh", "delete"]
    create = cmds[1]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "lavin-1b"]
    for flag in ("--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5",
                 "--node-id=lavin-1b", "--spot", "--zone=us-east5-a", "--project=proj"):
        assert flag in create
    assert cmds[3][5:7] == [cmds[3][5], "lavin-1b:~/lavin_jax.tar.gz"]
    assert "--worker=all" in cmds[3] and "--node=all" in cmds[3]
    assert "requirements-tpu.txt" in _remote(cmds[4]) and "--python 3.11" in _remote(cmds[4])
    assert cmds[5][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]  # worker 0's IP
    start = _remote(cmds[6])
    assert ("~/lavin_venv/bin/python -m lavin_jax.train --config=configs/lavin_dit.py:1b "
            "--workdir=gs://bkt/runs/1b --config.total_steps=100 >") in start
    assert "JAX_COORDINATOR_ADDRESS=WORKER0_IP:8476" in start and "num_slices" not in start
    assert "--worker=0" in cmds[7] and "tail" in _remote(cmds[7])  # stream worker 0
    assert "gs://bkt/runs/1b/logs/" in _remote(cmds[8])  # collect every worker's log
    assert cmds[9][4:] == ["delete", "lavin-1b", "--force", "--quiet", "--zone=us-east5-a",
                           "--project=proj"]


def test_tpu_multislice_v6e_reserved_keep():
    cmds = _commands(_dry(tpu.main, "submit", "--name=big", "--tpu=v6e-256", "--num_slices=2",
                          "--zone=europe-west4-a", "--reserved", "--keep",
                          "--config=configs/lavin_dit.py:3.4b", "--workdir=gs://b/3b",
                          "--env", "LIBTPU_INIT_ARGS=--xla_tpu_x=1"))
    create = next(c for c in cmds if c[4] == "create")
    for flag in ("--accelerator-type=v6e-256", "--runtime-version=v2-alpha-tpuv6e",
                 "--node-count=2", "--node-prefix=big", "--reserved"):
        assert flag in create
    assert not any(c[4] == "delete" for c in cmds)  # --keep
    assert "big-0" in next(c for c in cmds if c[3] == "tpu-vm")  # node 0 of the multislice
    start = _remote([c for c in cmds if c[4] == "ssh"][1])
    assert "--config.num_slices=2" in start and "LIBTPU_INIT_ARGS=--xla_tpu_x=1 " in start


def test_tpu_single_host_v5e_local_workdir_and_names():
    cmds = _commands(_dry(tpu.main, "start", "--name=small", "--tpu=v5e-8", "--zone=z",
                          "--config=configs/lavin_dit.py:demo", "--workdir=/home/me/run"))
    assert len(cmds) == 1 and "JAX_COORDINATOR_ADDRESS" not in _remote(cmds[0])
    (enc,) = _commands(_dry(tpu.main, "start", "--name=s", "--tpu=v5p-8", "--zone=z",
                            "--num_slices=2", "--module=lavin_jax.encode", "--config=c",
                            "--workdir=gs://w", "--", "--num_episodes=9"))[1:]
    assert "-m lavin_jax.encode --config=c --workdir=gs://w --num_episodes=9 >" in _remote(enc)
    assert "num_slices" not in _remote(enc)  # only the trainer takes config overrides
    create = _commands(_dry(tpu.main, "up", "--name=s", "--tpu=v5e-16", "--zone=z"))[1]
    assert "--accelerator-type=v5litepod-16" in create
    assert "--runtime-version=v2-alpha-tpuv5-lite" in create


@pytest.mark.parametrize("argv, message", [
    (["start", "--tpu=v5p-16", "--workdir=/tmp/x", "--config=c"], "gs:// workdir"),
    (["start", "--tpu=v5q-16", "--workdir=gs://x", "--config=c"], "--tpu='v5q-16'"),
    (["submit", "--tpu=v5p-8"], "needs --config and --workdir"),
    (["start", "--tpu=v5p-8", "--workdir=gs://x", "--config=c", "--", "total_steps=1"],
     "--config.total_steps=10"),
])
def test_tpu_bad_arguments_fail_with_one_line(argv, message):
    with pytest.raises(common.LaunchError, match=".*") as e:
        tpu.main(["--dry_run", "--name=n", "--zone=z", *argv], out=io.StringIO())
    assert message in str(e.value.code) and "\n" not in str(e.value.code)


def test_xpk_multislice_and_base_image():
    (cmd,) = _commands(_dry(xpk.main, "create", "--cluster=c1", "--workload=w1",
                            "--tpu=v5p-256", "--num_slices=4", "--docker_image=img:tag",
                            "--project=p", "--zone=us-east5-a",
                            "--config=configs/lavin_dit.py:3.4b", "--workdir=gs://b/r"))
    assert cmd[:3] == ["xpk", "workload", "create"]
    for flag in ("--workload=w1", "--cluster=c1", "--tpu-type=v5p-256", "--num-slices=4",
                 "--docker-image=img:tag", "--max-restarts=10", "--project=p"):
        assert flag in cmd
    assert _remote(cmd) == ("python3 -m lavin_jax.train --config=configs/lavin_dit.py:3.4b "
                            "--workdir=gs://b/r --config.num_slices=4")
    (cmd,) = _commands(_dry(xpk.main, "create", "--cluster=c", "--workload=w", "--tpu=v6e-16",
                            "--base_docker_image=base:1", "--config=c", "--workdir=gs://b/r"))
    assert "--base-docker-image=base:1" in cmd and any(a.startswith("--script-dir=") for a in cmd)
    with pytest.raises(common.LaunchError):
        xpk.main(["--dry_run", "create", "--cluster=c", "--workload=w", "--tpu=v6e-16",
                  "--config=c", "--workdir=/local", "--docker_image=i"], out=io.StringIO())
    assert _commands(_dry(xpk.main, "delete", "--cluster=c", "--workload=w"))[0][:3] == [
        "xpk", "workload", "delete"]


@pytest.mark.parametrize("per, tasks, extra", [("gpu", 8, "SLURM_LOCALID"),
                                               ("node", 1, "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7")])
def test_slurm_script_per_gpu_and_per_node(per, tasks, extra):
    lines = _dry(slurm.main, "--nodes=4", "--gpus_per_node=8", f"--per={per}",
                 "--partition=a100", "--config=configs/lavin_dit.py:1b",
                 "--workdir=/shared/runs/1b", "--env", "NCCL_DEBUG=WARN", "--",
                 "--config.total_steps=7")
    text = "\n".join(lines)
    assert "#SBATCH --nodes=4" in text and f"#SBATCH --ntasks-per-node={tasks}" in text
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --partition=a100" in text
    assert "#SBATCH --requeue" in text and extra in text and "export NCCL_DEBUG=WARN" in text
    assert ("srun --kill-on-bad-exit=1 python -m lavin_jax.train "
            "--config=configs/lavin_dit.py:1b --workdir=/shared/runs/1b "
            "--config.total_steps=7") in text
    assert lines[-1].startswith("$ sbatch ") and lines[-1].endswith("lavin_jax.sbatch")


def test_slurm_writes_the_script(tmp_path, monkeypatch):
    monkeypatch.setattr(common.Runner, "run", lambda self, cmd, **kw: self.say(str(cmd)))
    script = tmp_path / "job.sbatch"
    slurm.main(["--nodes=1", "--config=c", "--workdir=/w", f"--script={script}",
                f"--log_dir={tmp_path}"], out=io.StringIO())
    text = script.read_text()
    assert text.startswith("#!/bin/bash") and "--workdir=/w" in text and "{" not in text
