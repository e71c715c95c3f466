"""Text to image from the command line: a thin face over `DALLE2.generate`.

    python sample.py "a large gold pentagon and a small blue circle"
    python sample.py "a red circle" "a small navy square" --n 4 --checkpoints runs --out samples
    python sample.py --prompts prompts.txt --guidance-scale 3 --steps 50 --seed 0

Writes OUT/0000.png, 0001.png, ... in prompt order (OUT/0000_0.png, 0000_1.png, ... with --n > 1) and
OUT/grid.png with the captions under the images. Same caption, seed and settings: same image, whatever
the other captions, the batch size and the device (each image draws its own noise). --seed 3 gives image
m of a caption seed 3 + m; --seed 3,8,9 gives one seed per image. Every PNG carries its caption and
settings (seed, guidance, steps, sampler, the weights' hashes) as JSON in its "dalle2" text chunk, and
OUT/samples.jsonl holds the same, one line per image.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from dalle2 import DALLE2
from dalle2.core.cli import main_wrapper, read_prompts
from dalle2.core.files import clean_orphans
from dalle2.core.images import (
    captioned_grid,
    sample_names,
    save_image_atomic,
    save_sample,
    write_sample_records,
    write_samples,
)
from dalle2.core.runtime import pick_device
from dalle2.diffusion import SAMPLERS
from dalle2.pretrained import shipped_or
from dalle2.unclip import image_seeds


def seeds(text: str) -> int | list[int]:
    """--seed: '3' -> 3, '3,8,9' -> [3, 8, 9]."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or a comma list of ints, got {text!r}") from None
    return values[0] if len(values) == 1 and "," not in text else values


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: {out}: cannot create the output folder ({e.strerror})")
    if not os.access(out, os.W_OK):
        raise SystemExit(f"error: {out}: the output folder is not writable")


def sample_records(model, args, captions: list[str]) -> list[dict]:
    """One dict per image (rows: caption 0 sample 0, caption 0 sample 1, ...) with everything that
    decides it: the caption, its row in the call, the resolved sampling settings and the hashes of
    the three networks' weights."""
    s = model.sampling

    def pick(value, name):
        return getattr(s, name) if value is None else value
    common = {
        "seed": args.seed, "n_per_text": args.n, "batch_size": pick(args.batch_size, "batch_size"),
        "guidance_scale": pick(args.guidance_scale, "guidance_scale"),
        "prior_guidance_scale": pick(args.prior_guidance_scale, "prior_guidance_scale"),
        "steps": pick(args.steps, "steps"), "prior_steps": pick(args.prior_steps, "prior_steps"),
        "sampler": pick(args.sampler, "sampler"), "eta": s.eta, "candidates": s.candidates, "clip_x0": s.clip_x0,
        "guidance_interval": list(pick(args.guidance_interval, "guidance_interval")),
        "prior_guidance_interval": list(s.prior_guidance_interval),
        "device": str(model.device),
        "weights": {name: getattr(getattr(model, name), "checkpoint_hash", None)
                    for name in ("clip", "prior", "decoder")},
    }
    rows = [c for c in captions for _ in range(args.n)]
    # each image's own seed, as generate gives it: generate(caption, seed=record["seed"]) remakes it alone
    seeds = image_seeds(rows, args.seed)
    return [{**common, "caption": c, "index": i, "seed": seeds[i]} for i, c in enumerate(rows)]


MAX_IMAGES = 1024  # more than this asks for --yes: 100,000 images is hours of work and gigabytes
GRID_MAX = 256  # grid.png shows at most this many images (the files hold them all)
SEED_MAX = 2 ** 32 - 1  # seeds are hashed, so any int would do: the check only keeps them plain 32-bit ints


