"""Guidance sweep: sample at several guidance scales (and step counts), evaluate each, plot
faithfulness against diversity and distance, and recommend a setting.

    python -m dalle2.evaluation.sweep --checkpoints runs --guidance 1,2,3,5 [--prior-guidance 1] [--steps 50]
                           [--limit 200] [--out runs/sweep]
    python -m dalle2.evaluation.sweep --checkpoints runs --guidance 3 --samplers ddim,dpmpp2m --steps 10,15,20,50 \\
                           --prior-steps 10,20,64    # samplers and step counts (decoder, prior): every combination
    python -m dalle2.evaluation.sweep --checkpoints runs --guidance 3 \\
                           --settings ddim:50:64,dpmpp2m:10:10,dpmpp2m:15:15,dpmpp2m:15:15:0.2-0.8   # just these

Writes OUT/sweep.json, OUT/sweep.md and OUT/sweep.png. The recommended setting has the highest
image-level exact match on the test captions (shapes data); on data without an attribute reader
(CIFAR-10, user folders) the highest R-precision with the run's own CLIP, then CLIP score. Ties: the
lower CLIP Frechet distance.

When samplers, step counts or guidance intervals vary, it also names the fewest steps at the quality of
the reference, the DDIM setting with the most steps that guides every step (else the setting with the
most steps): the reference is sampled again with --noise-runs other seeds (default 1) to measure
run-to-run noise, and a setting at the reference's guidance counts as equal when its exact match
(R-precision without a reader) is at most max(2 standard errors of a difference of two proportions, the
spread of the reference's runs) lower, its per-image exact match on the same captions and noise is not
lower by more than 2 standard errors of that paired difference, and its CLIP Frechet distance is at
most twice the spread higher.
Fewest means fewest decoder steps (a decoder step costs about 70 prior steps at the shapes32 sizes),
then fewest prior steps, then the narrowest decoder guidance interval (the fewest guided rows).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Optional

from dalle2.core.cli import main_wrapper
from dalle2.core.config import SamplingConfig, add_config_args
from dalle2.core.files import atomic_write_text
from dalle2.core.plots import scatter_plot
from dalle2.core.runtime import pick_device
from dalle2.diffusion import SAMPLERS
from dalle2.evaluation.benchmark import parse_settings, setting_name
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


def _quality(result: dict) -> tuple[float, int]:
    """The proportion the step comparison reads (exact match, or R-precision without a reader) and
    the number of images it is over."""
    one = next(iter(result["sets"].values()))
    em = exact_match(result)
    return (em if em is not None else caption_match(result).get("r_precision", float("nan"))), one["n_images"]


def paired_difference(flags: Optional[list], ref_flags: Optional[list]) -> tuple[Optional[float], Optional[float]]:
    """Mean and standard error of a setting's per-image exact match minus the reference's, over the
    same captions and seeds (the sweep draws both from the same noise): the sampler's own effect, free
    of the seed-to-seed noise. (None, None) without per-image flags."""
    if not flags or not ref_flags or len(flags) != len(ref_flags):
        return None, None
    n = len(flags)
    diffs = [float(a) - float(b) for a, b in zip(flags, ref_flags)]
    mean = sum(diffs) / n
    return mean, math.sqrt(max(sum(x * x for x in diffs) / n - mean * mean, 0.0) / n)


def _same_guidance(a: dict, b: dict) -> bool:
    return (a["guidance_scale"], a["prior_guidance_scale"]) == (b["guidance_scale"], b["prior_guidance_scale"])


def _interval(st: dict) -> Optional[tuple]:
    """A setting's decoder guidance interval, None when it guides every step."""
    gi = st.get("guidance_interval")
    return None if gi is None or tuple(gi) == (0.0, 1.0) else tuple(gi)


def step_reference(settings: list[dict]) -> Optional[int]:
    """Index of the reference of a step comparison: the DDIM setting with the most (decoder, prior)
    steps that guides every step, else the setting with the most steps; None when samplers, step
    counts and guidance intervals do not vary."""
    if len({(st["sampler"], st["steps"], st["prior_steps"], _interval(st)) for st in settings}) < 2:
        return None
    full = [i for i, st in enumerate(settings) if _interval(st) is None] or list(range(len(settings)))
    ddim = [i for i in full if settings[i]["sampler"] == "ddim"] or full
    return max(ddim, key=lambda i: (settings[i]["steps"], settings[i]["prior_steps"]))


