"""The whole pipeline in one command: data, CLIP, prior, decoder, evaluation, sample grids.

    python -m dalle2.pipeline --preset tiny --out runs/tiny      # ~15 minutes on a 2-core CPU
    python -m dalle2.pipeline                                   # shapes32 on a GPU
    python -m dalle2.pipeline --preset tiny --set clip.train.steps=50 --out /tmp/quick

Each stage runs with --resume: a finished stage (same model, image size and CLIP, at least as many
steps) is skipped, a half-trained one continues, and a checkpoint that does not fit the asked config
is refused with a message. So running the command again after an interruption continues where it
stopped, and asking for more steps trains on. Writes:
    OUT/clip.pt, OUT/prior.pt, OUT/decoder.pt     the three models (+ OUT/<stage>/ logs)
    OUT/samples/grid.png                          samples for a few test captions
    OUT/report/                                   the evaluation report (report.md, report.json, pictures)
    OUT/pretrained/                               the three models exported for DALLE2.from_pretrained (+ model card)
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from clip.train import main as train_clip
from dalle2.core.cli import main_wrapper
from dalle2.core.config import add_config_args, config_from_args
from dalle2.core.images import write_samples
from dalle2.core.runtime import pick_device
from dalle2.evaluation import evaluate
from dalle2.pretrained import hardware
from dalle2.train_decoder import main as train_decoder
from dalle2.train_prior import main as train_prior
from dalle2.unclip import DALLE2
from data.datasets import load_dataset

STAGES = ("clip", "prior", "decoder")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", default="runs", help="run folder (default: runs/)")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-n", type=int, default=None, help="captions to evaluate (default: whole test split, "
                   "at most 500 on CPU)")
    p.add_argument("--skip-eval", action="store_true", help="train and sample only")
    args = p.parse_args(argv)
    cfg = config_from_args(args)  # validate everything before any work starts
    out = Path(args.out)
    common = ["--out", str(out), "--device", args.device, "--quiet"]
    if args.config:
        common += ["--config", args.config]
    common += ["--preset", cfg.preset] + [x for o in args.overrides for x in ("--set", o)]
    print(f"pipeline: preset {cfg.preset}, data {cfg.data.dataset} at {cfg.data.root}, run folder {out}")
    t_all = time.perf_counter()
    timings = {}

    steps = {"clip": train_clip, "prior": train_prior, "decoder": train_decoder}
    for i, stage in enumerate(STAGES, 1):
        t0 = time.perf_counter()
        print(f"[{i}/5] {stage}: {getattr(cfg, stage).train.steps} steps")
        steps[stage](common + ["--resume"])  # the Trainer skips a stage already trained this way
        timings[stage] = time.perf_counter() - t0
        print(f"[{i}/5] {stage}: done in {timings[stage]:.0f} s -> {out / f'{stage}.pt'}")

    t0 = time.perf_counter()
    test = load_dataset(cfg.data, "test", generate_missing=False)
    captions = list(dict.fromkeys(test.caption_of(i) for i in range(len(test))))[:8]
    model = DALLE2.from_run(out).to(pick_device(args.device))
    write_samples(model.to_pil(model.generate(captions, n_per_text=2, seed=0, progress=True)), captions,
                  out / "samples", n_per_text=2)
    del model
    print(f"[4/5] samples: {out / 'samples' / 'grid.png'} ({time.perf_counter() - t0:.0f} s)")

    report = None
    if not args.skip_eval:
        t0 = time.perf_counter()
        eval_args = ["--checkpoints", str(out), "--out", str(out / "report"), "--device", args.device]
        if args.eval_n:
            eval_args += ["--limit", str(args.eval_n)]
        eval_args += common[common.index("--quiet") + 1:]  # the data's location: this config, not the checkpoints'
        report = evaluate.main(eval_args)
        print(f"[5/5] evaluation: {out / 'report' / 'report.md'} ({time.perf_counter() - t0:.0f} s)")

    command = "python -m dalle2.pipeline " + shlex.join(argv if argv is not None else sys.argv[1:])
    DALLE2.from_run(out).save_pretrained(out / "pretrained", card={"command": command,
                                                                   "hardware": hardware(pick_device(args.device))})
    print(f"\npipeline finished in {time.perf_counter() - t_all:.0f} s. Results in {out}/:")
    for stage in STAGES:
        print(f"  {stage + '.pt':<12} {out / f'{stage}.pt'}  (logs: {out / stage}/metrics.jsonl, loss.png)")
    print(f"  {'samples':<12} {out / 'samples'}/grid.png")
    if report is not None:
        print(f"  {'report':<12} {out / 'report'}/report.md")
    print(f"  {'pretrained':<12} {out / 'pretrained'}/  (DALLE2.from_pretrained; model card README.md)")
    # a caption of this run's own data (a CIFAR-10 or folder run knows no pentagons)
    print(f"Draw your own: python sample.py {shlex.quote(captions[0])} --checkpoints {out}")
    return out


if __name__ == "__main__":
    main_wrapper(main)()
