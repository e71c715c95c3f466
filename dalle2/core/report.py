"""The evaluation report format, for people and for the model card: report.json, report.md and a
best/worst picture. A file format like the checkpoint's, so it sits in core: the instruments write it,
the export (dalle2/pretrained.py) quotes it, and neither has to import the other."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from PIL import Image

from dalle2.core.files import atomic_write_text
from dalle2.core.images import captioned_grid, save_image_atomic, to_pil

ATTRS = ("colour", "shape", "size", "position", "binding", "count", "exact")


def _plain(obj):
    """JSON-ready copy: tensors, per-image rows and images dropped."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if k not in ("images", "rows", "heldout_flags", "captions")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() < 64 else None
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_table(result: dict) -> str:
    w = max([26] + [len(k) + 2 for k in result])  # long keys (heldout_oracle_cos_same_caption) stay aligned
    rows = [f"{'metric':<{w}}{'value':>10}", "-" * (w + 10)]
    for k, v in result.items():
        rows.append(f"{k:<{w}}{v:>10.4f}" if isinstance(v, float) else f"{k:<{w}}{v:>10}")
    return "\n".join(rows)


def faithfulness_table(sets: dict) -> list[str]:
    lines = ["| prompts | split | n | " + " | ".join(ATTRS) + " |", "|---|---|---|" + "---|" * len(ATTRS)]
    for name, entry in sets.items():
        for split, s in (entry.get("faithfulness") or {}).items():
            if s["n"]:
                lines.append(f"| {name} | {split} | {s['n']} | " + " | ".join(_fmt(s[a]) for a in ATTRS) + " |")
        for split, s in (entry.get("decoder_alone") or {}).items():
            if s["n"]:
                lines.append(f"| {name}, decoder alone | {split} | {s['n']} | " + " | ".join(_fmt(s[a]) for a in ATTRS)
                             + " |")
    return lines


def caption_match_table(report: dict) -> list[str]:
    """Markdown lines: CLIP score / R-precision per prompt set and for the real test images."""
    rows = [(name, e["caption_match"], e.get("n_images")) for name, e in report["sets"].items()
            if e.get("caption_match")]
    real = (report.get("reference") or {}).get("caption_match")
    if real:
        rows.append(("real test images (reference)", real, None))
    if not rows:
        return []
    out = ["## Caption match (the run's own CLIP)", "",
           "CLIP score: mean 100 * max(cosine, 0) of image and caption. R-precision: share of images whose caption "
           "beats random other captions (chance 1 / (1 + distractors)). Top-1: their caption is the closest of all.",
           "", "| prompts | n | CLIP score | R-precision | distractors | top-1 of all captions |",
           "|---|---|---|---|---|---|"]
    for name, m, n in rows:
        out.append(f"| {name} | {_fmt(n)} | {_fmt(m['clip_score'])} | {_fmt(m['r_precision'])} | "
                   f"{m['n_distractors']} | {_fmt(m['retrieval_top1'])} (of {m['n_captions']}) |")
    return out + [""]


