#!/usr/bin/env bash
# launch/torchrun.sh - start largebatch under torchrun from the global batch alone.
#
# USAGE
#   launch/torchrun.sh [--nnodes N] [--nproc-per-node P] [--rdzv-endpoint HOST:PORT] [--dry-run]
#                      [other torchrun options] [--config FILE] [section.key=value ...]
#
#   One node, 2 CPU workers (gloo):
#       launch/torchrun.sh --nproc-per-node 2
#   One node, all its GPUs (nccl):
#       launch/torchrun.sh --nproc-per-node 8 --config configs/cifar10_resnet9.yaml
#   16 nodes x 8 GPUs at a global batch of 8192 (run the same line on every node):
#       launch/torchrun.sh --nnodes 16 --nproc-per-node 8 --rdzv-endpoint node001:29500 \
#           --config configs/imagenet_resnet50_goyal_8k.yaml train.global_batch=8192
#   Elastic: restart the workers up to 3 times after a failure (they resume from the newest
#   checkpoint in run.dir); every other torchrun option passes through the same way:
#       launch/torchrun.sh --nnodes 16 --nproc-per-node 8 --rdzv-endpoint node001:29500 \
#           --max-restarts 3 --rdzv-id job42 --config configs/imagenet_resnet50_goyal_8k.yaml
#   Print the plan and the torchrun command only, on any machine:
#       launch/torchrun.sh --nnodes 16 --nproc-per-node 8 --rdzv-endpoint node001:29500 --dry-run \
#           --config configs/imagenet_resnet50_goyal_8k.yaml
#
# ARGUMENTS
#   --nnodes N            nodes (default 1); an elastic range MIN:MAX is planned for MAX
#   --nproc-per-node P    workers per node: GPUs per node on GPU nodes, 1-2 per socket on CPU (default 1)
#   --rdzv-endpoint H:P   rendezvous host:port, the same on every node (usually the first node and a
#                         free port); needed for more than one node
#   --rdzv-backend B      rendezvous backend (default c10d)
#   --standalone          accepted; implied on one node without --rdzv-endpoint
#   --cpus-per-worker C   CPU threads per worker (OMP_NUM_THREADS); default: the cores of the node
#                         the script runs on / nproc-per-node (inside a Slurm allocation, the cores
#                         it has there: SLURM_CPUS_ON_NODE). Give it with --dry-run on a login node,
#                         whose cores are not the target nodes'
#   --dry-run             print the plan and the command, start nothing
#   --config FILE, section.key=value
#                         go to the trainer (`python -m largebatch.train --help-config`); the plan
#                         counts the training images from data.train_samples where the config sets
#                         it, else from the dataset, which must then be on this machine
#   anything else         goes to torchrun (--max-restarts 3, --rdzv-id ID, --node-rank R, ...), with
#                         its value after it (--rdzv-id ID or --rdzv-id=ID)
#   -h, --help            print this manual
#
# WHAT IT DOES
#   Computes world size = nnodes x nproc-per-node, prints the batch plan with
#   `python -m largebatch.plan` (the trainer's own arithmetic: per-worker batch, micro-batch,
#   accumulation steps, scaled lr, warmup and total steps), refuses a global batch that the world
#   size does not divide (naming the nearest valid ones), sets OMP_NUM_THREADS to cores per worker
#   when it is unset (--cpus-per-worker, else the cores counted on the node it runs on, which a dry
#   run says are this machine's), then execs `python -m torch.distributed.run` (torchrun) with
#   `-m largebatch.train` and the trainer's arguments.
#
# ENVIRONMENT
#   PYTHON            interpreter to use (default: python3)
#   OMP_NUM_THREADS   CPU threads per worker; default here: --cpus-per-worker, else this node's
#                     cores (SLURM_CPUS_ON_NODE in an allocation) / nproc-per-node (torchrun alone
#                     would set 1)
#   NCCL_*, GLOO_SOCKET_IFNAME
#                     passed through to the workers (pick the network interface on multi-NIC nodes)
#   LARGEBATCH_HEARTBEAT_S
#                     seconds between rank 0's progress lines when its output is not a terminal (30)
#
# FAILURE MODES
#   exit 2 before anything starts: a bad argument, or a plan the world cannot run.
#   A worker that exits with an error: torchrun stops the others and reports the failed rank;
#     rank 0 printed the reason on one line (largebatch: error: ... or largebatch: stopped: ...).
#     With --max-restarts the group restarts and resumes from the newest checkpoint.
#   A node that never joins: the other nodes wait at the rendezvous (torchrun's --rdzv-conf
#     join_timeout, 600 s by default), then exit naming the rendezvous.
#
# EXIT STATUS
#   0     every worker finished: the run completed, reached its target with train.stop_at_target,
#         or stopped on SIGTERM/SIGUSR1 after writing a checkpoint (run the same command to resume)
#   1     from torchrun: a worker failed (bad config found by the workers, an agreed stop such as a
#         non-finite loss, a crash); rank 0 printed one line, and torchrun's report after it names
#         the rank and that worker's own status (2 bad input, 3 agreed stop)
#   2     bad input found before anything started, in one line: by this script
#         (launch/torchrun.sh: error: ...) or by the plan (largebatch: error: ...)
#   other torchrun's own status (a rendezvous that failed, an interrupted agent)
set -euo pipefail
LB_NAME=launch/torchrun.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
nnodes=1; nproc=1; endpoint=""; backend=c10d; dry=0; cpus=""; trainer=(); torchrun_opts=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) nnodes=$2; shift 2 ;;
    --nnodes=*) nnodes=${1#*=}; shift ;;
    --nproc-per-node|--nproc_per_node) nproc=$2; shift 2 ;;
    --nproc-per-node=*|--nproc_per_node=*) nproc=${1#*=}; shift ;;
    --rdzv-endpoint|--rdzv_endpoint) endpoint=$2; shift 2 ;;
    --rdzv-endpoint=*|--rdzv_endpoint=*) endpoint=${1#*=}; shift ;;
    --rdzv-backend|--rdzv_backend) backend=$2; shift 2 ;;
    --rdzv-backend=*|--rdzv_backend=*) backend=${1#*=}; shift ;;
    --standalone) shift ;;  # implied for one node without an endpoint
    --cpus-per-worker) lb_positive_int "$1" "${2-}"; cpus=$2; shift 2 ;;
    --cpus-per-worker=*) cpus=${1#*=}; lb_positive_int --cpus-per-worker "$cpus"; shift ;;
    --dry-run) dry=1; shift ;;
    --config) trainer+=("$1" "$2"); shift 2 ;;
    --config=*) trainer+=(--config "${1#*=}"); shift ;;
    --) shift; trainer+=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*)
      torchrun_opts+=("$1")
      if [[ "$1" != *=* && $# -gt 1 && "$2" != -* ]] && ! lb_is_override "$2"; then
        torchrun_opts+=("$2"); shift
      fi
      shift ;;
    *) lb_is_override "$1" || lb_die "'$1' is neither an option nor a section.key=value override"
       trainer+=("$1"); shift ;;
  esac
done
max_nodes=${nnodes##*:}
lb_positive_int --nnodes "$max_nodes"
lb_positive_int --nproc-per-node "$nproc"
world=$((max_nodes * nproc))
[[ "$nnodes" == *:* ]] && echo "elastic --nnodes $nnodes: planned for $max_nodes nodes; the trainer checks the plan again for the world it starts with" >&2
if [[ "$nnodes" == 1 && -z "$endpoint" ]]; then
  rdzv=(--standalone)
else
  [[ -n "$endpoint" ]] || lb_die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT"
  rdzv=(--rdzv-backend "$backend" --rdzv-endpoint "$endpoint")
fi
lb_plan "$world" ${trainer[@]+"${trainer[@]}"}
lb_omp_threads "$nproc" "$cpus" node "$dry"
# ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash < 4.4 as well
cmd=("$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$nproc" "${rdzv[@]}"
     ${torchrun_opts[@]+"${torchrun_opts[@]}"} -m largebatch.train ${trainer[@]+"${trainer[@]}"})
if [[ $dry -eq 1 ]]; then echo "would run: ${cmd[*]}"; exit 0; fi
exec "${cmd[@]}"
