"""Measure what the model draws: faithfulness to the caption, diversity, memorisation and
distribution distance, written as a report folder.

    python -m dalle2.evaluation.evaluate --checkpoints runs [--split test | --prompts FILE] [--n 1] [--limit 500]
                              [--out runs/report] [--guidance-scale 3] [--steps 50] [--seed 0]

On shapes data an attribute reader (dalle2/evaluation/reader.py) reads every generated image's objects, and each
caption is scored: per-attribute accuracy, colour-shape binding, object count and image-level exact
match, for seen and zero-shot held-out colour-shape pairs, on the test captions and on rephrased and
partial prompt sets. The reader's own accuracy on real renders (its ceiling) is reported beside them.
Diversity: CLIP-space spread of several samples per caption and the spread of object positions and
sizes. Memorisation: share of samples whose nearest training image (CLIP space) is a near-duplicate.
Distance: Frechet / kernel distances on the project's own CLIP image features (no download), plus the
standard FID/KID when torchvision's Inception weights are already on the machine. Caption match, for
any data (the only faithfulness figure where no attribute reader exists: CIFAR-10, user folders): CLIP
score and R-precision of each image against its caption with the run's own CLIP, next to the same
figures for real test images. "Decoder alone" (shapes): the test images' own CLIP image embeddings
decoded with their captions instead of the prior's samples, so that the decoder's share of the errors
shows beside the whole pipeline's.

Writes OUT/report.json (all figures), OUT/report.md (tables) and OUT/best_worst.png.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from clip.evaluate import embed_images, embed_texts
from dalle2.core.cli import main_wrapper, read_prompts
from dalle2.core.config import add_config_args, data_config_for_checkpoint
from dalle2.core.report import write_report
from dalle2.core.runtime import pick_device
from dalle2.evaluation.faithfulness import evaluate as faithfulness
from dalle2.evaluation.faithfulness import prompt_sets as extra_sets
from dalle2.evaluation.metrics import (
    caption_match,
    fid_kid_from_features,
    frechet_distance,
    inception_features,
    kernel_distance,
    load_inception,
    mean_pairwise_distance,
    memorisation,
    spread,
)
from dalle2.evaluation.reader import AttributeReader, format_accuracy, reader_accuracy
from dalle2.unclip import DALLE2
from data.captions import parse_caption
from data.datasets import load_dataset

DIVERSITY_CAPTIONS = 16  # captions drawn several times for the diversity figures
DIVERSITY_SAMPLES = 4


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] -> uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def clip_features(clip, images_uint8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return embed_images(clip, images_uint8, batch_size).cpu()


def distances(gen_feats: torch.Tensor, real_feats: torch.Tensor, seed: int = 0) -> dict:
    kid, kid_std = kernel_distance(gen_feats, real_feats, subsets=50, subset_size=min(1000, len(gen_feats)), seed=seed)
    return {"clip_fd": frechet_distance(gen_feats, real_feats), "clip_kid": kid, "clip_kid_std": kid_std}


def diversity(model, reader, captions: list[str], settings: dict, seed: int) -> dict:
    """Spread of DIVERSITY_SAMPLES samples for each of the first DIVERSITY_CAPTIONS captions."""
    caps = captions[:DIVERSITY_CAPTIONS]
    images = model.generate(caps, n_per_text=DIVERSITY_SAMPLES, seed=seed + 1, **settings)
    feats = clip_features(model.clip, to_uint8(images)).view(len(caps), DIVERSITY_SAMPLES, -1)
    out = {"clip_pairwise_distance": sum(mean_pairwise_distance(f) for f in feats) / len(caps)}
    if reader is not None:
        found = reader.read(to_uint8(images))
        geo = []  # (centre x, centre y, sqrt area) of the largest object, NaN when nothing was found
        for objs in found:
            if objs:
                x1, y1, x2, y2 = objs[0]["bbox"]
                geo.append([(x1 + x2) / 2, (y1 + y2) / 2, ((x2 - x1) * (y2 - y1)) ** 0.5])
            else:
                geo.append([float("nan")] * 3)
        geo = torch.tensor(geo).view(len(caps), DIVERSITY_SAMPLES, 3)
        spreads = [spread(g) for g in geo]
        finite = [s for s in spreads if s == s]
        out["object_geometry_spread_px"] = sum(finite) / len(finite) if finite else float("nan")
    return out


def caption_match_of(model, feats: torch.Tensor, rows: list[str], seed: int = 0) -> dict:
    """CLIP score and R-precision (dalle2.evaluation.metrics.caption_match) of images, given by their CLIP image
    features (N, E), against their captions `rows` (N), with the run's own CLIP."""
    distinct = list(dict.fromkeys(rows))
    index = {c: i for i, c in enumerate(distinct)}
    text = embed_texts(model.clip, distinct).cpu()
    return caption_match(feats, text, torch.tensor([index[c] for c in rows]), seed=seed)


