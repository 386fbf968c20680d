#!/usr/bin/env bash
# A copy of the development machines' slurm-ci tool (shared/tools/slurm-ci.sh), kept in the project so
# that tests/test_launch.py needs nothing outside the repository. tests/test_launch.py picks free ports
# and a private SLURM_CI_DIR for it.
# Single-node Slurm for tests on Debian 12 (bookworm), run as root, no systemd.
#   slurm-ci.sh install   # apt-get the daemons (idempotent, ~10 s)
#   slurm-ci.sh start     # fresh config+state under $SLURM_CI_DIR, start munged, slurmctld, slurmd; wait for idle node
#   slurm-ci.sh stop      # TERM the three daemons by their recorded PIDs (KILL after 15 s)
# Afterwards: export SLURM_CONF=$SLURM_CI_DIR/slurm.conf  (client commands need it; jobs inherit it)
# Env: SLURM_CI_CPUS=N (fake CPU count), SLURM_CI_DIR (default /tmp/slurm-ci), SLURM_CI_AUTH=munge|none (default munge),
#      SLURM_CI_CTLD_PORT / SLURM_CI_SLURMD_PORT (default 6817 / 6818), SLURM_CI_FAKE_GPUS=N (default 0)
set -euo pipefail
DIR=${SLURM_CI_DIR:-/tmp/slurm-ci}
AUTH=${SLURM_CI_AUTH:-munge}
CTLD_PORT=${SLURM_CI_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_CI_SLURMD_PORT:-6818}
FAKE_GPUS=${SLURM_CI_FAKE_GPUS:-0}
FAKE_CPUS=${SLURM_CI_CPUS:-}   # e.g. 16: advertise more CPUs than the machine has (SlurmdParameters=config_overrides)

die() { echo "slurm-ci: $*" >&2; exit 1; }

stop_pid() {  # stop_pid NAME : TERM the PID in $DIR/NAME.pid, wait, then KILL
  local f="$DIR/$1.pid" pid i
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then echo "slurm-ci: $1 ($pid) ignored TERM, sending KILL" >&2; kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$f"
  [ -n "${SLURM_CI_VERBOSE:-}" ] && echo "slurm-ci: stopped $1 ($pid) after ${i:-0} polls of 0.1 s" >&2
  return 0
}

stop_all() {  # slurmd and slurmctld in parallel (each takes ~2 s), then munged
  stop_pid slurmd & local a=$!; stop_pid slurmctld & local b=$!; wait $a $b || true; stop_pid munged
}
fail() { echo "slurm-ci: $*" >&2; tail -n 20 "$DIR"/log/*.out >&2 || true; stop_all; exit 1; }

case "${1:-}" in
install)
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
  ;;
start)
  command -v slurmctld >/dev/null || die "slurm not installed (run: $0 install)"
  for n in slurmd slurmctld munged; do [ -s "$DIR/$n.pid" ] && kill -0 "$(cat "$DIR/$n.pid")" 2>/dev/null && die "$n already running from $DIR; run: $0 stop"; done
  rm -rf "$DIR"
  mkdir -p "$DIR/ctld" "$DIR/spool" "$DIR/log" "$DIR/munge"
  HOST=$(hostname -s)
  NODE=$(slurmd -C | head -n1)   # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24103"
  OVERRIDES=""
  if [ -n "$FAKE_CPUS" ]; then
    NODE="NodeName=$HOST CPUs=$FAKE_CPUS $(echo "$NODE" | grep -o 'RealMemory=[0-9]*')"
    OVERRIDES="SlurmdParameters=config_overrides"
  fi
  GRES_LINE=""; NODE_GRES=""
  if [ "$FAKE_GPUS" -gt 0 ]; then
    GRES_LINE="GresTypes=gpu"; NODE_GRES="Gres=gpu:$FAKE_GPUS"
    # gres/gpu needs device files (Count= alone is ignored by slurmd 22.05): fake ones, char 1,3 like /dev/null
    mkdir -p "$DIR/dev"
    for g in $(seq 0 $((FAKE_GPUS - 1))); do mknod "$DIR/dev/nvidia$g" c 1 3; done
    echo "NodeName=$HOST Name=gpu File=$DIR/dev/nvidia[0-$((FAKE_GPUS - 1))]" > "$DIR/gres.conf"
  fi
  if [ "$AUTH" = munge ]; then
    AUTH_LINES="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2"
  else
    AUTH_LINES="AuthType=auth/none
CredType=cred/none"
  fi
  cat > "$DIR/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
$AUTH_LINES
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MailProg=/bin/true
InactiveLimit=0
KillWait=5
MinJobAge=600
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/ctld/slurmctld.pidfile
SlurmdPidFile=$DIR/spool/slurmd.pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$GRES_LINE
$OVERRIDES
$NODE NodeAddr=127.0.0.1 $NODE_GRES State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$AUTH" = munge ]; then
    # private munged (own key, socket, pid, log, seed under $DIR/munge), run as user munge, not forked
    chown munge:munge "$DIR/munge"; chmod 0755 "$DIR/munge"   # munged insists on o+x for the socket dir
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$DIR/munge/munge.key"; chmod 0400 "$DIR/munge/munge.key"
    setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
      --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munge/munged.pidfile" --log-file="$DIR/munge/munged.log" \
      --seed-file="$DIR/munge/munged.seed" </dev/null >"$DIR/log/munged.out" 2>&1 &
    echo $! > "$DIR/munged.pid"
    for i in $(seq 1 100); do munge -S "$DIR/munge/munge.socket.2" -n 2>/dev/null | unmunge -S "$DIR/munge/munge.socket.2" >/dev/null 2>&1 && break; sleep 0.1; done
    munge -S "$DIR/munge/munge.socket.2" -n | unmunge -S "$DIR/munge/munge.socket.2" >/dev/null || fail "munged did not come up"
  fi
  setsid /usr/sbin/slurmctld -D -f "$DIR/slurm.conf" </dev/null >"$DIR/log/slurmctld.out" 2>&1 &
  echo $! > "$DIR/slurmctld.pid"
  setsid /usr/sbin/slurmd -D -f "$DIR/slurm.conf" </dev/null >"$DIR/log/slurmd.out" 2>&1 &
  echo $! > "$DIR/slurmd.pid"
  export SLURM_CONF="$DIR/slurm.conf"
  for i in $(seq 1 150); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && { echo "slurm-ci: node $HOST idle; export SLURM_CONF=$DIR/slurm.conf"; exit 0; }
    sleep 0.2
  done
  fail "node did not become idle within 30 s"
  ;;
stop)
  stop_all
  ;;
*) die "usage: $0 install|start|stop" ;;
esac
