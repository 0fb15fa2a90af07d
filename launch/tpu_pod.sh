#!/usr/bin/env bash
# Train fdnm-jax on a Cloud TPU pod slice: the same `python main.py ...` runs on every worker (host).
#
#   TPU_NAME=fdnm-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#   BUCKET=gs://my-bucket CONFIG=configs/sysu.py DATA=gs://my-bucket/data/SYSU-MM01 \
#   bash launch/tpu_pod.sh create      # once: create the slice, copy the code, install requirements
#   bash launch/tpu_pod.sh train       # start (or resume) training on all workers
#   bash launch/tpu_pod.sh logs        # follow worker 0's log
#   bash launch/tpu_pod.sh delete
#
# Data and workdir live on GCS (every host reads the data and writes its checkpoint shards there). JAX detects
# the pod (`--distributed` -> jax.distributed.initialize() with no address). A preempted or restarted run
# resumes from the latest checkpoint in $WORKDIR/checkpoints (on a maintenance event every host saves the same
# step and exits 0). Extra arguments after the command are passed to main.py, e.g.
#   bash launch/tpu_pod.sh train --config.mesh.fsdp=4 --config.model.dtype=bfloat16
# See launch/README.md for sizing the mesh and the per-host batch.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
BUCKET="${BUCKET:-}"
CONFIG="${CONFIG:-configs/sysu.py}"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG}" .py)}"
WORKDIR="${WORKDIR:-${BUCKET}/runs/${RUN_NAME}}"
DATA="${DATA:-}"
REPO_DIR="${REPO_DIR:-\$HOME/fdnm-jax}"
cmd="${1:-train}"; shift || true

ssh_all() {  # run a command on every worker of the slice, in parallel.
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="$1"
}

case "${cmd}" in
  create)
    gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" --accelerator-type="${ACCELERATOR}" \
      --version="${RUNTIME}"
    gcloud compute tpus tpu-vm scp --zone="${ZONE}" --worker=all --recurse "$(dirname "$0")/.." \
      "${TPU_NAME}:fdnm-jax"
    # The pinned jax of requirements.txt, with its TPU runtime (libtpu).
    jax_version="$(grep -E '^jax==' "$(dirname "$0")/../requirements.txt" | cut -d= -f3)"
    ssh_all "cd ${REPO_DIR} && python3 -m pip install -q -r requirements.txt 'jax[tpu]==${jax_version}'"
    ;;
  train)
    [[ "${WORKDIR}" == gs://* ]] || { echo "WORKDIR must be on GCS (gs://...), shared by all hosts" >&2; exit 2; }
    data_flag=""
    [[ -n "${DATA}" ]] && data_flag="--config.data.root=${DATA}"
    # nohup: the run survives the ssh session; each worker logs to its own file.
    ssh_all "cd ${REPO_DIR} && nohup python3 main.py --distributed --config=${CONFIG} --workdir=${WORKDIR} \
      ${data_flag} $* > \$HOME/fdnm_train.log 2>&1 &"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=0 --command="tail -f \$HOME/fdnm_train.log"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet
    ;;
  *)
    echo "usage: $0 create|train|logs|delete [main.py flags]" >&2; exit 2
    ;;
esac
