#!/usr/bin/env bash
# The recipe run on a lent GPU (not by CI): data, CLIP, prior and decoder of the default preset, each
# sized to a time budget (--budget: the whole LR schedule completes inside it), then the export in half
# precision (what ships) and the evaluation of that export, whose figures the export's model card then
# carries. Every stage's half-precision EMA weights are written to OUTDIR the moment the stage finishes,
# so a timeout still returns what was trained (.ci/restore_gpu_run.py makes an export of it here).
#
#   bash .ci/gpu_recipe.sh OUTDIR               # the full recipe, about 9 minutes on one H200
#   SMOKE=1 bash .ci/gpu_recipe.sh OUTDIR       # the same path at toy size (tiny preset), under a minute on a GPU
#
# Budgets (minutes) can be changed with CLIP_MIN, PRIOR_MIN, DECODER_MIN; EVAL_N sets the number of test
# captions the reader scores (default 600: seen, zero-shot and position captions); BENCH=1 then runs
# .ci/gpu_bench.sh on the trained weights. OUTDIR gets at most 8 files (what a device call returns):
# log.txt, clip|prior|decoder.safetensors, meta.tgz (configs, tokenizer, model index and card of the
# exported model), grid.png, report.tgz (reports and metrics) and, with BENCH=1, bench.tgz.
# SWEEP=1 then runs the sampler sweep on the trained weights (`python -m dalle2.evaluation.sweep --settings`:
# 50/64-step DDIM, run twice for its noise, against DPM-Solver++(2M) at fewer steps, one of them with
# decoder guidance limited to t/(T-1) in [0.2, 0.8] (Kynkaanniemi et al. 2024); SWEEP_SETTINGS,
# SWEEP_N captions, at most SWEEP_S seconds); its sweep.md names the fewest steps at DDIM's quality and
# lands in report.tgz. SKIP_TRAIN=1 keeps RUN_DIR as it is and runs only SWEEP/BENCH on it (a second
# call on a still-warm machine).
#
# STOP_AT=SECONDS makes the run fit a device call: everything is done SECONDS after the script starts.
# The decoder, trained last, gets DECODER_MIN or the time left less AFTER_S (the seconds the grid,
# evaluations, export and sweep after it need; default 125, 205 with SWEEP=1), whichever is less; the
# sweep and the benchmark get at most the time left. If CLIP fails the run stops at once (every later
# stage needs it), so a broken run returns in seconds, not minutes.
#
# The device plan (15 minutes in all, start-up included; 10 per call; a machine idle 30 s goes back):
#   1. SMOKE=1 SWEEP=1 bash .ci/gpu_recipe.sh $OUT                 timeout 180, one to two minutes
#   2. STOP_AT=580 bash .ci/gpu_recipe.sh $OUT                     timeout 600, straight after: the decoder
#      keeps its whole budget (with SWEEP=1 here it would give the sweep about 80 s of it)
#   3. SKIP_TRAIN=1 SWEEP=1 BENCH=1 STOP_AT=<seconds left - 20> bash .ci/gpu_recipe.sh $OUT, straight after.
#      If the machine went back meanwhile, /tmp/recipe_run is gone: restore call 2's files here into an
#      ignored folder (python .ci/restore_gpu_run.py FILES_AT runs/gpu), carry it and add RUN_DIR=runs/gpu
#      (the sweep then makes the data again, about half a minute).
# In that order of worth: weights and evaluation, then the sweep (the sampling defaults), then the timings.
# Then ship: `python .ci/restore_gpu_run.py FILES_AT runs/gpu`, copy runs/gpu/pretrained to
# checkpoints/shapes32 (SHIPPED prefers it), `git rm -r checkpoints/shapes_cpu` (the CPU-trained fallback it
# replaces) and update the README's quick start, grid and Measured table. To ship the sweep's fewest-step
# setting as the sampling default, run the `python -m dalle2.export ... --sampling ...` line its sweep.md
# ends with, on runs/gpu/pretrained in place of the GPU machine's path (weights unchanged), evaluate that
# export and export it again with --report, as the CPU fallback's card was made (README, "Pretrained
# weights").
set -uo pipefail
out=$(realpath -m "${1:?output folder}")
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15
run=${RUN_DIR:-/tmp/recipe_run}; data=${DATA_DIR:-/tmp/recipe_shapes}
mkdir -p "$out"; [ "${SKIP_TRAIN:-0}" = 1 ] || rm -rf "$run"
exec > >(tee -a "$out/log.txt") 2>&1
if [ "${SMOKE:-0}" = 1 ]; then
  sweep_settings=${SWEEP_SETTINGS:-ddim:4:4,dpmpp2m:2:2,dpmpp2m:2:2:0.5-1}; sweep_n=${SWEEP_N:-8}
  preset=tiny; clip_min=${CLIP_MIN:-0.15}; prior_min=${PRIOR_MIN:-0.1}; dec_min=${DECODER_MIN:-0.15}; eval_n=${EVAL_N:-16}
  size=(data.n_train=512 data.n_test=64)  # on a GPU, the recipe's code path: compiled, bf16 (CUDA only)
  for st in clip prior decoder; do size+=("$st.train.compile=true" "$st.train.precision=bf16"); done
