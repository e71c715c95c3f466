"""Evaluate a diffusion prior: how close are its sampled image embeddings to the real ones?

    python dalle2/prior/evaluate.py --checkpoint runs/prior.pt [--clip runs/clip.pt] [--split test] [--steps 64]

For every image of the split, one embedding is sampled from its caption (DDIM, `candidates` per caption,
the one closest to the caption kept) and compared with (a) the image's true CLIP embedding, (b) the
caption's text embedding, (c) a random other caption's text embedding; the baseline is the cosine of
the caption's text embedding with the true image embedding (what you get with no prior at all).
Retrieval top-1: the sampled embedding's nearest test image embedding carries the same caption.
Beside the sampled cosine, its oracle: the mean cosine between two different real images sharing a caption
(what a perfect prior reaches; `oracle_pairs` pairs). Image->caption top-1 over the unique captions
(exact string, and `i2t_top1_true` where shapes metadata exist), from the sampled embeddings (`_sampled`)
next to the same from the true image embeddings (`_real`).
Reported for all images, seen colour-shape pairs and zero-shot held-out pairs (shapes data).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip.evaluate import heldout_mask, true_caption_hits
from dalle2.core.cli import main_wrapper
from dalle2.core.config import add_config_args, apply_overrides, data_config_for_checkpoint
from dalle2.core.report import format_table
from dalle2.core.runtime import pick_device
from dalle2.embeddings import Embeddings, check_same_clip, load_clip_for_stage, load_or_compute
from dalle2.prior import DiffusionPrior
from data.captioned import CaptionedImages
from data.datasets import load_dataset


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


def same_caption_oracle(true_img: torch.Tensor, caption: torch.Tensor) -> tuple[float, int]:
    """Mean cosine between two DIFFERENT real images that share a caption, and the number of such pairs.

    true_img: (N, E) unit-norm image embeddings; caption: (N,) caption identity. Every unordered pair
    within a caption group counts once; captions with a single image give no pair. It is what
    cos_true_image would be for a perfect prior: a sample from p(image embedding | caption) is another
    draw of that distribution, as the other real image is (a caption leaves size, position, rotation open).
    Per group, sum_{i<j} e_i.e_j = (|sum_i e_i|^2 - sum_i |e_i|^2) / 2: O(N E), no (N, N) matrix.
    """
    x = true_img.double()
    groups, inverse, counts = torch.unique(caption, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(groups), x.shape[1], dtype=x.dtype).index_add_(0, inverse, x)  # (G, E)
    squares = torch.zeros(len(groups), dtype=x.dtype).index_add_(0, inverse, (x * x).sum(1))  # (G,)
    pair_sum = ((sums * sums).sum(1) - squares) / 2  # (G,) sum of cosines over the group's pairs
    multi = counts > 1  # singletons: no pair (their pair_sum is 0 up to rounding)
    pairs = int((counts * (counts - 1) // 2).sum())
    return (pair_sum[multi].sum().item() / pairs if pairs else float("nan")), pairs


def caption_retrieval(image_emb: torch.Tensor, texts: list, text_emb: torch.Tensor, caption: torch.Tensor,
                      metadata=None) -> dict:
    """Image->caption top-1 over the unique captions: {"i2t_top1": (N,) bool, "i2t_top1_true": (N,) bool}.

    image_emb: (N, E); texts / text_emb (U, E): the unique captions and their embeddings; caption: (N,)
    index into texts of each image's caption. i2t_top1: the retrieved caption is the image's own string;
    i2t_top1_true (with shapes metadata only): the retrieved caption is true of the image (as in clip/evaluate.py).
    """
    best = (image_emb @ F.normalize(text_emb, dim=-1).T).argmax(1)  # (N,) into texts
    out = {"i2t_top1": best == caption}
    if metadata is not None:
        out["i2t_top1_true"] = true_caption_hits(best, texts, metadata)
    return out


def _figures(sampled, true_img, text, other_text, caption, rows, hits=None) -> dict:
    """Means over the images `rows` (N,) bool. hits: {name: (N,) bool} per-image retrieval results."""
    cos = lambda a, b: (a * b).sum(-1)
    sims = sampled @ true_img.T  # (N, N): nearest real image for each sample
    nearest = sims.argmax(1)
    oracle, pairs = same_caption_oracle(true_img[rows], caption[rows])
    f = {
        "cos_true_image": cos(sampled, true_img)[rows].mean().item(),
        "oracle_cos_same_caption": oracle,  # the target for cos_true_image, see same_caption_oracle
        "oracle_pairs": pairs,
        "cos_text": cos(sampled, text)[rows].mean().item(),
        "cos_other_text": cos(sampled, other_text)[rows].mean().item(),
        "baseline_cos_text_image": cos(text, true_img)[rows].mean().item(),
        "retrieval_top1": (caption[nearest] == caption)[rows].float().mean().item(),
    }
    for name, hit in (hits or {}).items():
        f[name] = hit[rows].float().mean().item() if rows.any() else float("nan")
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
    # Image->caption retrieval over the unique captions of the split, from the sampled embeddings next
    # to the same from the true image embeddings (the target: within 2 points of it).
    first_id = {}  # caption string key -> the table id of its first image
    for i, k in zip(caption.tolist(), cap_key.tolist()):
        first_id.setdefault(k, i)
    keys = torch.tensor(sorted(first_id))  # (U,)
    ids = torch.tensor([first_id[k] for k in keys.tolist()])  # (U,)
    texts = [ds.captions[i] for i in ids.tolist()]
    text_u = emb.text_emb[ids.to(emb.text_emb.device)].float().cpu()  # (U, E)
    own = torch.searchsorted(keys, cap_key)  # (N,) into texts
    by_source = {source: caption_retrieval(x, texts, text_u, own, ds.metadata)
                 for source, x in (("sampled", sampled), ("real", true_img))}
    hits = {f"{name}_{source}": by_source[source][name] for name in by_source["sampled"] for source in by_source}
    rows = torch.ones(len(caption), dtype=torch.bool)
    out = {"n": len(caption), "steps": steps, "candidates": candidates}
    out.update(_figures(sampled, true_img, text, other_text, cap_key, rows, hits))
    held = heldout_mask(ds)
    if held is not None and held.any():
        out.update({f"seen_{k}": v
                    for k, v in _figures(sampled, true_img, text, other_text, cap_key, ~held, hits).items()})
        out.update({f"heldout_{k}": v
                    for k, v in _figures(sampled, true_img, text, other_text, cap_key, held, hits).items()})
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
                                "source": "dalle2/prior/evaluate.py"}) + "\n")
    return result


if __name__ == "__main__":
    main_wrapper(main)()
