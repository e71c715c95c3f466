"""Guidance sweep: sample at several guidance scales (and step counts), evaluate each, plot
faithfulness against diversity and distance, and recommend a setting.

    python -m dalle2.evaluation.sweep --checkpoints runs --guidance 1,2,3,5 [--prior-guidance 1] [--steps 50]
                           [--limit 200] [--out runs/sweep]
    python -m dalle2.evaluation.sweep --checkpoints runs --guidance 3 --samplers ddim,dpmpp2m --steps 10,15,20,50 \\
                           --prior-steps 10,20,64    # samplers and step counts (decoder, prior)

Writes OUT/sweep.json, OUT/sweep.md and OUT/sweep.png. The recommended setting has the highest
image-level exact match on the test captions (shapes data); on data without an attribute reader
(CIFAR-10, user folders) the highest R-precision with the run's own CLIP, then CLIP score. Ties: the
lower CLIP Frechet distance.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from dalle2.core.cli import main_wrapper
from dalle2.core.config import add_config_args
from dalle2.core.files import atomic_write_text
from dalle2.core.plots import scatter_plot
from dalle2.core.runtime import pick_device
from dalle2.diffusion import SAMPLERS
from dalle2.evaluation.evaluate import RealFeatures, evaluate_settings, load_everything


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def exact_match(result: dict):
    faith = next(iter(result["sets"].values())).get("faithfulness")
    return faith["all"]["exact"] if faith else None


def caption_match(result: dict) -> dict:
    return next(iter(result["sets"].values())).get("caption_match") or {}


def recommend(results: list[dict]) -> int:
    """Shapes: the highest exact match. Other data: the highest R-precision, then CLIP score (what the
    captions say, not only how real the pictures look). Ties: the lower CLIP Frechet distance."""
    def key(i):
        r = results[i]
        em = exact_match(r)
        fd = r.get("distance", {}).get("clip_fd", float("inf"))
        if em is not None:
            return (em, 0.0, -fd)
        cm = caption_match(r)
        return (cm.get("r_precision", -1.0), cm.get("clip_score", -1.0), -fd)
    return max(range(len(results)), key=key)


def guidance_lines(settings: list[dict]) -> list[list[int]]:
    """Indices of the settings that differ only in decoder guidance, each group in guidance order:
    the plot joins them, so one line shows what raising the guidance does."""
    groups: dict = {}
    for i, st in enumerate(settings):  # the group: every setting but the decoder guidance
        groups.setdefault(tuple(sorted((k, v) for k, v in st.items() if k != "guidance_scale")), []).append(i)
    return [sorted(idx, key=lambda i: settings[i]["guidance_scale"]) for idx in groups.values()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default="runs")
    p.add_argument("--out", default=None, help="default: CHECKPOINTS/sweep")
    p.add_argument("--guidance", default="1,2,3,5", help="decoder guidance scales")
    p.add_argument("--prior-guidance", default="1", help="prior guidance scales")
    p.add_argument("--steps", default="50", help="decoder step counts")
    p.add_argument("--prior-steps", default=None, help="prior step counts (default: the checkpoint's)")
    p.add_argument("--samplers", default=None,
                   help="samplers to compare, e.g. ddim,dpmpp2m (default: the checkpoint's)")
    p.add_argument("--limit", type=int, default=None, help="test captions per setting (default 500 on GPU, 64 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--reader-cache", default=None)
    add_config_args(p)  # where the data is: the user's config, never the checkpoints'
    args = p.parse_args(argv)
    samplers = [s.strip() for s in (args.samplers or "").split(",") if s.strip()]
    if any(s not in SAMPLERS for s in samplers):  # before anything is loaded
        raise SystemExit(f"error: --samplers {args.samplers}: each must be one of {', '.join(SAMPLERS)}")
    device = pick_device(args.device)
    limit = args.limit or (500 if device.type == "cuda" else 64)
    model, reader, prompt_sets, real_test, real_train = load_everything(
        args.checkpoints, device, limit, None, "test", [], args.reader_cache, config_args=args)
    real = RealFeatures.compute(model, real_test, real_train)  # once: every setting is compared with them
    ints = lambda text: [int(s) for s in text.split(",") if s.strip()]  # noqa: E731
    samplers = samplers or [model.sampling.sampler]
    grid = list(itertools.product(_floats(args.guidance), _floats(args.prior_guidance), ints(args.steps),
                                  ints(args.prior_steps) if args.prior_steps else [model.sampling.prior_steps],
                                  samplers))
    results = []
    for i, (g, pg, steps, prior_steps, sampler) in enumerate(grid, 1):
        settings = {"guidance_scale": g, "prior_guidance_scale": pg, "steps": steps, "prior_steps": prior_steps,
                    "sampler": sampler}
        print(f"[{i}/{len(grid)}] {settings}")
        r = evaluate_settings(model, reader, prompt_sets, settings, real=real, seed=args.seed)
        results.append(r)
        print(f"    exact match {exact_match(r)}, R-precision {caption_match(r).get('r_precision', float('nan')):.3f}, "
              f"CLIP FD {r['distance']['clip_fd']:.4f}, "
              f"diversity {r['diversity']['clip_pairwise_distance']:.4f}")
    best = recommend(results)
    out = Path(args.out) if args.out else Path(args.checkpoints) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    labels = [f"g{r['settings']['guidance_scale']:g}/p{r['settings']['prior_guidance_scale']:g}"
              f"/s{r['settings']['steps']}"
              + f"/ps{r['settings']['prior_steps']}" * (len({x['settings']['prior_steps'] for x in results}) > 1)
              + f"/{r['settings']['sampler']}" * (len(samplers) > 1) for r in results]
    em = [exact_match(r) if exact_match(r) is not None else float("nan") for r in results]
    div = [r["diversity"]["clip_pairwise_distance"] for r in results]
    fd = [r["distance"]["clip_fd"] for r in results]
    lines = guidance_lines([r["settings"] for r in results])
    rp = [caption_match(r).get("r_precision", float("nan")) for r in results]
    y_label = "exact match" if reader is not None else "R-precision (own CLIP)"
    ys = em if reader is not None else rp
    scatter_plot([
        {"title": f"{y_label} vs diversity", "xlabel": "CLIP pairwise distance (diversity)", "ylabel": y_label,
         "points": list(zip(div, ys, labels)), "highlight": best, "lines": lines},
        {"title": f"{y_label} vs distance to real", "xlabel": "CLIP Frechet distance", "ylabel": y_label,
         "points": list(zip(fd, ys, labels)), "highlight": best, "lines": lines},
    ], out / "sweep.png")
    summary = {"recommended": results[best]["settings"], "results": [
        {"settings": r["settings"], "exact_match": exact_match(r), "caption_match": caption_match(r) or None,
         "diversity": r["diversity"],
         "distance": r.get("distance"), "memorisation": r.get("memorisation"), "seconds": r["seconds"]}
        for r in results]}
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2))
    cs = [caption_match(r).get("clip_score", float("nan")) for r in results]
    lines = ["| setting | exact match | R-precision | CLIP score | CLIP FD | diversity | seconds |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {lab}{' (recommended)' if i == best else ''} | {e:.3f} | {r_:.3f} | {c:.2f} | {f:.4f} | {d:.4f} "
              f"| {r['seconds']:.1f} |"
              for i, (lab, e, r_, c, f, d, r) in enumerate(zip(labels, em, rp, cs, fd, div, results))]
    atomic_write_text(out / "sweep.md", "# Guidance sweep\n\n" + "\n".join(lines) + "\n\n![sweep](sweep.png)\n")
    print("\n".join(lines) + f"\nrecommended: {results[best]['settings']} -> {out}/sweep.png")
    return summary


if __name__ == "__main__":
    main_wrapper(main)()
