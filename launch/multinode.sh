#!/usr/bin/env bash
# One process of a multi-process (multi-host) MosaicBERT pretraining job.
#
# Run it once per process, on every host, with the same settings; it sets the variables that
# jax.distributed.initialize() reads and runs launch/single_host.sh (the same train command).
# The trainer initializes the distributed runtime itself when JAX_COORDINATOR_ADDRESS is set
# (config.train.distributed=auto); processes then agree on one global mesh over all devices.
#
# Usage, e.g. two hosts with 8 GPUs each and one process per host:
#   host0$ COORDINATOR=host0:1234 NUM_PROCESSES=2 PROCESS_ID=0 WORKDIR=/shared/run launch/multinode.sh
#   host1$ COORDINATOR=host0:1234 NUM_PROCESSES=2 PROCESS_ID=1 WORKDIR=/shared/run launch/multinode.sh
#
# Variables (required: WORKDIR, COORDINATOR, NUM_PROCESSES, PROCESS_ID; under SLURM or Open MPI
# the last two default to the scheduler's SLURM_NTASKS/SLURM_PROCID or OMPI_COMM_WORLD_*):
#   COORDINATOR      host:port of process 0, reachable from every host (a free TCP port)
#   NUM_PROCESSES    total number of processes
#   PROCESS_ID       this process's rank, 0 .. NUM_PROCESSES-1
#   LOCAL_DEVICE_IDS GPUs of this host that this process drives, e.g. "0,1,2,3,4,5,6,7"
#                    (default: all visible GPUs with one process per host; the GPU of its local
#                    rank with one process per GPU; GPU 0 when the scheduler binds one GPU)
#   LOCAL_RANK, LOCAL_PROCESSES   this process's rank on its host and the number of processes
#                    per host (defaults: SLURM_LOCALID / SLURM's tasks per node,
#                    OMPI_COMM_WORLD_LOCAL_RANK / _LOCAL_SIZE, else 0 and 1)
#   WORKDIR          must be the same shared directory for every process (NFS, Lustre, ...)
#   everything single_host.sh reads: CONFIG, SHARDS_DIR, MESH_*, PYTHON, XLA_FLAGS, NCCL_*, DRY_RUN
# Network: NCCL picks interfaces itself; on clusters with several, set NCCL_SOCKET_IFNAME (and
# NCCL_IB_HCA for InfiniBand) to the ones that connect the hosts.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

NUM_PROCESSES=${NUM_PROCESSES:-${SLURM_NTASKS:-${OMPI_COMM_WORLD_SIZE:-}}}
PROCESS_ID=${PROCESS_ID:-${SLURM_PROCID:-${OMPI_COMM_WORLD_RANK:-}}}
LOCAL_RANK=${LOCAL_RANK:-${SLURM_LOCALID:-${OMPI_COMM_WORLD_LOCAL_RANK:-0}}}
# SLURM writes tasks per node as "8", "8(x2)" or "8,4": take this layout's first count.
slurm_tasks_per_node=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}}
slurm_tasks_per_node=${slurm_tasks_per_node%%[(,]*}
LOCAL_PROCESSES=${LOCAL_PROCESSES:-${slurm_tasks_per_node:-${OMPI_COMM_WORLD_LOCAL_SIZE:-1}}}
: "${COORDINATOR:?set COORDINATOR=host:port of process 0 (a free port on that host)}"
: "${NUM_PROCESSES:?set NUM_PROCESSES to the total number of processes}"
: "${PROCESS_ID:?set PROCESS_ID to this process rank (0 .. NUM_PROCESSES-1)}"
if [[ $COORDINATOR != *:* ]]; then
  echo "multinode.sh: COORDINATOR=$COORDINATOR needs a port, e.g. $COORDINATOR:1234" >&2
  exit 2
fi
if ! [[ $PROCESS_ID =~ ^[0-9]+$ && $NUM_PROCESSES =~ ^[0-9]+$ ]] || ((PROCESS_ID >= NUM_PROCESSES)); then
  echo "multinode.sh: need 0 <= PROCESS_ID < NUM_PROCESSES; got PROCESS_ID=$PROCESS_ID NUM_PROCESSES=$NUM_PROCESSES" >&2
  exit 2
fi

# Which GPUs this process drives. Without it JAX would take only GPU <local rank> under SLURM,
# which is wrong with one process per host.
visible_gpus() {
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    local ids
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}
if [[ -z ${LOCAL_DEVICE_IDS:-} ]]; then
  gpus=$(visible_gpus)
  if ((gpus == 1)); then
    LOCAL_DEVICE_IDS=0
  elif ((gpus > 1 && LOCAL_PROCESSES == 1)); then
    LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
  elif ((gpus > 1)); then
    if ((LOCAL_PROCESSES > gpus)); then
      echo "multinode.sh: $LOCAL_PROCESSES processes per host but only $gpus GPUs visible" >&2
      exit 2
    fi
    LOCAL_DEVICE_IDS=$LOCAL_RANK
  fi
fi

export JAX_COORDINATOR_ADDRESS=$COORDINATOR
export JAX_NUM_PROCESSES=$NUM_PROCESSES
export JAX_PROCESS_ID=$PROCESS_ID
if [[ -n ${LOCAL_DEVICE_IDS:-} ]]; then
  export JAX_LOCAL_DEVICE_IDS=$LOCAL_DEVICE_IDS
fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
  echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES" \
    "JAX_PROCESS_ID=$JAX_PROCESS_ID JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}"
fi
exec bash "$HERE/single_host.sh" "$@"
