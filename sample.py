"""Text to image from the command line: a thin face over `DALLE2.generate`.

    python sample.py "a large gold pentagon and a small blue circle"
    python sample.py "a red circle" "a small navy square" --n 4 --checkpoints runs --out samples
    python sample.py --prompts prompts.txt --guidance-scale 3 --steps 50 --seed 0

Writes OUT/0000.png, 0001.png, ... in prompt order (OUT/0000_0.png, 0000_1.png, ... with --n > 1) and
OUT/grid.png with the captions under the images. Same caption, seed and settings: same image, whatever
the other captions, the batch size and the device (each image draws its own noise). --seed 3 gives image
m of a caption seed 3 + m; --seed 3,8,9 gives one seed per image.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from dalle2.cli import main_wrapper, read_prompts
from dalle2.diffusion import SAMPLERS
from dalle2.training import pick_device


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("captions", nargs="*", help="captions to draw")
    p.add_argument("--prompts", help="a text file with one caption per line")
    p.add_argument("--n", type=int, default=1, help="images per caption")
    p.add_argument("--out", default="samples", help="output folder (default: samples/)")
    p.add_argument("--checkpoints", default="runs", help="folder holding clip.pt, prior.pt, decoder.pt (default: runs/)")
    p.add_argument("--guidance-scale", type=float, default=None, help="decoder guidance (default: the checkpoint's sampling config)")
    p.add_argument("--prior-guidance-scale", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="decoder sampling steps")
    p.add_argument("--prior-steps", type=int, default=None)
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddim, ddpm or dpmpp2m (DPM-Solver++(2M)); default: the checkpoint's sampling config")
    p.add_argument("--seed", type=seeds, default=0,
                   help="one int (image m of a caption gets seed + m), or a comma list with one seed per image")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks first (pays off for many images)")
    args = p.parse_args(argv)

    captions = list(args.captions) + (read_prompts(args.prompts) if args.prompts else [])
    if not captions:
        p.error("give at least one caption, or --prompts FILE")
    if args.n < 1:
        p.error("--n must be at least 1")
    if isinstance(args.seed, list) and len(args.seed) != len(captions) * args.n:
        p.error(f"--seed: {len(args.seed)} seeds for {len(captions) * args.n} images (give one per image, or one int)")
    out = Path(args.out)
    check_writable(out)

    from dalle2 import DALLE2
    from dalle2.images import write_samples
    model = DALLE2.from_run(args.checkpoints).to(pick_device(args.device))
    if args.compile:
        model.compile()
    images = model.generate(captions, n_per_text=args.n, guidance_scale=args.guidance_scale,
                            prior_guidance_scale=args.prior_guidance_scale, steps=args.steps,
                            prior_steps=args.prior_steps, sampler=args.sampler, seed=args.seed,
                            batch_size=args.batch_size, progress=True)
    write_samples(model.to_pil(images), captions, out, args.n)
    print(f"wrote {len(images)} images and grid.png to {out}/")
    return out


if __name__ == "__main__":
    main_wrapper(main)()