def markdown(report: dict) -> str:
    out = [f"# Evaluation report: `{report['checkpoints']}`", ""]
    s = report.get("sampling", {})
    out += [f"Sampling: {', '.join(f'{k}={v}' for k, v in s.items())}. Device: {report.get('device')}.", ""]
    acc = report.get("reader_accuracy")
    if acc:
        out += ["## Attribute reader on real renders (the ceiling of every faithfulness figure)", "",
                "| objects | n | detected | colour | shape | size | position |", "|---|---|---|---|---|---|---|"]
        for g in ("all", "small", "medium", "large"):
            r = acc[g]
            out.append(f"| {g} | {r['n']} | "
                       + " | ".join(_fmt(r[k]) for k in ("detected", "colour", "shape", "size", "position")) + " |")
        out += ["", f"Object count right on {acc['count']:.3f} of {acc['n_images']} rendered images.", ""]
    if any(e.get("faithfulness") for e in report["sets"].values()):
        out += ["## Faithfulness of generated images", "",
                "Per-attribute accuracy over stated attributes; binding over two-object captions; count and exact "
                "match per image (exact: everything stated is right and nothing extra is drawn). `heldout`: "
                "captions naming a zero-shot colour-shape pair never seen in training."
                + (" `decoder alone`: each test image's own CLIP image embedding decoded with its caption, instead "
                   "of the prior's sample (what the decoder gets wrong by itself)."
                   if any(e.get("decoder_alone") for e in report["sets"].values()) else ""), ""]
        out += faithfulness_table(report["sets"]) + [""]
    out += caption_match_table(report)
    div = report.get("diversity") or {}
    dist, mem, ref = report.get("distance") or {}, report.get("memorisation") or {}, report.get("reference") or {}
    out += ["## Diversity, memorisation, distance", "", "| figure | generated | real data reference |", "|---|---|---|"]
    out.append(f"| CLIP pairwise distance of samples of one caption | {_fmt(div.get('clip_pairwise_distance'))} | - |")
    if "object_geometry_spread_px" in div:
        out.append(f"| spread of object centre/size of one caption (px, 128 canvas) | "
                   f"{_fmt(div['object_geometry_spread_px'])} | - |")
    ref_dist = ref.get("train_vs_test", {})
    for key, label in (("clip_fd", "Frechet distance, CLIP features"), ("clip_kid", "kernel distance, CLIP features"),
                       ("inception_fid", "FID (torchvision Inception)"),
                       ("inception_kid", "KID (torchvision Inception)")):
        if key in dist:
            out.append(f"| {label} (vs real test) | {_fmt(dist[key])} | {_fmt(ref_dist.get(key))} (train vs test) |")
    if mem:
        out.append(f"| near-duplicate of a training image (CLIP cosine >= 0.95) | {_fmt(mem['near_duplicate_rate'])} | "
                   f"{_fmt(ref.get('real_test_near_duplicate_rate'))} (real test images) |")
        out.append(f"| mean cosine to the nearest training image | {_fmt(mem['nn_cosine_mean'])} | "
                   f"{_fmt(ref.get('real_test_nn_cosine_mean'))} |")
    if "inception_fid" not in dist:
        out += ["", "Standard FID/KID: skipped (no torchvision Inception-v3 weights on this machine; "
                    "pass --inception PATH)."]
    out += ["", f"Time: {report.get('seconds', 0):.0f} s. Pictures: `best_worst.png`."]
    return "\n".join(out) + "\n"


def _describe(objs) -> str:
    return ", ".join(f"{o['size']} {o['colour']} {o['shape']}" for o in objs) or "nothing"


def best_worst(entry: dict, reader, k: int = 8) -> Image.Image | None:
    """Grid: top row the k best-scored samples, bottom row the k worst, with caption and what the
    reader saw."""
    rows, images, captions = entry.get("rows"), entry.get("images"), entry.get("captions")
    if not rows or images is None:
        return None
    def score(r):
        stated = sum(r[a][1] for a in ("colour", "shape", "size", "position"))
        right = sum(r[a][0] for a in ("colour", "shape", "size", "position"))
        return (r["exact"], right / stated if stated else 0.0)
    order = sorted(range(len(rows)), key=lambda i: score(rows[i]), reverse=True)
    k = min(k, max(1, len(order) // 2))
    picks = order[:k] + order[-k:]
    u8 = (images[picks].clamp(0, 1) * 255).round().to(torch.uint8)
    seen = reader.read(u8) if reader is not None else [[] for _ in picks]
    labels = [f"[{'ok' if rows[i]['exact'] else 'wrong'}] {captions[i]} | saw: {_describe(s)}"
              for i, s in zip(picks, seen)]
    return captioned_grid([to_pil(x) for x in images[picks]], labels, cols=k, scale=4)


def write_report(report: dict, out: str | os.PathLike, reader=None) -> Path:
    out = Path(out)
    atomic_write_text(out / "report.json", json.dumps(_plain(report), indent=2))
    atomic_write_text(out / "report.md", markdown(report))
    grid = best_worst(next(iter(report["sets"].values()), {}), reader)
    if grid is not None:
        save_image_atomic(grid, out / "best_worst.png")
    return out