else
  sweep_settings=${SWEEP_SETTINGS:-ddim:50:64,dpmpp2m:8:8,dpmpp2m:10:10,dpmpp2m:15:15,dpmpp2m:20:20,dpmpp2m:15:64,dpmpp2m:15:15:0.2-0.8}
  sweep_n=${SWEEP_N:-300}
  preset=shapes32; clip_min=${CLIP_MIN:-1.3}; prior_min=${PRIOR_MIN:-0.8}; dec_min=${DECODER_MIN:-4.0}; eval_n=${EVAL_N:-600}
  size=()
fi
sets=(--set "data.root=$data"); for kv in "${size[@]}"; do sets+=(--set "$kv"); done
common=(--preset "$preset" --out "$run" --quiet "${sets[@]}")
t_start=$(date +%s); stop_at=${STOP_AT:-0}
log() { echo "=== $(date +%T) (+$(( $(date +%s) - t_start )) s) $*"; }
left() { echo $(( stop_at - ($(date +%s) - t_start) )); }  # seconds to STOP_AT
capped() { if [ "$stop_at" -gt 0 ] && [ "$(left)" -lt "$1" ]; then left; else echo "$1"; fi; }  # min(ARG, left)
bars_out() { tr "\r" "\n" | grep -vE '^[A-Za-z0-9 /_-]+: +[0-9]+%\|'; }  # progress bars out, everything else kept
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# One stage's EMA weights in half precision as OUTDIR/<stage>.safetensors, its config and tokenizer into
# meta/ (tarred), right after the stage: what a timeout later in the run cannot take away.
export_stage() {
  python3 - "$run" "$out" "$1" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import save_file
from dalle2.core.checkpoint import load_checkpoint
run, out, stage = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ckpt = load_checkpoint(run / f"{stage}.pt", stage)
save_file({k: v.half().contiguous() for k, v in ckpt["model"].items()}, str(out / f"{stage}.safetensors"))
meta = out.parent / (out.name + "_meta") / stage
meta.mkdir(parents=True, exist_ok=True)
(meta / "config.json").write_text(json.dumps(ckpt["config"], indent=1))
(meta.parent / "tokenizer.json").write_text(json.dumps(ckpt["tokenizer"]))
(meta / "extra.json").write_text(json.dumps({"step": ckpt["step"], **(ckpt.get("extra") or {})}))
print(f"exported {stage}: step {ckpt['step']}, {out / (stage + '.safetensors')}")
EOF
  tar czf "$out/meta.tgz" -C "${out}_meta" . 2>/dev/null
}

ship() {  # the export's weights and its other files (configs, tokenizer, index, model card) into OUTDIR
  for s in clip prior decoder; do cp "$run/pretrained/$s/model.safetensors" "$out/$s.safetensors" 2>/dev/null; done
  tar czf "$out/meta.tgz" -C "$run/pretrained" --exclude=model.safetensors . 2>/dev/null
}

pack_report() {  # the reports and metrics as they stand
  tar czf "$out/report.tgz" -C "$run" report clip/metrics.jsonl prior/metrics.jsonl decoder/metrics.jsonl \
    clip/config.yml decoder/samples 2>/dev/null
}

make_data() {  # the preset's shapes (generated when missing: training, and a sweep on a fresh machine)
  log "data: shapes for preset $preset into $data"
  python3 -c "
from dalle2.core.config import load_config; from data.datasets import load_dataset
import sys; cfg = load_config(preset='$preset', overrides=sys.argv[1:])
[load_dataset(cfg.data, s) for s in ('train', 'test')]" "data.root=$data" "${size[@]}" 2>&1 | bars_out
}

if [ "${SKIP_TRAIN:-0}" != 1 ]; then
make_data