def fewest_steps(results: list[dict], ref: int, repeats: list[dict]) -> dict:
    """The fewest-step setting at the reference's quality (see the module docstring), with the
    tolerances used and, for every setting at the reference's guidance, whether it passed."""
    q_ref, n_ref = _quality(results[ref])
    runs = [results[ref]] + repeats
    spread_q = max(_quality(r)[0] for r in runs) - min(_quality(r)[0] for r in runs)
    fds = [r["distance"]["clip_fd"] for r in runs]
    spread_fd = max(fds) - min(fds)
    fd_ref = results[ref]["distance"]["clip_fd"]
    checked = []
    for i, r in enumerate(results):
        st = r["settings"]
        if not _same_guidance(st, results[ref]["settings"]):
            continue
        q, n = _quality(r)
        se = math.sqrt(max(q_ref * (1 - q_ref), 1e-12) * (1 / n_ref + 1 / n))
        tol_q = max(2 * se, spread_q)
        ok_q = q >= q_ref - tol_q
        ok_fd = not repeats or r["distance"]["clip_fd"] <= fd_ref + 2 * spread_fd
        diff, diff_se = paired_difference(r.get("exact_flags"), results[ref].get("exact_flags"))
        # on the same captions and noise a real drop shows with less noise than between two seeds: a
        # setting more than 2 paired standard errors below the reference is not equal to it
        ok_paired = diff is None or diff >= -2 * diff_se - 1e-9
        checked.append({"index": i, "settings": st, "quality": q, "tolerance": tol_q,
                        "clip_fd": r["distance"]["clip_fd"], "equal": bool(ok_q and ok_fd and ok_paired),
                        "paired_difference": diff, "paired_se": diff_se})
    equal = [c for c in checked if c["equal"]]
    def cost(c):  # decoder steps, prior steps, then the share of the steps guided
        lo, hi = _interval(c["settings"]) or (0.0, 1.0)
        return c["settings"]["steps"], c["settings"]["prior_steps"], hi - lo, -c["quality"]
    best = min(equal, key=cost)
    return {"reference": results[ref]["settings"], "reference_quality": q_ref, "reference_clip_fd": fd_ref,
            "noise_runs": len(repeats), "spread_quality": spread_q, "spread_clip_fd": spread_fd,
            "fd_tolerance": 2 * spread_fd if repeats else None, "fewest": best["settings"], "checked": checked}


def _label(st: dict) -> str:
    return setting_name(st["sampler"], st["steps"], st["prior_steps"], _interval(st))


def export_command(checkpoints: str, st: dict) -> str:
    """The dalle2.export command that makes setting `st` the sampling default of a copy of `checkpoints`."""
    interval = _interval(st)
    spec = f"{st['sampler']}:{st['steps']}:{st['prior_steps']}" + (f":{interval[0]:g}-{interval[1]:g}"
                                                                   if interval else "")
    return (f"python -m dalle2.export {checkpoints} NEW_FOLDER --half --sampling {spec} "
            f"--guidance-scale {st['guidance_scale']:g}")


