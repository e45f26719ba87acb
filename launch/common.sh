# launch/common.sh - shared by launch/torchrun.sh and launch/mpirun.sh (sourced, not run).
# launch/slurm.sbatch carries its own copy of these few lines: sbatch runs a spooled copy of the
# script, away from this folder.

PYTHON=${PYTHON:-python3}

# A trainer argument: `--config FILE` (handled by the caller) or `section.key=value`.
lb_is_override() { [[ "$1" =~ ^[a-z_]+(\.[a-z_0-9]+)+= ]]; }

lb_die() { echo "$LB_NAME: error: $*" >&2; exit 2; }

lb_positive_int() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || lb_die "$1 takes an integer >= 1, got '$2'"; }

# Print the plan for a world of $1 workers with the trainer's own arithmetic; exit 2 if the world
# cannot run it (the error names the nearest valid global batches).
lb_plan() {
  local world=$1; shift
  "$PYTHON" -m largebatch.plan --world-size "$world" "$@" || exit $?
}

# OMP_NUM_THREADS for the workers, unless already set, printed with where it came from:
#   $2 (--cpus-per-worker C), else, inside a Slurm allocation, SLURM_CPUS_PER_TASK where a worker is
#   a Slurm task ($3 = task; mpirun's ranks) or the node's allocated cores SLURM_CPUS_ON_NODE / $1
#   workers per node, else this machine's cores / $1. $4 = 1 (--dry-run): a value counted on this
#   machine is said to be this machine's, since a login node's cores are not the target nodes'.
lb_omp_threads() {
  local per_node=$1 cpus=${2:-} worker=${3:-} dry=${4:-0} cores from
  if [[ -n "${OMP_NUM_THREADS:-}" ]]; then
    from="set in the environment"
  elif [[ -n "$cpus" ]]; then
    export OMP_NUM_THREADS=$cpus; from="--cpus-per-worker $cpus"
  elif [[ "$worker" == task && -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK; from="SLURM_CPUS_PER_TASK, Slurm's cores per task"
  else
    if [[ -n "${SLURM_CPUS_ON_NODE:-}" ]]; then
      cores=$SLURM_CPUS_ON_NODE; from="SLURM_CPUS_ON_NODE=$cores cores allocated on the node"
    else
      cores=$(nproc); from="$cores cores on this machine"
    fi
    export OMP_NUM_THREADS=$(( cores / per_node > 0 ? cores / per_node : 1 ))
    from="$from / $per_node worker(s) per node"
    if [[ $dry -eq 1 && -z "${SLURM_CPUS_ON_NODE:-}" ]]; then
      from="$from; this machine's count, not necessarily the target nodes': a run counts the cores of the node"
      from="$from $LB_NAME runs on, unless --cpus-per-worker C or OMP_NUM_THREADS gives the threads per worker"
    fi
  fi
  echo "OMP_NUM_THREADS=$OMP_NUM_THREADS ($from)" >&2
}
