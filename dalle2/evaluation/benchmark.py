"""Sampling speed of the whole pipeline (CLIP text encoder -> prior -> decoder), as a table.

    python -m dalle2.evaluation.benchmark                                   # shapes32-sized models, random weights
    python -m dalle2.evaluation.benchmark --checkpoints runs                # trained models
    python -m dalle2.evaluation.benchmark --preset tiny --device cpu --batch-sizes 8 --single 1
    python -m dalle2.evaluation.benchmark --settings default,ddim:50:50,dpmpp2m:15:15 --jsonl bench.jsonl
    python -m dalle2.evaluation.benchmark --checkpoints runs --device cpu --cold 8 --quality runs/sweep/sweep.json

Speed does not depend on the weights, so without checkpoints the models are built at the preset's
sizes with random weights. `--settings` lists what is timed: "default" (the sampling config: its
sampler, steps and prior steps) and SAMPLER:STEPS[:PRIOR_STEPS] entries (default: the config and
50-step DDIM). Each row is one setting and case (a single image, or a batch), with the seconds split
per stage: prior (with `candidates` samples per caption) and decoder, both with classifier-free
guidance as configured (or `--guidance-scale` for both); "other" is the CLIP text encoder and the
glue. One warm-up run per row is not timed. On CUDA the networks run with bf16 weights and the
decoder in channels_last (`DALLE2.lean`, `--precision fp32` to compare); fp32 on the CPU.
Targets: >= 1,000 images/s at batch 256 on one H200, <= 0.1 s for one image.

`--cold N` adds a row per setting for what a user waits for: a fresh `python sample.py` process drawing
N images of one caption from the weights (--checkpoints, else the shipped ones), interpreter start,
imports, loading, sampling and writing the PNGs and grid included (target: 8 images in < 30 s on a
2-core CPU). `--quality SWEEP_JSON` puts the exact match and CLIP Frechet distance that
`python -m dalle2.evaluation.sweep` measured for the same setting and guidance beside its times.

Before the timings it prints what one image costs at each setting whatever the hardware: GFLOP (matrix
products and convolutions, torch.utils.flop_counter) and dispatched PyTorch operations (about one GPU
kernel launch each, which is what bounds a single image on a GPU). Both are counted on runs of 3-4
steps and extrapolated to the setting's steps, since they grow linearly with the step count.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from clip.model import build_clip
from dalle2.core.cli import main_wrapper
from dalle2.core.config import add_config_args, config_from_args
from dalle2.core.runtime import pick_device
from dalle2.core.tokenizer import Tokenizer
from dalle2.decoder import build_decoder
from dalle2.diffusion import SAMPLERS
from dalle2.pretrained import SHIPPED
from dalle2.prior import build_prior
from dalle2.unclip import DALLE2
from data.captioned import CaptionedImages, StepBatches, build_caption_table
from data.captions import COLOURS, SHAPES

CAPTIONS = ["a large gold pentagon and a small blue circle", "an orange circle", "the small teal triangle",
            "a medium white rectangle and a navy square"]


def random_pipeline(cfg, device):
    """DALLE2 built from a config with random weights (for timing only)."""
    words = [f"a {size} {c} {s}" for size in ("small", "medium", "large") for c in COLOURS for s in SHAPES]
    tok = Tokenizer.build(words + CAPTIONS, cfg.clip.model.context_length)
    clip = build_clip(cfg.clip.model, tok.vocab_size, cfg.data.image_size)
    clip.tokenizer = tok
    model = DALLE2(clip, build_prior(cfg), build_decoder(cfg, tok.vocab_size), sampling=cfg.sampling)
    return model.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_settings(text: str, sampling, option: str = "--settings") -> list[dict]:
    """'default,ddim:50:50,dpmpp2m:15,dpmpp2m:15:15:0.2-0.8' -> [{"name", "sampler", "steps", "prior_steps"},
    ...]; "default" is the sampling config's; a missing PRIOR_STEPS is STEPS; a fourth part LO-HI adds
    "guidance_interval": [LO, HI] (decoder guidance only at steps with t/(T-1) in it)."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item == "default":
            out.append({"name": f"default ({sampling.sampler} {sampling.steps}/{sampling.prior_steps})",
                        "sampler": sampling.sampler, "steps": sampling.steps, "prior_steps": sampling.prior_steps})
            continue
        parts = item.split(":")
        try:
            sampler, steps, prior_steps = parts[0], int(parts[1]), int(parts[2] if len(parts) > 2 else parts[1])
            interval = [float(x) for x in parts[3].split("-")] if len(parts) > 3 else None
        except (IndexError, ValueError):
            raise SystemExit(f"error: {option} {item!r}: expected default or "
                             "SAMPLER:STEPS[:PRIOR_STEPS[:LO-HI]]") from None
        if sampler not in SAMPLERS or len(parts) > 4 or min(steps, prior_steps) < 1:
            raise SystemExit(f"error: {option} {item!r}: the sampler must be one of {', '.join(SAMPLERS)} "
                             "and the step counts positive")
        if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1):
            raise SystemExit(f"error: {option} {item!r}: the guidance interval must be LO-HI with 0 <= LO <= HI <= 1")
        setting = {"name": setting_name(sampler, steps, prior_steps, interval), "sampler": sampler, "steps": steps,
                   "prior_steps": prior_steps}
        out.append(setting if interval is None else {**setting, "guidance_interval": interval})
    return out


