#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one call, on a machine with at least one. The parts, in order:
#
#   env               nvidia-smi, torch's version and CUDA build, the GPUs, whether mpiexec is there
#   cuda-tests        the CUDA tests alone (-k "cuda or gpu" over the files that hold them), spread
#                     test by test over CUDA_TESTS_WORKERS pytest workers (default 6)
#   bench-optim       python -m largebatch.bench optim --workers 1 (LARS/LAMB against SGD)
#   bench-throughput  python -m largebatch.bench throughput --workers 1 $THROUGHPUT_ARGS (the engine
#                     against a plain loop; both cases by default, which compiles ResNet-50 cold
#                     several times: THROUGHPUT_ARGS="--case resnet9" takes about a minute)
#   suite             the whole suite with the GPUs visible (CPU tests pin the CPU), SUITE_WORKERS
#                     pytest workers (default 12)
#
# PARTS (default: all of them, in that order) picks some. Each part runs under its own limit in
# seconds (ENV_S, CUDA_TESTS_S, OPTIM_S, THROUGHPUT_S, SUITE_S), writes DIR/<part>.log and prints
# its exit status (124: out of time), its time and its log's end; nothing else runs beside a
# benchmark. A failing test's report is appended to DIR/failures.txt as it fails, so a part stopped
# by its limit still says why (tests/conftest.py, LARGEBATCH_TEST_FAILURES); the benchmarks write
# their JSON to DIR.
#
# On one H200 (torch 2.11): bench optim took 12 s; bench throughput --case resnet9 --rounds 5 about
# a minute; the 35 CUDA tests did not finish in 150 s on 4 workers taking whole files (the reason
# this script spreads them test by test). A 10-minute call fits env, cuda-tests, bench-optim and
# bench-throughput with THROUGHPUT_ARGS="--case resnet9"; the suite and ResNet-50 want calls of
# their own.
#
# usage: [PARTS="cuda-tests bench-optim"] bash benchmarks/gpu_checks.sh [DIR]   (DIR: runs/gpu-checks)
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-checks}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 LARGEBATCH_TEST_FAILURES="$out/failures.txt"
parts=${PARTS:-env cuda-tests bench-optim bench-throughput suite}

part() {  # part NAME LIMIT_S COMMAND...: COMMAND under LIMIT_S, its output to DIR/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  [[ " $parts " == *" $name "* ]] || return 0
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s; 124: out of time)"
  grep -v "PytestBenchmarkWarning\|warner(" "$out/$name.log" | tail -n "${TAIL:-30}"
}

part env "${ENV_S:-60}" bash -c 'nvidia-smi; python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"GPUs\", torch.cuda.device_count(), torch.cuda.get_device_name(0))"; echo "mpiexec: $(command -v mpiexec || echo none)"'
TAIL=50 part cuda-tests "${CUDA_TESTS_S:-240}" python3 -m pytest -p no:cacheprovider -v --tb=short -rfEs \
  -n "${CUDA_TESTS_WORKERS:-6}" --dist load -k "cuda or gpu" \
  tests/test_cuda.py tests/test_optim_cuda.py tests/test_device_data.py tests/test_optim.py tests/test_shard.py \
  tests/test_precision.py tests/test_bench.py tests/test_engine_speed.py
part bench-optim "${OPTIM_S:-120}" python3 -m largebatch.bench optim --workers 1 --out "$out"
TAIL=40 part bench-throughput "${THROUGHPUT_S:-600}" python3 -m largebatch.bench throughput --workers 1 \
  ${THROUGHPUT_ARGS:-} --out "$out"
TAIL=60 part suite "${SUITE_S:-600}" python3 -m pytest -p no:cacheprovider -q -n "${SUITE_WORKERS:-12}" --dist loadfile
[[ -s "$out/failures.txt" ]] && echo "== failing tests' reports: $out/failures.txt" || true