log "clip: budget $clip_min min"
python3 clip/train.py "${common[@]}" --budget "$clip_min" 2>&1 | bars_out | tail -60
export_stage clip
[ -f "$run/clip.pt" ] || { log "CLIP failed: every later stage needs it, stopping"; exit 1; }
log "prior: budget $prior_min min"
python3 dalle2/train_prior.py "${common[@]}" --budget "$prior_min" 2>&1 | bars_out | tail -60
export_stage prior
if [ "$stop_at" -gt 0 ]; then  # the decoder gets what is left before STOP_AT, less the work after it
  after=${AFTER_S:-$([ "${SWEEP:-0}" = 1 ] && echo 205 || echo 125)}
  dec_min=$(python3 -c "print(round(min($dec_min, max(0.5, ($(left) - $after) / 60)), 2))")
fi
log "decoder: budget $dec_min min"
python3 dalle2/train_decoder.py "${common[@]}" --budget "$dec_min" 2>&1 | bars_out | tail -40
export_stage decoder
log "training done"

recipe="SMOKE=${SMOKE:-0} bash .ci/gpu_recipe.sh (preset $preset, budgets clip $clip_min / prior $prior_min / decoder $dec_min min)"
log "export: the pretrained folder in half precision, what ships (evaluated below, then exported again)"
python3 -m dalle2.export "$run" "$run/pretrained" --half --command "$recipe" 2>&1 | tail -5
ship

log "sample grid: seen pairs, zero-shot pairs, positions"
python3 sample.py "a large gold pentagon and a small blue circle" "a red circle" "a small navy square" \
  "a white rectangle" "a gold triangle" "a blue circle and a green square" "a small teal triangle at the bottom right" \
  "a large purple ellipse at the top left" --n 4 --checkpoints "$run/pretrained" --out /tmp/recipe_samples 2>&1 | tail -3
cp /tmp/recipe_samples/grid.png "$out/grid.png" 2>/dev/null

log "evaluation: CLIP, prior, whole pipeline on the exported weights ($eval_n captions)"
mkdir -p "$run/report"
python3 clip/evaluate.py --checkpoint "$run/clip.pt" --preset "$preset" "${sets[@]}" 2>&1 | bars_out | tee "$run/report/clip_eval.txt"
python3 dalle2/prior/evaluate.py --checkpoint "$run/prior.pt" --preset "$preset" "${sets[@]}" 2>&1 | bars_out | tee "$run/report/prior_eval.txt"
python3 -m dalle2.evaluation.evaluate --checkpoints "$run/pretrained" --out "$run/report" --limit "$eval_n" \
  --preset "$preset" "${sets[@]}" 2>&1 | bars_out | tail -60
pack_report

log "export again: the model card gets the figures just measured on the exported weights"
python3 -m dalle2.export "$run" "$run/pretrained" --half --command "$recipe" 2>&1 | tail -5
ship
fi  # SKIP_TRAIN
weights=$([ -d "$run/pretrained" ] && echo "$run/pretrained" || echo "$run")  # what ships, when exported
[ "${SWEEP:-0}" != 1 ] || [ -f "$data/test/metadata.jsonl" ] || make_data
if [ "${SWEEP:-0}" = 1 ]; then  # which sampler and step counts keep DDIM 50/64's quality (the defaults)
  sweep_s=$(capped "${SWEEP_S:-240}")
  log "sampler sweep: $sweep_settings on $sweep_n captions (at most $sweep_s s)"
  [ "$sweep_s" -ge 30 ] || log "sweep skipped: $sweep_s s left"
  [ "$sweep_s" -lt 30 ] || timeout "$sweep_s" python3 -m dalle2.evaluation.sweep --checkpoints "$weights" --out "$run/report/sweep" \
    --guidance "${SWEEP_GUIDANCE:-3}" --settings "$sweep_settings" --limit "$sweep_n" --preset "$preset" "${sets[@]}" \
    2>&1 | bars_out | tail -30
  pack_report
fi
if [ "${BENCH:-0}" = 1 ]; then  # the sampling timings on the weights just trained, back to back
  log "sampling benchmark on the trained weights (.ci/gpu_bench.sh)"
  quality=$([ -f "$run/report/sweep/sweep.json" ] && echo "--quality $run/report/sweep/sweep.json")
  if [ "$stop_at" -gt 0 ]; then  # eager first; the compiled part gets what is left after it
    export BENCH_EAGER_S=$(capped "${BENCH_EAGER_S:-80}")
    c=$(( $(left) - BENCH_EAGER_S - 5 )); m=${BENCH_COMPILED_S:-100}; export BENCH_COMPILED_S=$(( c < m ? c : m ))
  fi
  BENCH_ARGS="--checkpoints $weights $quality ${BENCH_ARGS:-}" bash .ci/gpu_bench.sh "$run/bench" 2>&1 | tail -40
  tar czf "$out/bench.tgz" -C "$run" bench 2>/dev/null
fi
log "done"
ls -la "$out"
