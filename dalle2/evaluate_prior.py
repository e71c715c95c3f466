"""Evaluate a diffusion prior: how close are its sampled image embeddings to the real ones?

    python dalle2/evaluate_prior.py --checkpoint runs/prior.pt [--clip runs/clip.pt] [--split test] [--steps 64]

For every image of the split, one embedding is sampled from its caption (DDIM, `candidates` per caption,
the one closest to the caption kept) and compared with (a) the image's true CLIP embedding, (b) the
caption's text embedding, (c) a random other caption's text embedding; the baseline is the cosine of
the caption's text embedding with the true image embedding (what you get with no prior at all).
Retrieval top-1: the sampled embedding's nearest test image embedding carries the same caption.
Reported for all images, seen colour-shape pairs and zero-shot held-out pairs (shapes data).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from clip.evaluate import heldout_mask
from dalle2.report import format_table
from dalle2.cli import main_wrapper
from dalle2.config import add_config_args, apply_overrides, data_config_for_checkpoint
from dalle2.embeddings import Embeddings, check_same_clip, load_clip_for_stage, load_or_compute
from dalle2.training import pick_device
from data.datasets import CaptionedImages, load_dataset


@torch.no_grad()
def sample_embeddings(prior, emb: Embeddings, caption_ids: torch.Tensor, *, steps: int, candidates: int,
                      guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 1024,
                      progress: bool = False) -> torch.Tensor:
    """Sampled unit-norm image embeddings (N, E) for the captions `caption_ids` (N,)."""
    dev = next(prior.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(caption_ids), batch_size), desc="prior samples", disable=not progress):
        ids = caption_ids[i:i + batch_size].to(emb.text_emb.device)
        cond = {k: v.to(dev) for k, v in emb.text(ids).items()}
        out.append(prior.sample(**cond, steps=steps, candidates=candidates, guidance_scale=guidance_scale,
                                generator=g).float().cpu())
    return torch.cat(out)


def _figures(sampled, true_img, text, other_text, caption, rows) -> dict:
    cos = lambda a, b: (a * b).sum(-1)
    sims = sampled @ true_img.T  # (N, N): nearest real image for each sample
    nearest = sims.argmax(1)
    f = {
        "cos_true_image": cos(sampled, true_img)[rows].mean().item(),
        "cos_text": cos(sampled, text)[rows].mean().item(),
        "cos_other_text": cos(sampled, other_text)[rows].mean().item(),
        "baseline_cos_text_image": cos(text, true_img)[rows].mean().item(),
        "retrieval_top1": (caption[nearest] == caption)[rows].float().mean().item(),
    }
    return f


@torch.no_grad()
def evaluate_prior(prior, emb: Embeddings, ds: CaptionedImages, *, steps: int = 64, candidates: int = 2,
                   guidance_scale: float = 1.0, seed: int = 0, progress: bool = False) -> dict:
    prior.eval()
    caption = ds.caption_ids[:, 0].cpu()  # (N,) the first (for the test split: the only) caption
    sampled = sample_embeddings(prior, emb, caption, steps=steps, candidates=candidates,
                                guidance_scale=guidance_scale, seed=seed, progress=progress)
    true_img = emb.image_emb[:, 0].float().cpu()  # (N, E) plain view
    text = emb.text_emb[caption].float().cpu()
    g = torch.Generator().manual_seed(seed)
    other = caption[torch.randperm(len(caption), generator=g)]
    other_text = emb.text_emb[other].float().cpu()
    # compare captions by string, not id, so equal captions count as the same
    strings = {s: i for i, s in enumerate(sorted(set(ds.captions)))}
    cap_key = torch.tensor([strings[ds.captions[i]] for i in caption.tolist()])
    rows = torch.ones(len(caption), dtype=torch.bool)
    out = {"n": len(caption), "steps": steps, "candidates": candidates}
    out.update(_figures(sampled, true_img, text, other_text, cap_key, rows))
    held = heldout_mask(ds)
    if held is not None and held.any():
        out.update({f"seen_{k}": v for k, v in _figures(sampled, true_img, text, other_text, cap_key, ~held).items()})
        out.update({f"heldout_{k}": v for k, v in _figures(sampled, true_img, text, other_text, cap_key, held).items()})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a prior checkpoint (e.g. runs/prior.pt)")
    p.add_argument("--clip", default=None, help="its CLIP checkpoint (default: clip.pt beside the prior)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--candidates", type=int, default=None, help="default: sampling.candidates of the config")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: sampling.prior_guidance_scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_config_args(p)  # where the data is: the user's config, never the checkpoint's (see data_config_for_checkpoint)
    args = p.parse_args(argv)
    from dalle2.prior import DiffusionPrior
    device = pick_device(args.device)
    ckpt = Path(args.checkpoint)
    prior = DiffusionPrior.from_checkpoint(ckpt).to(device)
    clip, clip_hash = load_clip_for_stage(Path(args.clip) if args.clip else ckpt.parent / "clip.pt", device)
    check_same_clip(prior, clip)
    cfg = apply_overrides(prior.config, args.overrides, str(ckpt))
    ds = load_dataset(data_config_for_checkpoint(prior.config, args), args.split, generate_missing=False)
    emb = load_or_compute(clip, clip_hash, ds, ckpt.parent / "cache", args.split)
    result = evaluate_prior(prior, emb, ds, steps=args.steps,
                            candidates=args.candidates or cfg.sampling.candidates,
                            guidance_scale=args.guidance_scale or cfg.sampling.prior_guidance_scale,
                            seed=args.seed, progress=True)
    print(f"prior {ckpt} on {ds.name}\n{format_table(result)}")
    metrics = ckpt.with_suffix("") / "metrics.jsonl"
    if metrics.parent.is_dir():
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": prior.step, "eval": result, "split": args.split,
                                "source": "dalle2/evaluate_prior.py"}) + "\n")
    return result


if __name__ == "__main__":
    main_wrapper(main)()