def guidance_lines(settings: list[dict]) -> list[list[int]]:
    """Indices of the settings that differ only in decoder guidance, each group in guidance order:
    the plot joins them, so one line shows what raising the guidance does."""
    groups: dict = {}
    for i, st in enumerate(settings):  # the group: every setting but the decoder guidance
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in st.items() if k != "guidance_scale"))
        groups.setdefault(key, []).append(i)
    return [sorted(idx, key=lambda i: settings[i]["guidance_scale"]) for idx in groups.values()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default="runs")
    p.add_argument("--out", default=None, help="default: CHECKPOINTS/sweep")
    p.add_argument("--guidance", default="1,2,3,5", help="decoder guidance scales")
    p.add_argument("--prior-guidance", default="1", help="prior guidance scales")
    p.add_argument("--steps", default=None, help="decoder step counts (default 50)")
    p.add_argument("--prior-steps", default=None, help="prior step counts (default: the checkpoint's)")
    p.add_argument("--samplers", default=None,
                   help="samplers to compare, e.g. ddim,dpmpp2m (default: the checkpoint's)")
    p.add_argument("--settings", default=None,
                   help="SAMPLER:STEPS[:PRIOR_STEPS[:LO-HI]] (or default) list, e.g. ddim:50:64,dpmpp2m:15:15 "
                        "(LO-HI: decoder guidance only in that interval of t/(T-1)): these "
                        "instead of every combination of --samplers, --steps and --prior-steps")
    p.add_argument("--limit", type=int, default=None, help="test captions per setting (default 500 on GPU, 64 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-runs", type=int, default=1,
                   help="when samplers or step counts vary: how many more seeds the reference setting is "
                        "sampled at, to measure run-to-run noise (0: binomial error only, no CLIP FD check)")
    p.add_argument("--device", default="auto")
    p.add_argument("--reader-cache", default=None)
    add_config_args(p)  # where the data is: the user's config, never the checkpoints'
    args = p.parse_args(argv)
    samplers = [s.strip() for s in (args.samplers or "").split(",") if s.strip()]
    if any(s not in SAMPLERS for s in samplers):  # before anything is loaded
        raise SystemExit(f"error: --samplers {args.samplers}: each must be one of {', '.join(SAMPLERS)}")
    if args.settings is not None:  # checked before anything is loaded
        if args.samplers or args.steps or args.prior_steps:
            raise SystemExit("error: --settings lists sampler and steps itself: drop --samplers, --steps and "
                             "--prior-steps")
        parse_settings(args.settings, SamplingConfig())
    device = pick_device(args.device)
    limit = args.limit or (500 if device.type == "cuda" else 64)
    model, reader, prompt_sets, real_test, real_train = load_everything(
        args.checkpoints, device, limit, None, "test", [], args.reader_cache, config_args=args)
    real = RealFeatures.compute(model, real_test, real_train)  # once: every setting is compared with them
    ints = lambda text: [int(s) for s in text.split(",") if s.strip()]  # noqa: E731
    samplers = samplers or [model.sampling.sampler]
    if args.settings is not None:
        listed = parse_settings(args.settings, model.sampling)
        chosen = [(st["steps"], st["prior_steps"], st["sampler"], st.get("guidance_interval")) for st in listed]
    else:
        chosen = list(itertools.product(ints(args.steps or "50"),
                                        ints(args.prior_steps) if args.prior_steps else [model.sampling.prior_steps],
                                        samplers, [None]))
    grid = [{"guidance_scale": g, "prior_guidance_scale": pg, "steps": steps, "prior_steps": prior_steps,
             "sampler": sampler, **({"guidance_interval": interval} if interval is not None else {})}
            for g, pg, (steps, prior_steps, sampler, interval)
            in itertools.product(_floats(args.guidance), _floats(args.prior_guidance), chosen)]
    out = Path(args.out) if args.out else Path(args.checkpoints) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    # the reference and its repeats first, and the files rewritten after every setting: a sweep cut short
    # (a time limit) still leaves its step comparison for the settings it got to
    ref = step_reference(grid)
    order = ([ref] if ref is not None else []) + [i for i in range(len(grid)) if i != ref]
    results, repeats = [None] * len(grid), []
    for n, i in enumerate(order, 1):
        print(f"[{n}/{len(grid)}] {grid[i]}")
        r = results[i] = evaluate(model, reader, prompt_sets, grid[i], real, args.seed)
        print(f"    exact match {exact_match(r)}, R-precision {caption_match(r).get('r_precision', float('nan')):.3f}, "
              f"CLIP FD {r['distance']['clip_fd']:.4f}, "
              f"diversity {r['diversity']['clip_pairwise_distance']:.4f}")
        summary, lines = write_sweep(out, results, ref, repeats, reader is not None, args.checkpoints)
        for k in range(1, args.noise_runs + 1) if i == ref else ():
            print(f"[reference, seed {args.seed + k}] {grid[ref]}")
            repeats.append(evaluate(model, reader, prompt_sets, grid[ref], real, args.seed + k))
            print(f"    exact match {exact_match(repeats[-1])}, CLIP FD {repeats[-1]['distance']['clip_fd']:.4f}")
            summary, lines = write_sweep(out, results, ref, repeats, reader is not None, args.checkpoints)
    print("\n".join(lines) + f"\nrecommended: {summary['recommended']} -> {out}/sweep.png")
    return summary


def evaluate(model, reader, prompt_sets: dict, settings: dict, real, seed: int) -> dict:
    """evaluate_settings, plus "exact_flags": the first prompt set's per-image exact match (with a
    reader), for the paired comparison; the images themselves are not kept."""
    r = evaluate_settings(model, reader, prompt_sets, settings, real=real, seed=seed, keep_images=reader is not None)
    for entry in r["sets"].values():
        rows = entry.pop("rows", None)
        for key in ("images", "captions", "heldout_flags"):
            entry.pop(key, None)
        if rows is not None and "exact_flags" not in r:
            r["exact_flags"] = [bool(row["exact"]) for row in rows]
    return r


