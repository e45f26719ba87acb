#!/usr/bin/env bash
# launch/mpirun.sh - start largebatch under mpirun (Open MPI, MPICH or Intel MPI) from the global batch.
#
# USAGE
#   launch/mpirun.sh -np N [--ranks-per-node R] [--hostfile FILE | --hosts H1,H2,...] [--dry-run]
#                    [other mpirun options] [--config FILE] [section.key=value ...]
#
#   One machine, 4 CPU workers, gradients over gloo:
#       launch/mpirun.sh -np 4
#   A CPU cluster, 512 ranks, 2 per node (one per socket), gradients over MPI, batch 32768:
#       launch/mpirun.sh -np 512 --ranks-per-node 2 --hostfile hosts.txt \
#           --config configs/imagenet_resnet50_lars_32k.yaml comm.backend=mpi
#   Binding and mapping pass through to mpirun as they are (Open MPI spells them --bind-to,
#   MPICH and Intel MPI -bind-to):
#       launch/mpirun.sh -np 64 --ranks-per-node 2 --hostfile hosts.txt --bind-to socket \
#           --config configs/imagenet_resnet50_lars_32k.yaml comm.backend=mpi
#       launch/mpirun.sh -np 64 --ranks-per-node 2 --hostfile hosts.txt -bind-to socket \
#           --config configs/imagenet_resnet50_lars_32k.yaml comm.backend=mpi
#   GPU nodes, 8 GPUs each (nccl; MPI only starts the workers and finds rank 0):
#       launch/mpirun.sh -np 128 --ranks-per-node 8 --hostfile hosts.txt \
#           --config configs/imagenet_resnet50_goyal_8k.yaml
#   Print the plan and the mpirun command only (no MPI needed; the hostfile need not exist):
#       launch/mpirun.sh -np 512 --ranks-per-node 2 --dry-run --config configs/imagenet_resnet50_lars_32k.yaml
#
# ARGUMENTS
#   -np N, -n N           ranks (workers) in all; default: SLURM_NTASKS inside a Slurm allocation
#   --ranks-per-node R    ranks per node (default: N / hosts, or N on one machine); sets the mapping
#                         (Open MPI: --map-by ppr:R:node, MPICH/Intel MPI: -ppn R) and the threads
#   --hostfile FILE       one host per line (Open MPI's 'slots=' and MPICH's 'host:n' forms both work)
#   --hosts H1,H2,...     hosts, comma-separated
#   --cpus-per-worker C   CPU threads per rank (OMP_NUM_THREADS, exported to every rank); default:
#                         SLURM_CPUS_PER_TASK inside a Slurm allocation, else the launching node's
#                         cores (SLURM_CPUS_ON_NODE there) / R. Give it with --dry-run on a login
#                         node, whose cores are not the target nodes'
#   --dry-run             print the plan and the command, start nothing; without an MPI on PATH the
#                         command is shown in Hydra's form (MPICH, Intel MPI) and says so
#   --config FILE, section.key=value
#                         go to the trainer (`python -m largebatch.train --help-config`); put them
#                         after `--` if one could be read as an mpirun option's value. The plan
#                         counts the training images from data.train_samples where the config sets
#                         it, else from the dataset, which must then be on this machine
#   anything else         goes to mpirun (-bind-to core, --mca btl ..., -genv FOO bar, -x FOO=bar)
#   -h, --help            print this manual
#
# WHAT IT DOES
#   Prints the batch plan for N workers with `python -m largebatch.plan` (per-worker batch,
#   micro-batch, accumulation steps, scaled lr, warmup and total steps), refuses a global batch N
#   does not divide (naming the nearest valid ones), sets OMP_NUM_THREADS when unset (--cpus-per-worker,
#   else Slurm's cores per task, else this node's cores / R, which a dry run says are this
#   machine's) and exports it to every rank, then execs mpirun in the form of the MPI it finds
#   (`mpirun --version`: Open MPI, else Hydra), printing which one. Each rank finds its rank, world
#   size and local rank from the MPI launcher's variables; rank 0 picks the rendezvous address
#   and a free port and broadcasts them with MPI (mpi4py) before the process group starts.
#
# ENVIRONMENT
#   PYTHON            interpreter on every node (default: python3)
#   MPIRUN            the mpirun to use (default: mpirun, else mpiexec, on PATH)
#   LARGEBATCH_HEARTBEAT_S
#                     seconds between rank 0's progress lines when its output is not a terminal (30)
#   OMP_NUM_THREADS   CPU threads per rank; default here: --cpus-per-worker, else SLURM_CPUS_PER_TASK,
#                     else cores / ranks-per-node (cores counted on the launching node:
#                     SLURM_CPUS_ON_NODE in an allocation, else nproc; nodes are assumed alike)
#   MASTER_ADDR, MASTER_PORT
#                     rendezvous endpoint; when both are set no MPI broadcast is needed (mpi4py
#                     optional); comm.master_addr=HOST picks the address only
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME
#                     the network interface on multi-NIC nodes (exported to every rank)
#
# FAILURE MODES
#   exit 2 before anything starts: a bad argument, no -np, a plan the world cannot run, or no
#     mpirun/mpiexec on PATH (load your MPI module, pip install 'largebatch[mpi]', or set MPIRUN).
#   Bad config: every rank exits 2 and rank 0 prints one line; mpirun then ends the job.
#   A rank that dies: mpirun kills the others (MPI's default), and mpirun's status is nonzero.
#   mpi4py missing and MASTER_ADDR/MASTER_PORT unset: every rank exits 2 naming both fixes.
#   comm.backend=mpi with a different MPI than the one that launched: MPI sees a world of 1;
#     every rank exits 2 saying so.
#
# EXIT STATUS
#   0     every rank finished: the run completed, reached its target with train.stop_at_target,
#         or stopped on SIGTERM/SIGUSR1 after writing a checkpoint (run the same command to resume)
#   2     bad input, in one line: found by this script (launch/mpirun.sh: error: ...) or the plan
#         before anything started, or by the ranks (largebatch: error: ..., from rank 0)
#   3     an agreed stop (largebatch: stopped: ..., from rank 0), e.g. a non-finite loss
#   other mpirun's status: MPICH and Open MPI pass on a failed rank's status, or give their own
#         when a rank was killed or a node was lost
set -euo pipefail
LB_NAME=launch/mpirun.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
np="${SLURM_NTASKS:-}"; per_node=""; hostfile=""; hosts=""; dry=0; cpus=""; trainer=(); mpi_opts=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -np|-n|--np|-c) np=$2; shift 2 ;;
    --np=*|-np=*) np=${1#*=}; shift ;;
    --ranks-per-node) per_node=$2; shift 2 ;;
    --ranks-per-node=*) per_node=${1#*=}; shift ;;
    --hostfile|-hostfile|-f|--machinefile|-machinefile) hostfile=$2; shift 2 ;;
    --hostfile=*|--machinefile=*) hostfile=${1#*=}; shift ;;
    --hosts|-hosts|--host|-host|-H) hosts=$2; shift 2 ;;
    --hosts=*|--host=*) hosts=${1#*=}; shift ;;
    --cpus-per-worker) lb_positive_int "$1" "${2-}"; cpus=$2; shift 2 ;;
    --cpus-per-worker=*) cpus=${1#*=}; lb_positive_int --cpus-per-worker "$cpus"; shift ;;
    --dry-run) dry=1; shift ;;
    --config) trainer+=("$1" "$2"); shift 2 ;;
    --config=*) trainer+=(--config "${1#*=}"); shift ;;
    # Options that take two values: a name and its value.
    -genv|--genv|-env|--env|-mca|--mca|-gmca|--gmca|--prtemca|--pmixmca)
      [[ $# -ge 3 ]] || lb_die "$1 takes a name and a value"
      mpi_opts+=("$1" "$2" "$3"); shift 3 ;;
    --) shift; trainer+=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*)
      mpi_opts+=("$1")
      # An option's value, if any, follows it.
      if [[ "$1" != *=* && $# -gt 1 && "$2" != -* ]] && ! lb_is_override "$2"; then
        mpi_opts+=("$2"); shift
      fi
      shift ;;
    *) lb_is_override "$1" || lb_die "'$1' is neither an option nor a section.key=value override"
       trainer+=("$1"); shift ;;
  esac
done
[[ -n "$np" ]] || lb_die "give the number of ranks with -np N"
lb_positive_int -np "$np"
num_hosts=0
if [[ -n "$hostfile" ]]; then
  if [[ -f "$hostfile" ]]; then
    num_hosts=$(grep -cvE '^\s*(#|$)' "$hostfile" || true)
  elif [[ $dry -eq 0 ]]; then
    lb_die "--hostfile '$hostfile' does not exist"
  fi
elif [[ -n "$hosts" ]]; then
  IFS=, read -ra host_list <<< "$hosts"; num_hosts=${#host_list[@]}
else
  # Inside a Slurm allocation mpirun spreads over its nodes.
  num_hosts=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-0}}
