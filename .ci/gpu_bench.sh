#!/usr/bin/env bash
# The sampling-speed check run on a lent GPU (not by CI): `python -m dalle2.benchmark` on the shapes32
# sizes (random weights; speed does not depend on them), eager, then channels_last, then compiled
# (CUDA graphs), then the old 128-channel decoder for comparison. Every case is capped by `timeout` and
# a failure does not stop the others. About 5-6 minutes on an H200.
# Usage: bash .ci/gpu_bench.sh OUTDIR 2>&1 | tee OUTDIR/bench.txt
# (a CPU dry run of the script itself: BENCH_BS=2 BENCH_REPEATS=1 BENCH_ARGS="--preset tiny --steps 5 --prior-steps 5")
set -uo pipefail
out=$(realpath -m "${1:?output folder}"); mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
log() { echo "=== $(date +%T) $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
bench() {  # NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  log "$name"
  timeout "$limit" python3 -m dalle2.benchmark --batch-sizes ${BENCH_BS:-256} --repeats ${BENCH_REPEATS:-3} ${BENCH_ARGS:-} "$@" 2>&1 | grep -v "^\s*$" || echo "($name: failed or timed out)"
}
bench "eager" 90
bench "eager, channels_last" 60 --channels-last --cost 0
bench "compiled (reduce-overhead)" 300 --compile --cost 0
bench "eager, 128-channel decoder (the previous default)" 60 --set decoder.model.channels=128 --cost 0
log done
