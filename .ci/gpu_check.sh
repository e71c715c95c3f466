#!/usr/bin/env bash
# The GPU check run on a lent accelerator (not by CI): shapes32 sampling benchmark, then a
# time-boxed shapes32 training of all three stages with their evaluations. Each stage is capped by
# `timeout` (the step counts below are what fits, not the preset's full schedule).
# Usage: bash .ci/gpu_check.sh OUTDIR [PRESET] [CLIP_STEPS PRIOR_STEPS DECODER_STEPS] 2>&1 | tee OUTDIR/log.txt
# Leaves at most 4 files in OUTDIR: log.txt, decoder_grid.png, samples_grid.png, metrics.tgz.
set -uo pipefail
out=$(realpath -m "${1:?output folder}"); preset=${2:-shapes32}
clip_steps=${3:-5000}; prior_steps=${4:-5000}; dec_steps=${5:-2500}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
run=/tmp/gpu_run; mkdir -p "$out"
log() { echo "=== $(date +%T) $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
log benchmark random weights
timeout 120 python3 -m dalle2.benchmark --preset "$preset" --batch-sizes ${BENCH_BS:-256} --repeats 3 2>&1
common=(--preset "$preset" --out $run --quiet --set data.root=/tmp/shapes --set decoder.train.ema_decay=0.999)
log data
python3 data/shapes.py --out /tmp/shapes 2>&1 | tail -1
log clip
timeout 200 python3 clip/train.py --time-limit 2.3 "${common[@]}" --set clip.train.steps=$clip_steps --set clip.train.warmup_steps=200 \
  --set clip.train.eval_every=0 2>&1 | grep -v "it/s]" | tail -40
log prior
timeout 120 python3 dalle2/train_prior.py --time-limit 1.0 "${common[@]}" --set prior.train.steps=$prior_steps --set prior.train.warmup_steps=200 \
  --set prior.train.eval_every=0 2>&1 | grep -v "it/s]" | tail -40
log decoder
timeout 150 python3 dalle2/train_decoder.py --time-limit 1.6 "${common[@]}" --set decoder.train.steps=$dec_steps --set decoder.train.warmup_steps=200 \
  --set decoder.train.sample_every=0 2>&1 | grep -v "it/s]" | tail -15
cp "$(ls $run/decoder/samples/*.png | tail -1)" "$out/decoder_grid.png" 2>/dev/null
log sample trained
timeout 40 python3 sample.py "a large gold pentagon and a small blue circle" "a red circle" "a small navy square" \
  "a white rectangle" --n 4 --checkpoints $run --out /tmp/samples 2>&1 | tail -2
cp /tmp/samples/grid.png "$out/samples_grid.png" 2>/dev/null
tar czf "$out/metrics.tgz" -C $run clip/metrics.jsonl prior/metrics.jsonl decoder/metrics.jsonl clip/config.yml 2>/dev/null
log benchmark trained
timeout 60 python3 -m dalle2.benchmark --checkpoints $run --batch-sizes ${BENCH_BS:-256} --repeats 3 2>&1
log done
