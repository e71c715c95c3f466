#!/usr/bin/env bash
# The sampling-speed check run on a lent GPU (not by CI), about 2-3 minutes in all: `python -m
# dalle2.evaluation.benchmark` on the shapes32 sizes (random weights; speed does not depend on them), single image
# and batch 256, prior/decoder split, for the config's default (DDIM 50/64), 50-step DDIM and
# DPM-Solver++(2M) at 15, 10 and 20 steps (and 15 with decoder guidance only for t/(T-1) in [0.2, 0.8]);
# eager (bf16 weights, channels_last), then compiled (CUDA
# graphs) for DDIM 50 and dpmpp2m 15. Every case is capped by `timeout`, a failure does not stop the
# others, and the results land in OUTDIR as they come: bench.txt (the tables) and bench.jsonl (one JSON
# line per timed row). For trained weights: BENCH_ARGS="--checkpoints RUN".
# Usage: bash .ci/gpu_bench.sh OUTDIR
# CPU dry run of the script itself (tiny sizes, a few steps):
#   BENCH_DEVICE=cpu BENCH_BS=2 BENCH_REPEATS=1 BENCH_SETTINGS=default,ddim:3:3,dpmpp2m:2:2 \
#   BENCH_COMPILED=ddim:3:3 BENCH_COMPILED_S=400 BENCH_ARGS="--preset tiny --set sampling.steps=3 --set sampling.prior_steps=3" \
#   bash .ci/gpu_bench.sh /tmp/bench
set -uo pipefail
out=$(realpath -m "${1:?output folder}"); mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# A private compile cache: a compile cut off by `timeout` must not leave half-written kernels for others.
if [ -z "${TORCHINDUCTOR_CACHE_DIR:-}" ]; then
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d); trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT
fi
export TORCHINDUCTOR_CACHE_DIR
txt="$out/bench.txt"; jsonl="$out/bench.jsonl"
log() { echo "=== $(date +%T) $*" | tee -a "$txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee -a "$txt"
bench() {  # NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  [ "$limit" -ge 10 ] || { log "$name: skipped ($limit s left)"; return; }  # `timeout 0` would mean no limit
  log "$name"
  timeout "$limit" python3 -m dalle2.evaluation.benchmark --device "${BENCH_DEVICE:-auto}" --batch-sizes "${BENCH_BS:-256}" \
    --repeats "${BENCH_REPEATS:-3}" --jsonl "$jsonl" ${BENCH_ARGS:-} "$@" 2>&1 | grep --line-buffered -v "^\s*$" | tee -a "$txt"
  [ "${PIPESTATUS[0]}" = 0 ] || echo "($name: failed or timed out)" | tee -a "$txt"
}
bench "eager" "${BENCH_EAGER_S:-80}" --data 0 \
  --settings "${BENCH_SETTINGS:-default,ddim:50:50,dpmpp2m:15:15,dpmpp2m:10:10,dpmpp2m:20:20,dpmpp2m:15:15:0.2-0.8}"
bench "compiled (reduce-overhead, CUDA graphs)" "${BENCH_COMPILED_S:-100}" --compile --cost 0 --data 0 \
  --settings "${BENCH_COMPILED:-ddim:50:50,dpmpp2m:15:15}"
log done
