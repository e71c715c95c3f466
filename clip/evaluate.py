"""Evaluate a CLIP checkpoint: retrieval against every unique caption of a split.

    python clip/evaluate.py --checkpoint runs/clip.pt [--split test] [--device auto]

Image->text top-1/top-5: the image's own caption string must rank first (in the top 5) among ALL unique
captions of the split (not a batch of 256, as the original implementation measured). On shapes the
headline, first in the table, is `i2t_top1_true` (overall, seen_ and heldout_): the share of images whose
top-1 caption is TRUE of the image, judged from the metadata, since an image cannot show a caption's
determiner, a dropped size word or the object order. Text->image: a
caption's best image must carry that caption. Both are also reported for the zero-shot held-out
colour-shape pairs (shapes data). Plus the mean cosine of matched vs mismatched pairs and, on CIFAR-10,
zero-shot classification with the caption templates. Results print as a table and are appended to the
run's metrics.jsonl when the checkpoint sits in a run folder.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clip.model import CLIP
from dalle2.core.cli import main_wrapper
from dalle2.core.config import add_config_args, data_config_for_checkpoint
from dalle2.core.report import format_table
from dalle2.core.runtime import pick_device
from dalle2.evaluation.faithfulness import score
from data.captioned import CaptionedImages, to_float
from data.captions import is_heldout, parse_caption
from data.cifar import CIFAR_TEMPLATES, class_captions
from data.datasets import load_dataset


@torch.no_grad()
def embed_images(model, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> unit-norm embeddings (N, E), in batches, on the model's device."""
    dev = model.device
    return torch.cat([model.encode_image(to_float(images[i:i + batch_size].to(dev))).float()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def embed_texts(model, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
    """captions -> unit-norm embeddings (U, E)."""
    tokens = model.tokenizer(texts)
    return torch.cat([model.encode_text(tokens[i:i + batch_size].to(model.device)).float()
                      for i in range(0, len(tokens), batch_size)])


def _mean(x: torch.Tensor) -> float:
    """Mean of a bool/float tensor, NaN when empty (a subset with no images)."""
    return x.float().mean().item() if len(x) else float("nan")


def heldout_mask(ds: CaptionedImages) -> torch.Tensor | None:
    """(N,) bool: images holding a zero-shot held-out colour-shape pair (shapes data only)."""
    if ds.metadata is None:
        return None
    return torch.tensor([is_heldout(r["objects"]) for r in ds.metadata])


def retrieval(sims: torch.Tensor, caption_of_image: torch.Tensor, image_rows: torch.Tensor | None = None,
              caption_rows: torch.Tensor | None = None) -> dict:
    """sims: (N, U) image-caption cosines; caption_of_image: (N,) index of each image's caption.
    Optional masks select which images (N,) / captions (U,) are scored."""
    n, u = sims.shape
    k = min(5, u)
    top = sims.topk(k, dim=1).indices  # (N, k)
    hit1 = top[:, 0] == caption_of_image
    hit5 = (top == caption_of_image[:, None]).any(1)
    best_img = sims.topk(min(5, n), dim=0).indices.T  # (U, k): best images per caption
    t_hit1 = caption_of_image[best_img[:, 0]] == torch.arange(u, device=sims.device)
    t_hit5 = (caption_of_image[best_img] == torch.arange(u, device=sims.device)[:, None]).any(1)
    if image_rows is not None:
        hit1, hit5 = hit1[image_rows], hit5[image_rows]
    if caption_rows is not None:
        t_hit1, t_hit5 = t_hit1[caption_rows], t_hit5[caption_rows]
    return {"i2t_top1": _mean(hit1), "i2t_top5": _mean(hit5), "t2i_top1": _mean(t_hit1), "t2i_top5": _mean(t_hit5)}


def true_caption_hits(best: torch.Tensor, texts: list[str], metadata: list[dict]) -> torch.Tensor:
    """(N,) bool: whether image i's retrieved caption texts[best[i]] is TRUE of the image (shapes only),
    judged from its metadata: the same number of objects, with every stated colour, shape, size and
    position right on distinct objects. Exact-string top-1 cannot reach 100% on shapes: "a red circle",
    "the red circle" and "a large red circle" can all describe one image."""
    parsed = {}
    hits = []
    for i, j in enumerate(best.tolist()):
        if j not in parsed:
            parsed[j] = parse_caption(texts[j])
        hits.append(score(parsed[j], metadata[i]["objects"])["exact"])
    return torch.tensor(hits, dtype=torch.bool)


@torch.no_grad()
def evaluate_clip(model, ds: CaptionedImages, batch_size: int = 512, seed: int = 0) -> dict:
    """All figures for one split, as a flat dict of floats."""
    model.eval()
    first = ds.caption_ids[:, 0].cpu()
    texts = sorted({ds.captions[i] for i in first.tolist()})
    index = {t: i for i, t in enumerate(texts)}
    cap = torch.tensor([index[ds.captions[i]] for i in first.tolist()])  # (N,) into texts
    img = embed_images(model, ds.images, batch_size).cpu()
    txt = embed_texts(model, texts, batch_size).cpu()
    sims = img @ txt.T  # (N, U)
    out = {}
    held = heldout_mask(ds)
    if ds.metadata is not None:
        # The headline figure, first in the table: top-1 caption TRUE of the image,
        # for seen and zero-shot held-out colour-shape pairs separately.
        true_hit = true_caption_hits(sims.argmax(1), texts, ds.metadata)  # (N,)
        out["i2t_top1_true"] = _mean(true_hit)
        if held is not None and held.any():
            out["seen_i2t_top1_true"] = _mean(true_hit[~held])
            out["heldout_i2t_top1_true"] = _mean(true_hit[held])
    out.update({"n_images": len(ds), "n_captions": len(texts)})
    out.update(retrieval(sims, cap))
    matched = sims[torch.arange(len(ds)), cap]
    g = torch.Generator().manual_seed(seed)
    other = cap[torch.randperm(len(ds), generator=g)]
    keep = other != cap
    out["cos_matched"] = matched.mean().item()
    out["cos_mismatched"] = sims[torch.arange(len(ds)), other][keep].mean().item() if keep.any() else float("nan")
    if held is not None and held.any():
        held_caps = torch.zeros(len(texts), dtype=torch.bool)
        held_caps[cap[held]] = True
        out.update({f"heldout_{k}": v for k, v in retrieval(sims, cap, held, held_caps).items()})
        out.update({f"seen_{k}": v for k, v in retrieval(sims, cap, ~held, ~held_caps).items()})
    if ds.class_names is not None and ds.labels is not None:
        per_class = embed_texts(model, class_captions(ds.class_names)).view(
            len(ds.class_names), len(CIFAR_TEMPLATES), -1)
        # template ensemble, as in CLIP's zero-shot recipe: mean of the normalised template embeddings
        cls = torch.nn.functional.normalize(per_class.mean(1), dim=-1).cpu()  # (classes, E)
        out["zero_shot_accuracy"] = ((img @ cls.T).argmax(1) == ds.labels.cpu()).float().mean().item()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a CLIP checkpoint (e.g. runs/clip.pt)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=512)
    add_config_args(p)  # where the data is: the user's config, never the checkpoint's (see data_config_for_checkpoint)
    args = p.parse_args(argv)
    model = CLIP.from_checkpoint(args.checkpoint, map_location="cpu").to(pick_device(args.device))
    data_cfg = data_config_for_checkpoint(model.config, args)
    ds = load_dataset(data_cfg, args.split, generate_missing=False)
    result = evaluate_clip(model, ds, args.batch_size)
    print(f"CLIP {args.checkpoint} on {ds.name}\n{format_table(result)}")
    metrics = Path(args.checkpoint).with_suffix("") / "metrics.jsonl"
    if metrics.parent.is_dir():
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": model.step, "eval": result, "split": args.split,
                                "source": "clip/evaluate.py"}) + "\n")
    return result


if __name__ == "__main__":
    main_wrapper(main)()