def setting_name(sampler: str, steps: int, prior_steps: int, interval=None) -> str:
    """'dpmpp2m 15/15', or 'dpmpp2m 15/15 g0.2-0.8' with a decoder guidance interval."""
    return f"{sampler} {steps}/{prior_steps}" + (f" g{interval[0]:g}-{interval[1]:g}" if interval else "")


class _StageTimer:
    """Seconds spent in model.prior.sample and model.decoder.sample (device synchronised at each stage's
    ends) while active; both stages are timed by wrapping the instances' bound methods."""

    def __init__(self, model):
        self.model, self.seconds = model, {"prior": 0.0, "decoder": 0.0}

    def _wrap(self, stage, fn):
        def timed(*args, **kwargs):
            sync(self.model.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.model.device)
            self.seconds[stage] += time.perf_counter() - t0
            return out
        return timed

    def __enter__(self):
        for stage in self.seconds:
            module = getattr(self.model, stage)
            module.sample = self._wrap(stage, module.sample)
        return self

    def __exit__(self, *exc):
        for stage in self.seconds:
            del getattr(self.model, stage).sample  # back to the class's method


def time_generate(model, n: int, batch_size: int, setting: dict, guidance: Optional[float], repeats: int) -> dict:
    """Median seconds for generating n images at `setting`, in all and per stage:
    {"seconds", "prior", "decoder", "other"} (the median run's split)."""
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    kwargs = dict(steps=setting["steps"], prior_steps=setting["prior_steps"], sampler=setting["sampler"],
                  guidance_scale=guidance, prior_guidance_scale=guidance, batch_size=batch_size,
                  guidance_interval=setting.get("guidance_interval"))
    model.generate(captions, **kwargs)  # warm-up (kernels, allocator, compilation)
    runs = []
    for r in range(repeats):
        with _StageTimer(model) as stages:
            sync(model.device)
            t0 = time.perf_counter()
            model.generate(captions, seed=r, **kwargs)
            sync(model.device)
            total = time.perf_counter() - t0
        runs.append({"seconds": total, **stages.seconds,
                     "other": total - stages.seconds["prior"] - stages.seconds["decoder"]})
    return sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]


