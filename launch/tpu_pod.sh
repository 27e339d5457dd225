#!/usr/bin/env bash
# MosaicBERT pretraining on a Cloud TPU VM or TPU pod slice, driven from your workstation.
#
#   TPU_NAME=bert-v4-32 ZONE=us-central2-b launch/tpu_pod.sh setup
#   TPU_NAME=bert-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/runs/c4-base \
#     SHARDS_DIR=/mnt/shared/data/c4_bert launch/tpu_pod.sh train [--config.KEY=VALUE ...]
#   TPU_NAME=bert-v4-32 ZONE=us-central2-b launch/tpu_pod.sh logs | stop
#
# Commands (each runs on every worker at once: gcloud compute tpus tpu-vm ssh --worker=all):
#   setup  copy this checkout to ~/$REMOTE_DIR on every worker and pip install it with jax[tpu]
#   train  run launch/single_host.sh (the same train command) on every worker; each worker is
#          one JAX process and jax.distributed.initialize() finds the others through the TPU
#          metadata (--config.train.distributed=yes). With DETACH=1 the job runs under nohup
#          and logs to ~/mosaicbert-train.log on each worker (see `logs`).
#   logs   last lines of worker 0's log (DETACH=1 runs)
#   stop   end the training processes on every worker (frees the TPU after a failed run)
#
# Variables (required: TPU_NAME, ZONE; for train also WORKDIR):
#   TPU_NAME, ZONE, PROJECT   the TPU VM (PROJECT: default gcloud project)
#   WORKDIR      a directory every worker sees at the same path: all workers write their part of
#                each checkpoint there (a Filestore/NFS mount, or a gcsfuse mount of a bucket)
#   SHARDS_DIR   prepared shards readable on every worker (same kind of mount), or leave unset
#                with a config whose data is embedded (configs/tiny.py)
#   CONFIG       config path relative to the checkout (default configs/base.py)
#   REMOTE_DIR   checkout location under the workers' home (default mosaicbert-jax)
#   JAX_SPEC     pip requirement for JAX on TPU (default "jax[tpu]")
#   DETACH=1     train in the background (survives a dropped ssh connection)
#   DRY_RUN=1    print the tar and gcloud commands instead of running them (creates nothing)
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command_name=${1:-}
if [[ -z $command_name ]]; then
  echo "usage: TPU_NAME=... ZONE=... launch/tpu_pod.sh setup|train|logs|stop [--config.KEY=VALUE ...]" >&2
  exit 2
fi
shift
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
REMOTE_DIR=${REMOTE_DIR:-mosaicbert-jax}
CONFIG=${CONFIG:-configs/base.py}
LOG_FILE=mosaicbert-train.log

gcloud_target=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  gcloud_target+=(--project="$PROJECT")
fi

run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    local line
    printf -v line '%q ' "$@"
    echo "${line% }"
  else
    "$@"
  fi
}

on_workers() {  # on_workers <worker> <remote shell command>
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_target[@]}" --worker="$1" --command="$2"
}

case $command_name in
  setup)
    if [[ ${DRY_RUN:-0} == 1 ]]; then  # creates nothing: the archive's name only
      tarball="${TMPDIR:-/tmp}/mosaicbert-jax.XXXXXX.tar.gz"
    else
      tarball=$(mktemp "${TMPDIR:-/tmp}/mosaicbert-jax.XXXXXX.tar.gz")
      trap 'rm -f "$tarball"' EXIT
    fi
    run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='workdir*' -C "$REPO_DIR" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:mosaicbert-jax.tar.gz" \
      "${gcloud_target[@]}" --worker=all
    printf -v remote 'mkdir -p ~/%q && tar -xzf ~/mosaicbert-jax.tar.gz -C ~/%q && cd ~/%q && python3 -m pip install -q -U %q -e .' \
      "$REMOTE_DIR" "$REMOTE_DIR" "$REMOTE_DIR" "${JAX_SPEC:-jax[tpu]}"
    on_workers all "$remote"
    ;;
  train)
    : "${WORKDIR:?set WORKDIR to a directory every worker sees (NFS / gcsfuse mount)}"
    # The remote command: variables and arguments quoted once, for the workers' shell.
    printf -v remote 'cd ~/%q && WORKDIR=%q CONFIG=%q SHARDS_DIR=%q bash launch/single_host.sh --config.train.distributed=yes' \
      "$REMOTE_DIR" "$WORKDIR" "$CONFIG" "${SHARDS_DIR:-}"
    if (($# > 0)); then
      printf -v extra ' %q' "$@"
      remote+=$extra
    fi
    if [[ ${DETACH:-0} == 1 ]]; then
      printf -v remote 'nohup bash -c %q > ~/%s 2>&1 < /dev/null &' "$remote" "$LOG_FILE"
    fi
    on_workers all "$remote"
    ;;
  logs)
    on_workers 0 "tail -n 50 ~/$LOG_FILE"
    ;;
  stop)
    on_workers all "pkill -f 'mosaicbert_jax[.]train' || true"
    ;;
  *)
    echo "tpu_pod.sh: unknown command '$command_name'; use setup, train, logs or stop" >&2
    exit 2
    ;;
esac