@dataclass
class RealFeatures:
    """Features of the real images the generated ones are compared with, computed once per run (a
    sweep compares many settings with them): CLIP features of the test and training images, and the
    Inception network and test features when torchvision's weights are on the machine."""
    test: torch.Tensor  # (N, E)
    train: torch.Tensor  # (M, E)
    inception: Optional[torch.nn.Module] = None
    inception_test: Optional[torch.Tensor] = None  # (N, 2048)

    @classmethod
    def compute(cls, model, real_test: torch.Tensor, real_train: torch.Tensor,
                inception_weights: Optional[str] = None) -> "RealFeatures":
        """real_test, real_train: uint8 (N, 3, H, W) images."""
        net = load_inception(model.device, inception_weights)
        return cls(clip_features(model.clip, real_test), clip_features(model.clip, real_train), net,
                   None if net is None else inception_features(real_test, model.device, model=net))


def evaluate_settings(model, reader, prompt_sets: dict, settings: dict, *, real: Optional[RealFeatures] = None,
                      n_per_text: int = 1, seed: int = 0, keep_images: bool = False) -> dict:
    """Generate for every prompt set with the sampling `settings` (guidance_scale, steps, ...) and
    measure. Returns {"settings", "sets": {name: {"faithfulness", ...}}, "diversity", "distance",
    "memorisation", "seconds"} (+ "images" per set when keep_images). Distances and memorisation
    need `real`."""
    t0 = time.perf_counter()
    result = {"settings": dict(settings), "sets": {}}
    test_images = None
    for name, captions in prompt_sets.items():
        images = model.generate(captions, n_per_text=n_per_text, seed=seed, progress=True, **settings)
        rows = [c for c in captions for _ in range(n_per_text)]
        entry = {"n_images": len(rows)}
        feats = clip_features(model.clip, to_uint8(images))
        entry["caption_match"] = caption_match_of(model, feats, rows, seed)
        if reader is not None:
            scored = faithfulness(reader, to_uint8(images), rows)
            entry["faithfulness"] = scored["summary"]
            if keep_images:
                entry["rows"], entry["heldout_flags"] = scored["rows"], scored["heldout"]
        if keep_images:
            entry["images"], entry["captions"] = images, rows
        result["sets"][name] = entry
        if name == "test":
            test_images, test_feats = images, feats
    first = next(iter(prompt_sets.values()))
    result["diversity"] = diversity(model, reader, list(dict.fromkeys(first)), settings, seed)
    if test_images is not None and real is not None:
        gen_u8 = to_uint8(test_images)
        gen_feats = test_feats
        result["distance"] = distances(gen_feats, real.test, seed)
        if real.inception is not None:
            standard = fid_kid_from_features(real.inception_test,
                                             inception_features(gen_u8, model.device, model=real.inception))
            result["distance"].update({"inception_fid": standard["fid"], "inception_kid": standard["kid_mean"]})
        mem = memorisation(gen_feats, real.train)
        result["memorisation"] = {"nn_cosine_mean": mem["nn_cosine_mean"],
                                  "near_duplicate_rate": mem["near_duplicate_rate"]}
    result["seconds"] = time.perf_counter() - t0
    return result


def reference_figures(real: RealFeatures, seed: int = 0) -> dict:
    """What real data scores: train vs test distance (the floor a generator can reach with this many
    samples) and the near-duplicate rate of real test images against the training set."""
    g = torch.Generator().manual_seed(seed)
    subset = real.train[torch.randperm(len(real.train), generator=g)[:len(real.test)]]
    mem = memorisation(real.test, real.train)
    return {"train_vs_test": distances(subset, real.test, seed),
            "real_test_near_duplicate_rate": mem["near_duplicate_rate"],
            "real_test_nn_cosine_mean": mem["nn_cosine_mean"]}


def decoder_alone(model, reader, captions: list[str], real_emb: torch.Tensor, settings: dict, n_per_text: int,
                  seed: int) -> dict:
    """Faithfulness of the decoder by itself: each test image's own CLIP image embedding (`real_emb`, the
    RealFeatures already computed) decoded with its caption (the same decoder noise as the pipeline's
    samples), instead of the prior's sample. Beside the pipeline's figures it says which stage the
    errors come from."""
    emb = real_emb.repeat_interleave(n_per_text, dim=0)
    decoding = {k: v for k, v in settings.items() if k not in ("prior_guidance_scale", "prior_steps")}
    images = model.generate(captions, n_per_text=n_per_text, seed=seed, progress=True, image_embeds=emb, **decoding)
    return faithfulness(reader, to_uint8(images), [c for c in captions for _ in range(n_per_text)])["summary"]


