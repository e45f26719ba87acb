#!/usr/bin/env bash
# launch/slurm-single-node.sh - a Slurm cluster of one node, this machine, to try launch/slurm.sbatch.
#
# USAGE
#   sudo launch/slurm-single-node.sh start DIR     start munged, slurmctld and slurmd; state in DIR
#   export SLURM_CONF=DIR/slurm.conf               then sbatch, squeue, sinfo, scontrol talk to it
#   sudo launch/slurm-single-node.sh stop DIR      stop them (DIR and its logs stay)
#
# WHAT IT DOES
#   start: makes a munge key and starts munged with its socket in DIR (a munged of the machine's
#   own, if any, is left alone), writes DIR/slurm.conf for this host (its short name, and the
#   cores and memory `slurmd -C` finds), with free ports, state, spool, pid and log files in DIR,
#   ProctrackType=proctrack/linuxproc, no cgroups, SelectType=select/cons_tres with CR_Core (a
#   job of 2 tasks x 1 cpu fits on 2 cores), JobRequeue=1 and KillWait=60 (the time a task has
#   between SIGTERM and SIGKILL at the time limit or on scancel), credentials that expire after 20 s
#   (a requeued job waits that long, not Slurm's default 2 minutes) and a scheduler that looks at
#   the queue every 5 s, then starts slurmctld and slurmd as root and waits until `sinfo` shows
#   the node idle. It prints the `export SLURM_CONF=...` line.
#   stop: ends the daemons it started, by the pids in DIR. There is no accounting database: ask
#   `scontrol show job ID` for a finished job's ExitCode (kept MinJobAge=3600 s), not sacct.
#   Needs Debian's packages (apt-get install slurmd slurmctld slurm-client munge) and root.
#
# EXIT STATUS
#   0     started (or stopped)
#   2     a bad argument, not root, or a program missing
#   1     a daemon did not start, or the node did not become idle within 60 s; see DIR/log/
set -euo pipefail
die() { echo "launch/slurm-single-node.sh: error: $*" >&2; exit 2; }
fail() { echo "launch/slurm-single-node.sh: $*" >&2; tail -n 5 "$dir"/log/*.log >&2 2>/dev/null || true; stop; exit 1; }

[[ $# -eq 2 && ( "$1" == start || "$1" == stop ) ]] || {
  [[ "${1:-}" == -h || "${1:-}" == --help ]] && { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; }
  die "usage: $0 start|stop DIR"; }
action=$1; mkdir -p "$2"; dir=$(cd "$2" && pwd)

stop() {
  local name pid
  for name in slurmd slurmctld munged; do
    pid=$(cat "$dir/$name.pid" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$name.pid"
  done
}
if [[ $action == stop ]]; then stop; exit 0; fi

[[ $(id -u) -eq 0 ]] || die "slurmctld and slurmd run as root here: run it with sudo"
for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" > /dev/null ||
    die "$tool is not installed: apt-get install -y slurmd slurmctld slurm-client munge"
done
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
host=$(hostname -s)
node=$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=$host/")
mkdir -p "$dir"/{munge,state,spool,log}
chmod 700 "$dir/munge"
[[ -s "$dir/munge/munge.key" ]] || { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
                                     chmod 400 "$dir/munge/munge.key"; }
cat > "$dir/slurm.conf" <<EOF
# Written by launch/slurm-single-node.sh: a cluster of one node, $host.
ClusterName=single
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=20
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=60
MinJobAge=3600
SchedulerParameters=sched_interval=5,bf_interval=5
$node State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf
munged --force --key-file "$dir/munge/munge.key" --socket "$dir/munge/munge.socket" \
  --pid-file "$dir/munged.pid" --log-file "$dir/log/munged.log" --seed-file "$dir/munge/munge.seed" ||
  fail "munged did not start"
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start"
slurmd -f "$SLURM_CONF" || fail "slurmd did not start"
for _ in $(seq 120); do
  state=$(sinfo --noheader --nodes "$host" --format %T 2>/dev/null || true)
  [[ "$state" == idle ]] && break
  sleep 0.5
done
[[ "$state" == idle ]] || { fail "node $host is '${state:-unknown}', not idle, after 60 s"; }
echo "export SLURM_CONF=$SLURM_CONF"