def time_cold_start(checkpoints, n: int, setting: dict, guidance: Optional[float], device: str,
                    repeats: int) -> float:
    """Median wall-clock seconds of a fresh `python sample.py` process drawing n images of one caption
    at `setting` from `checkpoints` (start-up, loading and writing the files included)."""
    runs = []
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, find_spec("sample").origin, CAPTIONS[0], "--n", str(n), "--out", out,
                   "--checkpoints", str(checkpoints), "--device", device, "--sampler", setting["sampler"],
                   "--steps", str(setting["steps"]), "--prior-steps", str(setting["prior_steps"]), "--seed", str(r)]
            if guidance is not None:
                cmd += ["--guidance-scale", str(guidance), "--prior-guidance-scale", str(guidance)]
            if setting.get("guidance_interval"):
                cmd += ["--guidance-interval", *map(str, setting["guidance_interval"])]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            runs.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"error: --cold: sample.py failed ({' '.join(cmd)}):\n{done.stderr.strip()[-2000:]}")
    return sorted(runs)[len(runs) // 2]


def sweep_quality(path, settings: list[dict], guidance: tuple[float, float]) -> list[Optional[dict]]:
    """Per setting, {"exact_match", "clip_fd"} of the sweep.json row with the same sampler, step counts
    and (decoder, prior) guidance, or None when the sweep has no such row."""
    try:
        results = json.loads(Path(path).read_text())["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --quality {path}: not a sweep.json of python -m dalle2.evaluation.sweep ({e})")
    def key(st):
        return st["sampler"], st["steps"], st["prior_steps"], st.get("guidance_interval")
    found = []
    for s in settings:
        rows = [r for r in results if key(r["settings"]) == key(s)
                and (r["settings"]["guidance_scale"], r["settings"]["prior_guidance_scale"]) == tuple(guidance)]
        found.append({"exact_match": rows[0]["exact_match"], "clip_fd": (rows[0].get("distance") or {}).get("clip_fd")}
                     if rows else None)
    return found


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def step_costs(model, sampler: str, guidance: Optional[float]):
    """(fixed, per decoder step, per prior step) GFLOP and dispatched ops, each a (2,) tensor, of one image
    with `sampler`: counted at (3, 3), (4, 3) and (3, 4) steps, so a DPM-Solver++ second-order update is
    among the steps counted."""
    def count(dec_steps, pri_steps):
        kwargs = dict(steps=dec_steps, prior_steps=pri_steps, guidance_scale=guidance,
                      prior_guidance_scale=guidance, sampler=sampler, batch_size=1)
        with FlopCounterMode(display=False) as flops:
            model.generate(CAPTIONS[:1], **kwargs)
        with _OpCounter() as ops:  # on its own: nested inside the flop counter it would see fewer
            model.generate(CAPTIONS[:1], **kwargs)
        return torch.tensor([flops.get_total_flops() / 1e9, ops.ops], dtype=torch.float64)

    base, more_dec, more_pri = count(3, 3), count(4, 3), count(3, 4)
    return base - 3 * (more_dec - base) - 3 * (more_pri - base), more_dec - base, more_pri - base


def cost_per_image(setting: dict, costs) -> dict:
    """GFLOP and dispatched ops to generate one image at `setting` from `step_costs`, extrapolated
    linearly in the step counts."""
    fixed, per_dec, per_pri = costs
    total = fixed + setting["steps"] * per_dec + setting["prior_steps"] * per_pri
    return {"gflop": total[0].item(), "ops": total[1].item(), "decoder_gflop_per_step": per_dec[0].item(),
            "prior_gflop_per_step": per_pri[0].item(), "decoder_ops_per_step": per_dec[1].item(),
            "prior_ops_per_step": per_pri[1].item()}


def data_throughput(device, n: int = 20000, batch_size: int = 512, steps: int = 50) -> float:
    """images/s of the training data path (StepBatches + CaptionedImages.sample with flips) on a
    synthetic 32x32 dataset held on `device`: the rate a training step can be fed at."""
    ds = CaptionedImages(torch.zeros(n, 3, 32, 32, dtype=torch.uint8),
                         *build_caption_table([["a red circle at the left"]] * n)).to(device)
    batches = StepBatches(n, batch_size, seed=0)
    ds.sample(batches.indices(0).to(device), batches.generator(0), True)
    sync(device)
    t0 = time.perf_counter()
    for s in range(steps):
        ds.sample(batches.indices(s).to(device), batches.generator(s), True)
    sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--checkpoints", default=None, help="a run folder with clip.pt, prior.pt, decoder.pt, or an export")
    p.add_argument("--device", default="auto")
    p.add_argument("--settings", default="default,ddim:50:50",
                   help="comma list of default | SAMPLER:STEPS[:PRIOR_STEPS] (default: the config, 50-step DDIM)")
    p.add_argument("--batch-sizes", default="256", help="comma-separated batch sizes for throughput rows")
    p.add_argument("--single", type=int, default=1, help="also time one single image (1) or not (0)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="decoder and prior guidance (default: the sampling config's two scales)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="time DALLE2.compile()d networks (CUDA graphs on GPU)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="network weights: auto = bf16 on CUDA, fp32 on the CPU (DALLE2.lean)")
    p.add_argument("--cost", type=int, default=1, help="also count GFLOP and operations per image (1) or not (0)")
    p.add_argument("--data", type=int, default=1, help="also time the training data path (1) or not (0)")
    p.add_argument("--jsonl", default=None, help="append one JSON line per timed row to this file, as it goes")
    p.add_argument("--cold", type=int, default=0,
                   help="also time a fresh `python sample.py` drawing this many images (start-up included)")
    p.add_argument("--quality", default=None, help="a sweep.json: its exact match and CLIP FD beside the times")
    args = p.parse_args(argv)
    weights_dir = args.checkpoints or (SHIPPED if SHIPPED.is_dir() else None)
    if args.cold and weights_dir is None:
        raise SystemExit("error: --cold needs weights to load: pass --checkpoints (no shipped weights in this copy)")
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    if args.checkpoints:
        model = DALLE2.from_pretrained(args.checkpoints).to(device)  # a run folder or an export
        source = args.checkpoints
    else:
        cfg = config_from_args(args)
        model = random_pipeline(cfg, device)
        source = f"preset {cfg.preset} (random weights)"
    settings = parse_settings(args.settings, model.sampling)
    pair = ((args.guidance_scale, args.guidance_scale) if args.guidance_scale is not None else
            (model.sampling.guidance_scale, model.sampling.prior_guidance_scale))
    quality = sweep_quality(args.quality, settings, pair) if args.quality else [None] * len(settings)
    model.eval()
    model.lean({"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision])
    weights = next(model.decoder.unet.parameters()).dtype
    source += f", {str(weights).replace('torch.', '')} weights"
    per_sampler = {}  # the per-step costs depend on the sampler, not on the step counts: count once each
    if args.cost:
        for sampler in dict.fromkeys(s["sampler"] for s in settings):
            per_sampler[sampler] = step_costs(model, sampler, args.guidance_scale)
    # counted at 3-4 steps and extrapolated: not for a guidance interval, where guided steps are a share
    costs = [None if s.get("guidance_interval") else cost_per_image(s, per_sampler[s["sampler"]])
             for s in settings] if args.cost else []
    if args.compile:
        model.compile()
        source += ", compiled"
    n_params = {name: sum(p.numel() for p in getattr(model, name).parameters()) / 1e6
                for name in ("clip", "prior", "decoder")}
    hw = (torch.cuda.get_device_name(device) if device.type == "cuda" else
          f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    guidance = (f"guidance {args.guidance_scale:g} (both)" if args.guidance_scale is not None else
                f"guidance {model.sampling.guidance_scale:g} decoder / {model.sampling.prior_guidance_scale:g} prior")
    print(f"pipeline: {source}; {model.image_size}px; parameters (M): "
          + ", ".join(f"{k} {v:.1f}" for k, v in n_params.items()))
    print(f"device: {hw}; torch {torch.__version__}; {guidance}, {model.sampling.candidates} prior candidates")
    for s, cost in zip(settings, costs):
        if cost is None:
            print(f"{s['name']}: cost not counted (the guided share of the steps depends on the step count)")
            continue
        print(f"{s['name']}: one image costs {cost['gflop']:.1f} GFLOP and {cost['ops']:,.0f} dispatched ops "
              f"(per step: decoder {cost['decoder_gflop_per_step']:.2f} GFLOP / "
              f"{cost['decoder_ops_per_step']:.0f} ops, "
              f"prior {cost['prior_gflop_per_step']:.2f} GFLOP / {cost['prior_ops_per_step']:.0f} ops)")
    print()
    if args.cold:
        print(f"cold start: a fresh `python sample.py` with {weights_dir}")
    if args.quality:
        print(f"quality: {args.quality} at guidance {pair[0]:g} decoder / {pair[1]:g} prior (- = not in the sweep)")
    header = (f"{'setting':<24}{'case':<16}{'images':>7}{'seconds':>9}"
              f"{'prior s':>9}{'decoder s':>10}{'other s':>9}{'images/s':>10}"
              + (f"{'exact':>8}{'CLIP FD':>9}" if args.quality else ""))
    print(header, flush=True)
    cases = (([("single image", 1)] if args.single else [])
             + [(f"batch {b}", int(b)) for b in args.batch_sizes.split(",") if b]
             + ([(f"cold start, {args.cold}", args.cold)] if args.cold else []))
    rows = []
    for s, q in zip(settings, quality):
        for case, n in cases:
            if case.startswith("cold"):
                r = {"seconds": time_cold_start(weights_dir, n, s, args.guidance_scale, args.device, args.repeats),
                     "prior": None, "decoder": None, "other": None}
            else:
                r = time_generate(model, n, n, s, args.guidance_scale, args.repeats)
            row = {"setting": s["name"], "case": case, "images": n, **r, "images_per_s": n / r["seconds"],
                   "device": hw, "pipeline": source, **(q or {})}
            rows.append(row)
            split = "".join(f"{r[k]:>{w}.3f}" if r[k] is not None else f"{'-':>{w}}"
                            for k, w in (("prior", 9), ("decoder", 10), ("other", 9)))
            measured = ("".join(f"{q[k]:>{w}.{d}f}" if q and q[k] is not None else f"{'-':>{w}}"
                                for k, w, d in (("exact_match", 8, 3), ("clip_fd", 9, 4))) if args.quality else "")
            print(f"{s['name']:<24}{case:<16}{n:>7}{r['seconds']:>9.3f}{split}{n / r['seconds']:>10.1f}{measured}",
                  flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    if args.data:
        ips = data_throughput(device)
        print(f"{'training data path':<40}{512:>7}{512 / ips:>9.3f}{'':>28}{ips:>10.1f}")
    return rows


if __name__ == "__main__":
    main_wrapper(main)()