fi
if [[ -z "$per_node" ]]; then
  per_node=$(( num_hosts > 0 ? (np + num_hosts - 1) / num_hosts : np ))
fi
lb_positive_int --ranks-per-node "$per_node"
lb_plan "$np" ${trainer[@]+"${trainer[@]}"}
lb_omp_threads "$per_node" "$cpus" task "$dry"

MPIRUN=${MPIRUN:-$(command -v mpirun || command -v mpiexec || true)}
found=1
if [[ -n "$MPIRUN" ]] && command -v "$MPIRUN" > /dev/null; then
  version=$("$MPIRUN" --version 2>&1 || true)
elif [[ $dry -eq 1 ]]; then
  found=0; MPIRUN=${MPIRUN:-mpirun}; version=""
elif [[ -n "$MPIRUN" ]]; then
  lb_die "MPIRUN='$MPIRUN' is not a command; set it to your MPI's mpirun or mpiexec"
else
  lb_die "no mpirun or mpiexec on PATH; load your MPI module, pip install 'largebatch[mpi]', or set MPIRUN"
fi
exported=(OMP_NUM_THREADS)
for v in PYTHONPATH MASTER_ADDR MASTER_PORT GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
  [[ -n "${!v:-}" ]] && exported+=("$v")
done
cmd=("$MPIRUN" -np "$np")
if [[ "$version" == *"Open MPI"* || "$version" == *"OpenRTE"* || "$version" == *"PRRTE"* ]]; then
  flavor="Open MPI"
  cmd+=(--map-by "ppr:$per_node:node")
  for v in "${exported[@]}"; do cmd+=(-x "$v"); done
  [[ -n "$hostfile" ]] && cmd+=(--hostfile "$hostfile")
  # Open MPI gives a host named without a slot count one slot: ask for R on each.
  [[ -n "$hosts" ]] && cmd+=(--host "$(sed -E "s/(^|,)([^,:]+)(,|$)/\1\2:$per_node\3/g; s/(^|,)([^,:]+)(,|$)/\1\2:$per_node\3/g" <<< "$hosts")")
