"""Export a training run (or an earlier export) as safetensors + JSON + a model card, for from_pretrained.

    python -m dalle2.export runs/tiny checkpoints/tiny                # fp32: samples exactly as the run does
    python -m dalle2.export runs checkpoints/shapes32 --half          # fp16 files, upcast to fp32 at load
    python -m dalle2.export runs out --command "python -m dalle2.pipeline --out runs" --hardware "1 x H200"

To put figures measured on the exported (fp16) files themselves into the card, evaluate an export and
export again with that report (the same run and flags give the same weights):

    python -m dalle2.export runs /tmp/half --half &&
        python -m dalle2.evaluation.evaluate --checkpoints /tmp/half --out /tmp/half-report
    python -m dalle2.export runs checkpoints/shapes32 --half --report /tmp/half-report/report.json

To change the sampling defaults an export ships with (what sample.py and generate use when not told
otherwise), e.g. to the setting `python -m dalle2.evaluation.sweep` recommends (weights unchanged):

    python -m dalle2.export checkpoints/shapes32 /tmp/new --half --sampling dpmpp2m:15:10 --guidance-scale 3

RUN_DIR holds clip.pt, prior.pt and decoder.pt (a run's --out); its report/report.json and
<stage>/metrics.jsonl, when present, go into the model card. OUT_DIR is written whole or not at all,
and replaces only an earlier export. Load the result with DALLE2.from_pretrained(OUT_DIR) or
`python sample.py "a red circle" --checkpoints OUT_DIR`.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

from dalle2.core.cli import main_wrapper
from dalle2.evaluation.benchmark import parse_settings
from dalle2.unclip import DALLE2


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder with clip.pt, prior.pt, decoder.pt (or an exported folder)")
    p.add_argument("out_dir", help="folder to write (a new folder, or an earlier export to replace)")
    p.add_argument("--half", action="store_true", help="store the weights in fp16 (half the size)")
    p.add_argument("--command", default=None, help="the command that trained the run, for the model card")
    p.add_argument("--hardware", default=None, help="what it was trained on, for the model card")
    p.add_argument("--notes", default=None, help="a paragraph for the model card")
    p.add_argument("--report", default=None, help="the report.json whose figures go into the card (default: "
                   "RUN_DIR/report/report.json; e.g. `python -m dalle2.evaluation.evaluate` run on the export itself)")
    p.add_argument("--sampling", default=None, metavar="SAMPLER:STEPS[:PRIOR_STEPS[:LO-HI]]",
                   help="new sampling defaults: sampler, decoder steps, prior steps (default: STEPS) and the decoder "
                   "guidance interval (default: every step), as in the sweep's --settings, e.g. dpmpp2m:15:10")
    p.add_argument("--guidance-scale", type=float, default=None, help="new default decoder guidance scale")
    args = p.parse_args(argv)
    import torch

    run, out = Path(args.run_dir), Path(args.out_dir)
    if out.resolve() == run.resolve():
        raise SystemExit(f"error: {out}: the export must go to another folder than the run it comes from")
    model = DALLE2.from_pretrained(run)
    set_sampling_defaults(model, args.sampling, args.guidance_scale)
    card = {"command": args.command, "hardware": args.hardware, "notes": args.notes, "report": args.report}
    model.save_pretrained(out, dtype=torch.float16 if args.half else None, card=card)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {run} -> {out} ({size / 2 ** 20:.1f} MiB, {'fp16' if args.half else 'fp32'}); "
          f"load it with DALLE2.from_pretrained({str(out)!r})")
    return out


def set_sampling_defaults(model, setting: Optional[str], guidance_scale: Optional[float]) -> None:
    """Replace the sampling defaults the decoder's config carries (and so the export): `setting` in the
    sweep's SAMPLER:STEPS[:PRIOR_STEPS[:LO-HI]] form; a setting without LO-HI guides every step."""
    if setting is None and guidance_scale is None:
        return
    changes = {}
    if setting is not None:
        parsed = parse_settings(setting, model.sampling, "--sampling")
        if len(parsed) != 1 or setting.strip() == "default":
            raise SystemExit(f"error: --sampling {setting!r}: expected one SAMPLER:STEPS[:PRIOR_STEPS[:LO-HI]]")
        changes = {k: parsed[0][k] for k in ("sampler", "steps", "prior_steps")}
        changes["guidance_interval"] = parsed[0].get("guidance_interval", [0.0, 1.0])
    if guidance_scale is not None:
        if not guidance_scale >= 0:
            raise SystemExit(f"error: --guidance-scale {guidance_scale}: must be >= 0")
        changes["guidance_scale"] = guidance_scale
    model.sampling = model.decoder.config.sampling = dataclasses.replace(model.decoder.config.sampling, **changes)


if __name__ == "__main__":
    main_wrapper(main)()
