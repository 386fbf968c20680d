#!/usr/bin/env bash
# torchrun launcher for `dist-robust train` (or `eval`): one node, or one call per node of several.
#
#   # one node, one rank per GPU (or NPROC_PER_NODE ranks; on a CPU machine 2 ranks, gloo)
#   launch/torchrun.sh configs/quickstart.yaml optim.lr=0.05
#   NPROC_PER_NODE=4 launch/torchrun.sh configs/quickstart.yaml
#   # several nodes, c10d rendezvous: the same command on every node (any node's address works;
#   # RDZV_ID tells concurrent jobs apart)
#   NNODES=2 RDZV_ENDPOINT=node01:29400 RDZV_ID=myjob launch/torchrun.sh configs/quickstart.yaml
#   # several nodes, static ranks: NODE_RANK=0 on node01, NODE_RANK=1 on the other
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 MASTER_PORT=29500 launch/torchrun.sh configs/quickstart.yaml
#   # exact evaluation of a run on every rank
#   launch/torchrun.sh eval --checkpoint runs/quickstart --dataset mnist
#
# Arguments: CONFIG [section.key=value ...], passed to `dist_robust train` unchanged; a first
# argument `train` or `eval` selects the subcommand instead.
# Exit status: the command's; 143 when stopped by SIGTERM (130: SIGINT), every rank at one step with
# its checkpoint. The agent is torchrun's own, run by dist_robust/torchrun.py, which turns torchrun's
# status 1 and traceback on such a stop into that status and one line.
# Environment:
#   NPROC_PER_NODE   ranks on this node (default: the visible GPUs, else 2 on CPU)
#   NNODES           nodes (default 1: `--standalone`, a private rendezvous on a free port)
#   RDZV_ENDPOINT    HOST:PORT of the c10d rendezvous (multi-node); RDZV_ID its id (default dist_robust)
#   NODE_RANK, MASTER_ADDR, MASTER_PORT   static multi-node rendezvous instead of RDZV_ENDPOINT
#   MAX_RESTARTS     torchrun's --max-restarts (default 0; a restart resumes from the last checkpoint)
#   OMP_NUM_THREADS  OpenMP threads per rank; on CPU the default is the cores shared out over the ranks
#                    (torch's own thread count is train.threads, by default the same share)
#   DIST_ROBUST_PYTHON  interpreter to run; without it the project's .venv/bin/python when present,
#                    else python3 on PATH (it must import torch)
#   TORCHRUN_ARGS    extra torchrun flags, word-split (e.g. "--log-dir=/tmp/tr")
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# this checkout's code, whatever copy of dist_robust the interpreter has installed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${DIST_ROBUST_PYTHON:-}" ]; then
  PY=$DIST_ROBUST_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY=$ROOT/.venv/bin/python
elif command -v python3 >/dev/null && python3 -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("torch"))'; then
  PY=python3
else
  echo "torchrun.sh: no Python with torch: run 'make install' (creates .venv), or set DIST_ROBUST_PYTHON" >&2
  exit 2
fi
TORCHRUN=("$PY" -m dist_robust.torchrun)  # torchrun, exiting 143 when stopped by SIGTERM

if [ $# -eq 0 ]; then
  echo "usage: $0 CONFIG [section.key=value ...]   (or: $0 eval --checkpoint PATH --dataset NAME ...)" >&2
  exit 2
fi
case "$1" in
  train|eval) CMD=("$@") ;;
  *) CMD=(train "$@") ;;
esac

gpus() {  # visible GPUs: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list, else 0
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    if [ -z "$CUDA_VISIBLE_DEVICES" ]; then echo 0; else echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .; fi
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}
NGPU=$(gpus)
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ "$NGPU" -gt 0 ]; then NPROC_PER_NODE=$NGPU; else NPROC_PER_NODE=2; fi
fi
if [ "$NGPU" -eq 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  # torchrun would set 1 and warn; share the cores out instead (at least one thread per rank)
  OMP_NUM_THREADS=$(( $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) / NPROC_PER_NODE )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
fi

NNODES=${NNODES:-1}
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  RDZV=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-dist_robust}")
elif [ "$NNODES" != 1 ]; then
  if [ -z "${NODE_RANK:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
    echo "torchrun.sh: NNODES=$NNODES needs RDZV_ENDPOINT=HOST:PORT, or NODE_RANK and MASTER_ADDR" >&2
    exit 2
  fi
  RDZV=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}")
else
  RDZV=(--standalone)
fi

# shellcheck disable=SC2206  # TORCHRUN_ARGS is meant to be word-split
EXTRA=(${TORCHRUN_ARGS:-})
set -x
exec "${TORCHRUN[@]}" "${RDZV[@]}" --nproc_per_node="$NPROC_PER_NODE" --max_restarts="${MAX_RESTARTS:-0}" \
  "${EXTRA[@]}" -m dist_robust "${CMD[@]}"