else
  # MPICH's and Intel MPI's Hydra (and MVAPICH2's mpirun_rsh-compatible mpiexec).
  flavor="Hydra (MPICH, Intel MPI)"
  cmd+=(-ppn "$per_node")
  for v in "${exported[@]}"; do cmd+=(-genv "$v" "${!v}"); done
  [[ -n "$hostfile" ]] && cmd+=(-f "$hostfile")
  [[ -n "$hosts" ]] && cmd+=(-hosts "$hosts")
fi
cmd+=(${mpi_opts[@]+"${mpi_opts[@]}"} "$PYTHON" -m largebatch.train ${trainer[@]+"${trainer[@]}"})
if [[ $found -eq 1 ]]; then
  echo "mpirun: $MPIRUN ($flavor), $np ranks, $per_node per node" >&2
else
  echo "mpirun: no MPI launcher found (no mpirun or mpiexec on PATH, MPIRUN unset or not a command);" \
       "showing the command for $flavor, $np ranks, $per_node per node. To run it: load your MPI module," \
       "pip install 'largebatch[mpi]', or set MPIRUN=/path/to/mpirun" >&2
fi
if [[ $dry -eq 1 ]]; then echo "would run: ${cmd[*]}"; exit 0; fi
exec "${cmd[@]}"