def check_args(args, n_images: int) -> None:
    """Refuse values that would crash deep inside sampling or silently draw black images."""
    def bad(msg):
        raise SystemExit(f"error: {msg}")
    for name in ("steps", "prior_steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            bad(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("guidance_scale", "prior_guidance_scale"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            bad(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.guidance_interval is not None and not 0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
        bad(f"--guidance-interval must be LO HI with 0 <= LO <= HI <= 1, got {args.guidance_interval}")
    for seed in args.seed if isinstance(args.seed, list) else [args.seed + args.n - 1]:
        if not 0 <= seed <= SEED_MAX:
            bad(f"--seed must be between 0 and {SEED_MAX} (image m of a caption uses seed + m), got {seed}")
    if n_images > MAX_IMAGES and not args.yes:
        bad(f"{n_images} images asked for (--n {args.n} x {n_images // args.n} captions), more than "
            f"{MAX_IMAGES}: that can take hours; add --yes to draw them all (written as they are made, "
            f"grid.png shows the first {GRID_MAX})")


def write_streamed(model, captions: list, n: int, out: Path, args, kwargs: dict) -> int:
    """Draw and save the images a few captions at a time, so memory stays bounded; grid.png gets the
    first GRID_MAX. Each image gets the seed one call would give it (its record's), so the files are
    those of one call, with the same text chunks and samples.jsonl."""
    records = sample_records(model, args, captions)
    names = sample_names(len(captions), n)
    per_chunk = max(1, (args.batch_size or model.sampling.batch_size) // n)
    grid, grid_caps = [], []
    for start in range(0, len(captions), per_chunk):
        rows = slice(start * n, (start + per_chunk) * n)
        chunk_records = records[rows]
        images = model.to_pil(model.generate(captions[start:start + per_chunk], n_per_text=n,
                                             seed=[r["seed"] for r in chunk_records], **kwargs))
        for name, img, record in zip(names[rows], images, chunk_records):
            save_sample(img, out / name, record)
            if len(grid) < GRID_MAX:
                grid.append(img)
                grid_caps.append(record["caption"])
    write_sample_records(out, names, records)
    save_image_atomic(captioned_grid(grid, grid_caps, cols=max(n, min(8, len(grid)))), out / "grid.png")
    return len(records)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("captions", nargs="*", help="captions to draw")
    p.add_argument("--prompts", help="a text file with one caption per line")
    p.add_argument("--n", type=int, default=1, help="images per caption")
    p.add_argument("--out", default="samples", help="output folder (default: samples/)")
    p.add_argument("--checkpoints", default=None, help="a run folder (clip.pt, prior.pt, decoder.pt) or an exported "
                   "one (dalle2.export) (default: the shipped weights, checkpoints/shapes32/ or else "
                   "checkpoints/shapes_cpu/, if present; else runs/)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="decoder guidance (default: the checkpoint's sampling config)")
    p.add_argument("--prior-guidance-scale", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="decoder sampling steps")
    p.add_argument("--prior-steps", type=int, default=None)
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="guide the decoder only at steps with t/(T-1) in [LO, HI] (default: the config's, 0 1)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddim, ddpm or dpmpp2m (DPM-Solver++(2M)); default: the checkpoint's sampling config")
    p.add_argument("--seed", type=seeds, default=0,
                   help="one int (image m of a caption gets seed + m), or a comma list with one seed per image")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (CUDA, else mps, else CPU) | cpu | cuda | mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks first (pays off for many images)")
    p.add_argument("--yes", action="store_true", help=f"allow more than {MAX_IMAGES} images")
    args = p.parse_args(argv)

    captions = list(args.captions) + (read_prompts(args.prompts) if args.prompts else [])
    if not captions:
        p.error("give at least one caption, or --prompts FILE")
    if args.n < 1:
        p.error("--n must be at least 1")
    if isinstance(args.seed, list) and len(args.seed) != len(captions) * args.n:
        p.error(f"--seed: {len(args.seed)} seeds for {len(captions) * args.n} images (give one per image, or one int)")
    check_args(args, len(captions) * args.n)
    out = Path(args.out)
    check_writable(out)
    clean_orphans(out)  # temporary files of an earlier run that was killed mid-write

    model = DALLE2.from_pretrained(args.checkpoints or shipped_or("runs"), device=pick_device(args.device))
    if args.compile:
        model.compile()
    kwargs = dict(guidance_scale=args.guidance_scale, prior_guidance_scale=args.prior_guidance_scale,
                  steps=args.steps, prior_steps=args.prior_steps, sampler=args.sampler,
                  guidance_interval=args.guidance_interval, batch_size=args.batch_size)
    if len(captions) * args.n > MAX_IMAGES:  # allowed by --yes: streamed
        count = write_streamed(model, captions, args.n, out, args, {**kwargs, "progress": False})
        print(f"wrote {count} images and grid.png (the first {GRID_MAX}) to {out}/")
        return out
    images = model.generate(captions, n_per_text=args.n, seed=args.seed, progress=True, **kwargs)
    write_samples(model.to_pil(images), captions, out, args.n, records=sample_records(model, args, captions))
    print(f"wrote {len(images)} images and grid.png to {out}/")
    return out


cli = main_wrapper(main)  # the `dalle2-sample` console script of an installed wheel


if __name__ == "__main__":
    main_wrapper(main)()