def load_everything(checkpoints: str, device, limit: Optional[int], prompts_file: Optional[str], split: str,
                    sets: list[str], reader_cache: Optional[str] = None, config_args=None):
    """The model, the reader (shapes only), the prompt sets and the real images to compare with.
    The data's location comes from `config_args` (--config/--preset/--set), never from the checkpoints;
    the data config used is `model.data_config`."""
    model = DALLE2.from_pretrained(checkpoints).to(device).eval()  # a run folder or an export
    cfg = model.decoder.config
    model.data_config = data_config_for_checkpoint(cfg, config_args)
    test = load_dataset(model.data_config, split, generate_missing=False)
    train = load_dataset(model.data_config, "train", generate_missing=False)
    n = min(limit or len(test), len(test))
    prompt_sets = {}
    if prompts_file:
        prompt_sets["prompts"] = read_prompts(prompts_file)[:n]
    else:
        prompt_sets["test"] = [test.caption_of(i) for i in range(n)]
    reader = None
    if model.data_config.dataset == "shapes":
        reader = AttributeReader.default(cfg.data.image_size, cache_dir=reader_cache, progress=True)
        extra = extra_sets(seed=0, n=max(1, min(n, 240)))
        for name in sets:
            if name in extra:
                prompt_sets[name] = extra[name]
        if prompts_file:  # the reader can only score captions in the shapes vocabulary
            for caption in prompt_sets["prompts"]:
                try:
                    parse_caption(caption)
                except ValueError as e:
                    raise SystemExit(f"error: {prompts_file}: cannot score {caption!r}: {e}")
    real_test = test.images[:n]
    g = torch.Generator().manual_seed(0)
    real_train = train.images[torch.randperm(len(train), generator=g)[:min(len(train), 5000)]]
    return model, reader, prompt_sets, real_test, real_train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default="runs", help="run folder with clip.pt, prior.pt, decoder.pt, or an export")
    p.add_argument("--out", default=None, help="report folder (default: CHECKPOINTS/report)")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--prompts", default=None, help="evaluate these captions (one per line) instead of the split's")
    p.add_argument("--sets", default="rephrased,partial", help="extra shapes prompt sets (comma-separated, or '')")
    p.add_argument("--limit", type=int, default=None, help="at most this many captions per set "
                   "(default: the whole split on GPU, 200 on CPU)")
    p.add_argument("--n", type=int, default=1, help="samples per caption")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--prior-guidance-scale", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--prior-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--inception", default=None, help="path of torchvision Inception-v3 weights (optional)")
    p.add_argument("--reader-cache", default=None, help="folder for the cached attribute reader")
    add_config_args(p)  # where the data is: the user's config, never the checkpoints'
    args = p.parse_args(argv)
    device = pick_device(args.device)
    limit = args.limit or (None if device.type == "cuda" else 200)
    model, reader, prompt_sets, real_test, real_train = load_everything(
        args.checkpoints, device, limit, args.prompts, args.split, [s for s in args.sets.split(",") if s],
        args.reader_cache, config_args=args)
    settings = {k: v for k, v in dict(guidance_scale=args.guidance_scale,
                                      prior_guidance_scale=args.prior_guidance_scale,
                                      steps=args.steps, prior_steps=args.prior_steps,
                                      batch_size=args.batch_size).items() if v is not None}
    report = {"checkpoints": str(args.checkpoints), "data": model.data_config.root,
              "sampling": {**vars(model.sampling), **settings}, "device": str(device)}
    if reader is not None:
        report["reader_accuracy"] = reader_accuracy(reader, n=1000, seed=123)
        print(format_accuracy(report["reader_accuracy"]))
    real = RealFeatures.compute(model, real_test, real_train, args.inception)
    report["reference"] = reference_figures(real, args.seed)
    if "test" in prompt_sets:  # real test images with their own captions: what a perfect generator scores
        report["reference"]["caption_match"] = caption_match_of(model, real.test, prompt_sets["test"], args.seed)
    result = evaluate_settings(model, reader, prompt_sets, settings, real=real, n_per_text=args.n, seed=args.seed,
                               keep_images=True)
    if reader is not None and "test" in prompt_sets:
        result["sets"]["test"]["decoder_alone"] = decoder_alone(model, reader, prompt_sets["test"], real.test,
                                                                settings, args.n, args.seed)
    report.update(result)
    out = Path(args.out) if args.out else Path(args.checkpoints) / "report"
    write_report(report, out, reader)
    print((out / "report.md").read_text())
    return report


if __name__ == "__main__":
    main_wrapper(main)()
