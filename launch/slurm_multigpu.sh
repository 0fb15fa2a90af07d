#!/usr/bin/env bash
# Train fdnm-jax on several GPU hosts with SLURM: one process per GPU, the same program in every process.
#
#   sbatch --nodes=2 launch/slurm_multigpu.sh configs/sysu.py /shared/runs/sysu --config.data.root=/shared/SYSU-MM01
#
# The workdir must be on a file system every node sees (checkpoints are written by all processes). JAX reads
# the SLURM environment (`--distributed` -> jax.distributed.initialize() with no address: coordinator = first
# node, one process per task, its GPU from SLURM_LOCALID). SLURM sends SIGTERM before a time limit or a
# preemption (--signal below): every process saves the same step and exits 0; `--requeue` restarts the job,
# which resumes from that checkpoint. See launch/README.md for sizing the mesh and the per-host batch.
#SBATCH --job-name=fdnm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=fdnm_%j.log
set -euo pipefail

CONFIG="${1:?usage: sbatch launch/slurm_multigpu.sh CONFIG WORKDIR [main.py flags]}"
WORKDIR="${2:?usage: sbatch launch/slurm_multigpu.sh CONFIG WORKDIR [main.py flags]}"
shift 2

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
# srun starts one task per GPU; each sees all GPUs of its node and JAX picks its own from SLURM_LOCALID.
# exec: SLURM's SIGTERM reaches python directly.
srun --kill-on-bad-exit=1 bash -c "exec python main.py --distributed --config=${CONFIG} --workdir=${WORKDIR} $*"
