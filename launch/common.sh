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

# OMP_NUM_THREADS = this node's cores / workers per node, unless already set.
lb_omp_threads() {
  local per_node=$1 cores
  cores=$(nproc)
  if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    export OMP_NUM_THREADS=$(( cores / per_node > 0 ? cores / per_node : 1 ))
  fi
  echo "OMP_NUM_THREADS=$OMP_NUM_THREADS ($cores cores here, $per_node worker(s) per node)" >&2
}
