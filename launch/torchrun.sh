#!/usr/bin/env bash
# launch/torchrun.sh - start largebatch under torchrun from the global batch alone.
#
# USAGE
#   launch/torchrun.sh [--nnodes N] [--nproc-per-node P] [--rdzv-endpoint HOST:PORT] [--dry-run]
#                      [--config FILE] [key=value ...]
#
#   One node, 2 CPU workers (gloo):
#       launch/torchrun.sh --nproc-per-node 2
#   16 nodes x 8 GPUs at a global batch of 8192 (run the same line on every node):
#       launch/torchrun.sh --nnodes 16 --nproc-per-node 8 --rdzv-endpoint node001:29500 \
#           --config configs/X.yaml train.global_batch=8192
#   Print the plan only:
#       launch/torchrun.sh --nnodes 16 --nproc-per-node 8 --dry-run train.global_batch=8192
#
# WHAT IT DOES
#   Computes world size = nnodes x nproc-per-node, prints the batch plan with
#   `python -m largebatch.plan` (the trainer's own arithmetic: per-worker batch, micro-batch,
#   accumulation steps, scaled lr, warmup and total steps), refuses a global batch that the world
#   size does not divide (naming the nearest valid ones), sets OMP_NUM_THREADS to cores per worker
#   when it is unset, then execs torchrun.
#
# ENVIRONMENT
#   PYTHON            interpreter to use (default: python3)
#   OMP_NUM_THREADS   CPU threads per worker; default here: cores / nproc-per-node
#                     (torchrun alone would set 1)
#
# EXIT STATUS
#   2 on a bad argument or a plan the world cannot run; otherwise torchrun's status.
set -euo pipefail
PYTHON=${PYTHON:-python3}
nnodes=1; nproc=1; endpoint=""; dry=0; passthrough=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) nnodes=$2; shift 2 ;;
    --nproc-per-node|--nproc_per_node) nproc=$2; shift 2 ;;
    --rdzv-endpoint|--rdzv_endpoint) endpoint=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) passthrough+=("$1"); shift ;;
  esac
done
[[ "$nnodes" =~ ^[1-9][0-9]*$ && "$nproc" =~ ^[1-9][0-9]*$ ]] || {
  echo "launch/torchrun.sh: error: --nnodes and --nproc-per-node take integers >= 1" >&2; exit 2; }
world=$((nnodes * nproc))
"$PYTHON" -m largebatch.plan --world-size "$world" "${passthrough[@]}" || exit $?
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  export OMP_NUM_THREADS=$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))
fi
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2
if [[ $nnodes -eq 1 && -z "$endpoint" ]]; then
  rdzv=(--standalone)
else
  [[ -n "$endpoint" ]] || { echo "launch/torchrun.sh: error: --nnodes $nnodes needs --rdzv-endpoint HOST:PORT" >&2; exit 2; }
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$endpoint")
fi
cmd=("$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$nproc" "${rdzv[@]}"
     -m largebatch.train "${passthrough[@]}")
if [[ $dry -eq 1 ]]; then echo "would run: ${cmd[*]}"; exit 0; fi
exec "${cmd[@]}"
