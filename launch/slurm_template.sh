#!/bin/bash
# lavin_jax training on a SLURM GPU cluster (written by launch/slurm.py; edit freely).
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks_per_node}
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time}
#SBATCH --output={log_dir}/%x-%j.out
#SBATCH --requeue
{extra_sbatch}
set -euo pipefail
cd {repo}
{setup}
# jax.distributed reads SLURM_JOB_ID / SLURM_STEP_NODELIST / SLURM_NTASKS / SLURM_PROCID /
# SLURM_LOCALID: coordinator = first node (port from the job id), one process per task.
{process_env}
{env}
# A requeued (preempted) job resumes from the newest Orbax checkpoint in the workdir.
srun --kill-on-bad-exit=1 {train}
