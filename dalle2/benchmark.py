"""Sampling speed of the whole pipeline (CLIP text encoder -> prior -> decoder), as a table.

    python -m dalle2.benchmark                                   # shapes32-sized models, random weights
    python -m dalle2.benchmark --checkpoints runs                # trained models
    python -m dalle2.benchmark --preset tiny --device cpu --batch-sizes 8 --single 0

Speed does not depend on the weights, so without checkpoints the models are built at the preset's
sizes with random weights. Each row: prior with `candidates` samples per caption and decoder, both
with DDIM and classifier-free guidance, at `--steps` steps; one warm-up run is not timed.
Targets (issue 5): >= 500 images/s at batch 256 on one GPU, < 0.5 s for a single 32x32 image,
8 tiny-preset images in < 30 s on a 2-core CPU.

Before the timings it prints what one image costs whatever the hardware: GFLOP (matrix products and
convolutions, torch.utils.flop_counter) and dispatched PyTorch operations (about one GPU kernel launch
each, which is what bounds a single image on a GPU). Both are counted on runs of 2-3 steps and
extrapolated to `--steps`, since they grow linearly with the step count.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dalle2.cli import main_wrapper
from dalle2.config import add_config_args, config_from_args
from dalle2.training import pick_device

CAPTIONS = ["a large gold pentagon and a small blue circle", "an orange circle", "the small teal triangle",
            "a medium white rectangle and a navy square"]


def random_pipeline(cfg, device):
    """DALLE2 built from a config with random weights (for timing only)."""
    from clip.model import build_clip
    from dalle2.decoder import build_decoder
    from dalle2.prior import build_prior
    from dalle2.tokenizer import Tokenizer
    from dalle2.unclip import DALLE2
    from data.shapes import COLOURS, SHAPES
    words = [f"a {size} {c} {s}" for size in ("small", "medium", "large") for c in COLOURS for s in SHAPES]
    tok = Tokenizer.build(words + CAPTIONS, cfg.clip.model.context_length)
    clip = build_clip(cfg.clip.model, tok.vocab_size, cfg.data.image_size)
    clip.tokenizer = tok
    model = DALLE2(clip, build_prior(cfg), build_decoder(cfg, tok.vocab_size), sampling=cfg.sampling)
    return model.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_generate(model, n: int, batch_size: int, steps: int, prior_steps: int, guidance: float, repeats: int) -> float:
    """Median seconds for generating n images."""
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    kwargs = dict(steps=steps, prior_steps=prior_steps, guidance_scale=guidance, prior_guidance_scale=guidance,
                  sampler="ddim", batch_size=batch_size)
    model.generate(captions, **kwargs)  # warm-up (kernels, allocator)
    times = []
    for r in range(repeats):
        sync(model.device)
        t0 = time.perf_counter()
        model.generate(captions, seed=r, **kwargs)
        sync(model.device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def cost_per_image(model, steps: int, prior_steps: int, guidance: float) -> dict:
    """GFLOP and dispatched ops to generate one image: fixed + per decoder step + per prior step,
    counted at (2, 2), (3, 2) and (2, 3) steps and extrapolated."""
    def count(dec_steps, pri_steps):
        kwargs = dict(steps=dec_steps, prior_steps=pri_steps, guidance_scale=guidance,
                      prior_guidance_scale=guidance, sampler="ddim", batch_size=1)
        with FlopCounterMode(display=False) as flops:
            model.generate(CAPTIONS[:1], **kwargs)
        with _OpCounter() as ops:  # on its own: nested inside the flop counter it would see fewer
            model.generate(CAPTIONS[:1], **kwargs)
        return torch.tensor([flops.get_total_flops() / 1e9, ops.ops], dtype=torch.float64)

    base, more_dec, more_pri = count(2, 2), count(3, 2), count(2, 3)
    per_dec, per_pri = more_dec - base, more_pri - base
    total = base + (steps - 2) * per_dec + (prior_steps - 2) * per_pri
    return {"gflop": total[0].item(), "ops": total[1].item(), "decoder_gflop_per_step": per_dec[0].item(),
            "prior_gflop_per_step": per_pri[0].item(), "decoder_ops_per_step": per_dec[1].item(),
            "prior_ops_per_step": per_pri[1].item()}


def data_throughput(device, n: int = 20000, batch_size: int = 512, steps: int = 50) -> float:
    """images/s of the training data path (StepBatches + CaptionedImages.sample with flips) on a
    synthetic 32x32 dataset held on `device`: the rate a training step can be fed at."""
    from data.datasets import CaptionedImages, StepBatches, build_caption_table
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
    p.add_argument("--batch-sizes", default="256", help="comma-separated batch sizes for throughput rows")
    p.add_argument("--single", type=int, default=1, help="also time one single image (1) or not (0)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prior-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="time DALLE2.compile()d networks (CUDA graphs on GPU)")
    p.add_argument("--channels-last", action="store_true", help="decoder UNet in channels_last memory format")
    p.add_argument("--cost", type=int, default=1, help="also count GFLOP and operations per image (1) or not (0)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    if args.checkpoints:
        from dalle2.unclip import DALLE2
        model = DALLE2.from_pretrained(args.checkpoints).to(device)  # a run folder or an export
        source = args.checkpoints
    else:
        cfg = config_from_args(args)
        model = random_pipeline(cfg, device)
        source = f"preset {cfg.preset} (random weights)"
    model.eval()
    cost = cost_per_image(model, args.steps, args.prior_steps, args.guidance_scale) if args.cost else None
    if args.channels_last:
        model.decoder.unet.to(memory_format=torch.channels_last)
        source += ", channels_last"
    if args.compile:
        model.compile()
        source += ", compiled"
    n_params = {name: sum(p.numel() for p in getattr(model, name).parameters()) / 1e6 for name in ("clip", "prior", "decoder")}
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"pipeline: {source}; {model.image_size}px; parameters (M): "
          + ", ".join(f"{k} {v:.1f}" for k, v in n_params.items()))
    print(f"device: {hw}; torch {torch.__version__}; DDIM {args.steps} decoder / {args.prior_steps} prior steps, "
          f"guidance {args.guidance_scale}, {model.sampling.candidates} prior candidates")
    if cost:
        print(f"one image costs {cost['gflop']:.1f} GFLOP and {cost['ops']:,.0f} dispatched ops "
              f"(per step: decoder {cost['decoder_gflop_per_step']:.2f} GFLOP / {cost['decoder_ops_per_step']:.0f} ops, "
              f"prior {cost['prior_gflop_per_step']:.2f} GFLOP / {cost['prior_ops_per_step']:.0f} ops; "
              "with guidance and candidates)")
    print()
    rows = []
    if args.single:
        s = time_generate(model, 1, 1, args.steps, args.prior_steps, args.guidance_scale, args.repeats)
        rows.append(("single image", 1, s, 1 / s))
    for bs in (int(b) for b in args.batch_sizes.split(",") if b):
        s = time_generate(model, bs, bs, args.steps, args.prior_steps, args.guidance_scale, args.repeats)
        rows.append((f"batch {bs}", bs, s, bs / s))
    ips = data_throughput(device)
    rows.append(("data path", 512, 512 / ips, ips))
    print(f"{'case':<16}{'images':>8}{'seconds':>10}{'images/s':>11}")
    for name, n, s, ips in rows:
        print(f"{name:<16}{n:>8}{s:>10.3f}{ips:>11.1f}")
    return rows


if __name__ == "__main__":
    main_wrapper(main)()