def write_sweep(out: Path, evaluated: list, ref: Optional[int], repeats: list, has_reader: bool,
                checkpoints: str = "CHECKPOINTS"):
    """sweep.json, sweep.md and sweep.png for the settings evaluated so far (None: not yet); returns the
    summary and the markdown lines."""
    results = [r for r in evaluated if r is not None]
    best = recommend(results)
    steps_summary = None
    if ref is not None and evaluated[ref] is not None:
        steps_summary = fewest_steps(results, sum(r is not None for r in evaluated[:ref]), repeats)
    labels = [f"g{r['settings']['guidance_scale']:g}/p{r['settings']['prior_guidance_scale']:g}"
              f"/s{r['settings']['steps']}"
              + f"/ps{r['settings']['prior_steps']}" * (len({x['settings']['prior_steps'] for x in results}) > 1)
              + f"/{r['settings']['sampler']}" * (len({x['settings']['sampler'] for x in results}) > 1)
              + (f"/gi{_interval(r['settings'])[0]:g}-{_interval(r['settings'])[1]:g}" if _interval(r['settings'])
                 else "")
              for r in results]
    em = [exact_match(r) if exact_match(r) is not None else float("nan") for r in results]
    div = [r["diversity"]["clip_pairwise_distance"] for r in results]
    fd = [r["distance"]["clip_fd"] for r in results]
    lines = guidance_lines([r["settings"] for r in results])
    rp = [caption_match(r).get("r_precision", float("nan")) for r in results]
    y_label = "exact match" if has_reader else "R-precision (own CLIP)"
    ys = em if has_reader else rp
    scatter_plot([
        {"title": f"{y_label} vs diversity", "xlabel": "CLIP pairwise distance (diversity)", "ylabel": y_label,
         "points": list(zip(div, ys, labels)), "highlight": best, "lines": lines},
        {"title": f"{y_label} vs distance to real", "xlabel": "CLIP Frechet distance", "ylabel": y_label,
         "points": list(zip(fd, ys, labels)), "highlight": best, "lines": lines},
    ], out / "sweep.png")
    complete = len(results) == len(evaluated)
    summary = {"recommended": results[best]["settings"], "fewest_steps": steps_summary, "complete": complete,
               "results": [
                   {"settings": r["settings"], "exact_match": exact_match(r), "caption_match": caption_match(r) or None,
                    "diversity": r["diversity"],
                    "distance": r.get("distance"), "memorisation": r.get("memorisation"), "seconds": r["seconds"]}
                   for r in results]}
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2))
    cs = [caption_match(r).get("clip_score", float("nan")) for r in results]
    lines = ([] if complete else [f"**Incomplete: {len(results)} of {len(evaluated)} settings evaluated so far.**", ""])
    lines += ["| setting | exact match | R-precision | CLIP score | CLIP FD | diversity | seconds |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {lab}{' (recommended)' if i == best else ''} | {e:.3f} | {r_:.3f} | {c:.2f} | {f:.4f} | {d:.4f} "
              f"| {r['seconds']:.1f} |"
              for i, (lab, e, r_, c, f, d, r) in enumerate(zip(labels, em, rp, cs, fd, div, results))]
    if steps_summary is not None:
        f = steps_summary
        fd_rule = (f"CLIP FD at most {f['fd_tolerance']:.4f} above {f['reference_clip_fd']:.4f}" if f["noise_runs"]
                   else "no CLIP FD check (--noise-runs 0)")
        lines += ["", f"Fewest steps at the quality of {_label(f['reference'])} ({f['noise_runs']} more seed(s) of it: "
                  f"spread {f['spread_quality']:.3f} in {'exact match' if has_reader else 'R-precision'}, "
                  f"{f['spread_clip_fd']:.4f} in CLIP FD; equal = at most the tolerance below "
                  f"{f['reference_quality']:.3f}, {fd_rule}): **{_label(f['fewest'])}**", "",
                  "| setting | quality | tolerance | CLIP FD | equal | paired difference ± 2 SE |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {_label(c['settings'])} | {c['quality']:.3f} | {c['tolerance']:.3f} | {c['clip_fd']:.4f} "
                  f"| {'yes' if c['equal'] else 'no'} | "
                  + (f"{c['paired_difference']:+.3f} ± {2 * c['paired_se']:.3f} |" if c["paired_se"] is not None
                     else "- |") for c in f["checked"]]
        lines += ["", "Paired difference: the setting's per-image exact match minus the reference's on the same "
                  "captions and noise, the sampler's own effect without the seed-to-seed noise; \"equal\" also "
                  "needs it no lower than -2 SE.", "",
                  "To ship the fewest-step setting as the default of an export (the weights stay as they are): "
                  f"`{export_command(checkpoints, f['fewest'])}`"]
    atomic_write_text(out / "sweep.md", "# Guidance sweep\n\n" + "\n".join(lines) + "\n\n![sweep](sweep.png)\n")
    return summary, lines


if __name__ == "__main__":
    main_wrapper(main)()
