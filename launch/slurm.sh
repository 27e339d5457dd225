#!/usr/bin/env bash
# MosaicBERT pretraining on a SLURM GPU cluster: sbatch this file from the repository root.
#
#   WORKDIR=/shared/runs/c4-base SHARDS_DIR=/shared/data/c4_bert sbatch launch/slurm.sh
#   WORKDIR=... sbatch --nodes=4 launch/slurm.sh --config.train.steps=35000   # overrides
#
# Layout: one process per GPU (the default below: --ntasks-per-node=8 --gpus-per-node=8), or one
# process per host driving all its GPUs (sbatch --ntasks-per-node=1 --cpus-per-task=64 ...).
# Every task runs launch/multinode.sh, which maps SLURM's ranks onto jax.distributed.initialize()
# (coordinator = first host of the job) and runs the same train command as single_host.sh.
#
# Variables (export them before sbatch; the job inherits your environment):
#   WORKDIR        required; on storage every node sees (checked before training starts).
#                  Checkpoints land there; resubmitting (or --requeue) resumes from the newest.
#   SHARDS_DIR     prepared shards, readable from every node (configs/base.py needs it)
#   CONFIG         config file (default configs/base.py; relative: in the submit directory,
#                  else in the checkout)
#   DRY_RUN=1      print each task's command instead of training; creates nothing
#   REPO_DIR       this checkout, same path on every node (default: the submit directory)
#   PYTHON         interpreter with mosaicbert-jax installed on every node (default python3);
#                  or activate your environment before sbatch
#   COORDINATOR_PORT  port on the first host for the JAX coordinator (default 20000 + job id % 10000)
#   MESH_DATA / MESH_FSDP / MESH_TENSOR  mesh sizes; default data = nodes, fsdp = GPUs per node
#                  (FSDP inside a host over NVLink, data parallel across hosts)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA  the cluster's interfaces, if NCCL does not find them
#   everything single_host.sh reads (XLA_FLAGS, XLA_PYTHON_CLIENT_MEM_FRACTION, NCCL_DEBUG, ...)
# Arguments after the script name are passed to the train command (--config.KEY=VALUE).
#
#SBATCH --job-name=mosaicbert
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
set -euo pipefail

: "${SLURM_JOB_ID:?submit this script with sbatch (or run it inside an allocation)}"
: "${WORKDIR:?export WORKDIR=<run directory on shared storage> before sbatch}"
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $REPO_DIR/launch/multinode.sh ]]; then
  echo "slurm.sh: $REPO_DIR is not a mosaicbert-jax checkout; sbatch from the repository root" \
    "or set REPO_DIR" >&2
  exit 2
fi

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # (| head: SIGPIPE)
head_node=${hosts[0]:?scontrol listed no hosts for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST}
export COORDINATOR=${COORDINATOR:-$head_node:${COORDINATOR_PORT:-$((20000 + SLURM_JOB_ID % 10000))}}
export MESH_DATA=${MESH_DATA:-$nodes}
export MESH_FSDP=${MESH_FSDP:--1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Every process writes its part of each checkpoint into WORKDIR: it must be one shared directory.
# (DRY_RUN=1 creates nothing: it skips this check, and the tasks only print their commands.)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  echo "mosaicbert: DRY_RUN=1: not creating WORKDIR=$WORKDIR nor checking that every node sees it"
else
  mkdir -p "$WORKDIR"
  marker="$WORKDIR/.slurm-shared-check-$SLURM_JOB_ID"
  touch "$marker"
  if ! srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 test -e "$marker"; then
    echo "slurm.sh: WORKDIR=$WORKDIR is not visible from every node; put it on shared storage" >&2
    rm -f "$marker"
    exit 2
  fi
  rm -f "$marker"
fi

# Since SLURM 22.05 srun no longer inherits sbatch's --cpus-per-task: pass it on, or every task
# gets one CPU (and the data pipeline and XLA's host threads crawl).
task_options=(--kill-on-bad-exit=1)
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  task_options+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi

echo "mosaicbert: job $SLURM_JOB_ID, $nodes node(s), ${SLURM_NTASKS:-?} process(es)," \
  "coordinator $COORDINATOR, workdir $WORKDIR"
srun "${task_options[@]}" bash "$REPO_DIR/launch/multinode.sh" "$@"
