#!/usr/bin/env bash
# DeepSpeed launcher for `dist-robust train` with dist.engine=deepspeed (ZeRO stage: dist.zero_stage=0|1|2).
#
#   # one node, one rank per GPU (or NPROC_PER_NODE ranks; on a CPU machine 2 ranks, gloo)
#   launch/deepspeed.sh configs/quickstart.yaml dist.zero_stage=2
#   # a hostfile ("HOST slots=N" per line); one line for the local host runs here without ssh
#   printf 'localhost slots=2\n' > hostfile && HOSTFILE=hostfile launch/deepspeed.sh configs/quickstart.yaml
#   # several nodes: DeepSpeed starts the ranks over passwordless ssh (pdsh); run this on the first host
#   HOSTFILE=/job/hostfile MASTER_ADDR=node01 launch/deepspeed.sh configs/quickstart.yaml dist.zero_stage=1
#
# Arguments: CONFIG [section.key=value ...], passed to `dist_robust train` after dist.engine=deepspeed.
# Environment:
#   HOSTFILE         DeepSpeed hostfile; without it this node with NPROC_PER_NODE ranks
#   NPROC_PER_NODE   ranks on this node without a hostfile (default: the visible GPUs, else 2 on CPU)
#   MASTER_ADDR, MASTER_PORT   rendezvous (default: 127.0.0.1 for one host, port 29500)
#   OMP_NUM_THREADS  OpenMP threads per rank (default on CPU: the cores shared out over the ranks)
#   DIST_ROBUST_PYTHON  interpreter (`$DIST_ROBUST_PYTHON -m deepspeed.launcher.runner`); default: the
#                    project's .venv/bin/python when present, else `python3`
#   DEEPSPEED_ARGS   extra launcher flags, word-split (e.g. "--bind_cores_to_rank")
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${DIST_ROBUST_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  echo "deepspeed.sh: $PY cannot import deepspeed: run 'make install' or set DIST_ROBUST_PYTHON" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  echo "usage: $0 CONFIG [section.key=value ...]" >&2
  exit 2
fi
if [ "$1" = train ]; then shift; fi

NGPU=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then NGPU=$(nvidia-smi -L | grep -c '^GPU'); fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "$NGPU" -gt 0 ] && echo "$NGPU" || echo 2)}
if [ "$NGPU" -eq 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) / NPROC_PER_NODE )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
fi

if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; }
  HOSTS=$(grep -cvE '^\s*(#|$)' "$HOSTFILE" || true)
  WHERE=(--hostfile="$HOSTFILE")
  # one host: DeepSpeed would still check ssh to it; the ranks start here
  if [ "$HOSTS" -le 1 ]; then WHERE+=(--no_ssh_check --master_addr="${MASTER_ADDR:-127.0.0.1}");
  elif [ -n "${MASTER_ADDR:-}" ]; then WHERE+=(--master_addr="$MASTER_ADDR"); fi
else
  # no hostfile: DeepSpeed would look for /job/hostfile; an explicit one-line one keeps it local
  LOCAL_HOSTFILE=$(mktemp)
  trap 'rm -f "$LOCAL_HOSTFILE"' EXIT
  echo "localhost slots=$NPROC_PER_NODE" > "$LOCAL_HOSTFILE"
  WHERE=(--hostfile="$LOCAL_HOSTFILE" --no_ssh_check --master_addr="${MASTER_ADDR:-127.0.0.1}")
fi

# shellcheck disable=SC2206  # DEEPSPEED_ARGS is meant to be word-split
EXTRA=(${DEEPSPEED_ARGS:-})
set -x
# --no_local_rank: ranks read RANK/LOCAL_RANK from the environment (dist.py), not from argv
"$PY" -m deepspeed.launcher.runner "${WHERE[@]}" --master_port="${MASTER_PORT:-29500}" "${EXTRA[@]}" \
  --no_local_rank --module dist_robust train "$@" dist.engine=deepspeed
