#!/bin/bash
# One SLURM task per node (started by scripts/slurm/train.sbatch through srun): DeepSpeed's launcher for this
# node's GPUs, without ssh. The node list becomes a DeepSpeed hostfile (one "host slots=N" line per node, as in
# scripts/hostfile.example); its first host is the master. Arguments are the train command's.
#
# Read from SLURM: SLURM_NODEID (this node's rank), SLURM_NNODES, SLURM_JOB_NODELIST (expanded by
# `scontrol show hostnames`), SLURM_JOB_ID. Optional: GPUS_PER_NODE (default 8), MASTER_PORT (default: from the
# job id, so two jobs on one node do not collide), HOSTFILE (where to write the hostfile; default in TMPDIR).
set -euo pipefail
: "${SLURM_NODEID:?run me through srun inside a SLURM allocation (scripts/slurm/train.sbatch)}"
: "${SLURM_NNODES:?}" "${SLURM_JOB_NODELIST:?}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
MASTER_ADDR="$(head -n 1 <<< "$HOSTS")"
HOSTFILE="${HOSTFILE:-${TMPDIR:-/tmp}/t2i_ds-${SLURM_JOB_ID:-0}-node${SLURM_NODEID}.hostfile}"  # node-local
sed "s/\$/ slots=${GPUS_PER_NODE}/" <<< "$HOSTS" > "$HOSTFILE"
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID" --num_nodes "$SLURM_NNODES" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module t2i_ds.train "$@"
