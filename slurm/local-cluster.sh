#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the `slurm`-marked tests (and for trying the SLURM path):
#
#   slurm/local-cluster.sh start     # install slurm-wlm + munge if missing (apt, needs root), start
#   slurm/local-cluster.sh status    # exit 0 when the cluster answers and its nodes are usable
#   slurm/local-cluster.sh stop      # stop every daemon it started
#   export SLURM_CONF=/tmp/eomt-slurm/slurm.conf   # then sbatch / srun / sinfo talk to it
#
# Two virtual nodes, n1 and n2 (two slurmd on this host, ports 17001/17002, both resolving to
# 127.0.0.1), in one partition `local`. Each node declares 2 CPUs whatever the machine has (the
# cores are shared, oversubscription is fine for tests): a 2-task job fits on one node, and a
# `--nodes=2` job puts one rank on each. No systemd, no cgroups (proctrack/linuxproc, task/none),
# no accounting; config, state, spool and logs live in $EOMT_SLURM_DIR (default /tmp/eomt-slurm).
# Idempotent: `start` on a running cluster only checks it; `stop` on a stopped one does nothing.
set -euo pipefail

DIR="${EOMT_SLURM_DIR:-/tmp/eomt-slurm}"
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket"
NODES=(n1 n2)
CTLD_PORT=17000
export SLURM_CONF="$CONF"

die() { echo "local-cluster: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed; run as root (apt-get install -y slurm-wlm munge)"
  echo "local-cluster: installing slurm-wlm and munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
  mkdir -p "$DIR"/{munge,state,log} "${NODES[@]/#/$DIR/spool/}"
  chmod 700 "$DIR/munge"
  [[ -f $DIR/munge/munge.key ]] || { head -c 1024 /dev/urandom >"$DIR/munge/munge.key"; chmod 400 "$DIR/munge/munge.key"; }
  local host; host=$(hostname -s)
  cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: a throw-away cluster of virtual nodes on $host.
ClusterName=eomt-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=120
InactiveLimit=0
KillWait=15
MinJobAge=600
MailProg=/bin/true
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

# Jobs on two nodes rendezvous at the first node's name, so n1 and n2 must resolve.
add_hosts() {
  local node
  for node in "${NODES[@]}"; do
    getent hosts "$node" >/dev/null && continue
    [[ -w /etc/hosts ]] || die "$node does not resolve and /etc/hosts is not writable; add '127.0.0.1 ${NODES[*]}' to it"
    echo "127.0.0.1 $node  # slurm/local-cluster.sh" >>/etc/hosts
  done
}

nodes_ready() {  # every node idle, mixed or allocated: usable
  local states
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [[ $(grep -cE ' (idle|mix|alloc)$' <<<"$states") == "${#NODES[@]}" ]]
}

start() {
  install_packages
  if pid_alive "$DIR/slurmctld.pid" && nodes_ready; then
    echo "local-cluster: already running (SLURM_CONF=$CONF)"
    return
  fi
  local t0=$SECONDS
  write_config
  add_hosts
  if ! pid_alive "$DIR/munge/munged.pid"; then
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
      --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  fi
  pid_alive "$DIR/slurmctld.pid" || slurmctld -i  # -i: ignore state left by an earlier cluster
  local node
  for node in "${NODES[@]}"; do
    pid_alive "$DIR/slurmd-$node.pid" || slurmd -N "$node"
  done
  for _ in $(seq 120); do
    if nodes_ready; then
      echo "local-cluster: up in $((SECONDS - t0)) s, nodes ${NODES[*]} idle (export SLURM_CONF=$CONF)"
      return
    fi
    # Nodes that registered before the controller was ready come back on their own (ReturnToService=2);
    # a node marked down from an earlier run is resumed here.
    scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true
    sleep 1
  done
  sinfo -N >&2 || true
  tail -n 5 "$DIR"/log/*.log >&2 || true
  die "the nodes did not become idle within 120 s (logs in $DIR/log)"
}

stop_pid() {  # stop_pid PIDFILE: TERM, wait, then KILL
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

stop() {
  if [[ -f $CONF ]] && pid_alive "$DIR/slurmctld.pid"; then
    scancel --quiet --full --state=RUNNING --signal=KILL "$(squeue -h -o %i | paste -sd, -)" >/dev/null 2>&1 || true
    scancel --quiet "$(squeue -h -o %i | paste -sd, -)" >/dev/null 2>&1 || true
  fi
  local node
  for node in "${NODES[@]}"; do stop_pid "$DIR/slurmd-$node.pid"; done
  stop_pid "$DIR/slurmctld.pid"
  stop_pid "$DIR/munge/munged.pid"
  # Job steps of a killed slurmd are orphans of this cluster: end them too (only those: their
  # environment names this cluster's config).
  local pid
  for pid in $(pgrep -f slurmstepd || true); do
    grep -qz "SLURM_CONF=$CONF" "/proc/$pid/environ" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  done
  echo "local-cluster: stopped"
}

status() {
  if pid_alive "$DIR/slurmctld.pid" && nodes_ready; then
    sinfo -N -o '%N %P %t %c %m'
    echo "export SLURM_CONF=$CONF"
  else
    echo "local-cluster: not running"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
