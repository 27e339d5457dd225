#!/usr/bin/env bash
# Pretrain MosaicBERT on every accelerator of this machine (1-8 GPUs, a TPU VM host, or CPU).
#
# JAX needs no per-GPU launcher on one host: a single process sees all local devices and the
# training mesh (config.mesh, FSDP over all devices by default) spreads the work over them.
# This script only sets the XLA / NCCL environment and runs the one training entry point:
#
#   python -m mosaicbert_jax.train --config=$CONFIG --workdir=$WORKDIR [--config.KEY=VALUE ...]
#
# The multi-host scripts (multinode.sh, slurm.sh, tpu_pod.sh) run this script once per process.
#
# Usage:
#   WORKDIR=/runs/c4-base SHARDS_DIR=/data/c4_bert launch/single_host.sh [--config.KEY=VALUE ...]
#
# Variables (required: WORKDIR):
#   WORKDIR      run directory: checkpoints, metrics.jsonl, TensorBoard; a rerun resumes there
#   CONFIG       config file (default: configs/base.py of this checkout); a relative path is
#                looked up in the current directory, then in this checkout
#   SHARDS_DIR   prepared shards (python -m mosaicbert_jax.data.prepare); sets
#                --config.data.shards_dir (configs/base.py needs it; configs/tiny.py does not)
#   MESH_DATA, MESH_FSDP, MESH_TENSOR   mesh axis sizes (-1: the rest of the devices);
#                unset: the config's mesh
#   PYTHON       interpreter with mosaicbert-jax installed (default: python3)
#   XLA_FLAGS, XLA_PYTHON_CLIENT_MEM_FRACTION, NCCL_*   kept if set; defaults below on GPUs
#   DRY_RUN=1    print the command instead of running it (nothing is created)
# Arguments are appended to the command, so they override everything above.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${WORKDIR:?set WORKDIR to the run directory (checkpoints, logs; on shared storage for multi-host runs)}"
CONFIG=${CONFIG:-$REPO_DIR/configs/base.py}
PYTHON=${PYTHON:-python3}

# A relative CONFIG is a file of the current directory, else of this checkout (configs/tiny.py
# works from anywhere).
if [[ ! -f $CONFIG && $CONFIG != /* && -f $REPO_DIR/$CONFIG ]]; then
  CONFIG=$REPO_DIR/$CONFIG
fi
if [[ ! -f $CONFIG ]]; then
  echo "single_host.sh: CONFIG=$CONFIG does not exist in $PWD or in $REPO_DIR (try configs/base.py or configs/tiny.py)" >&2
  exit 2
fi

# The checkout's code wins over any other installed copy.
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

if command -v nvidia-smi >/dev/null 2>&1; then
  # Let XLA overlap the FSDP all-gathers / reduce-scatters with compute.
  if [[ ${XLA_FLAGS:-} != *xla_gpu_enable_latency_hiding_scheduler* ]]; then
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
  fi
  # JAX preallocates GPU memory; leave a little for NCCL and cuDNN workspaces.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
fi

args=(-m mosaicbert_jax.train "--config=$CONFIG" "--workdir=$WORKDIR")
if [[ -n ${SHARDS_DIR:-} ]]; then
  args+=("--config.data.shards_dir=$SHARDS_DIR")
fi
for axis in data fsdp tensor; do
  var="MESH_${axis^^}"
  if [[ -n ${!var:-} ]]; then
    args+=("--config.mesh.$axis=${!var}")
  fi
done
args+=("$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf -v line '%q ' "$PYTHON" "${args[@]}"
  echo "${line% }"  # one write, so lines of parallel processes do not interleave
  exit 0
fi
exec "$PYTHON" "${args[@]}"
