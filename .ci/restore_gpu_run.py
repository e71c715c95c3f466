"""Turn what a device call of .ci/gpu_recipe.sh brought back into an export that loads here.

    python .ci/restore_gpu_run.py FILES_AT OUT_DIR
    python sample.py "a red circle" --checkpoints OUT_DIR/pretrained

FILES_AT holds the call's files: clip|prior|decoder.safetensors, meta.tgz and report.tgz (log.txt and
grid.png are not needed). Two cases:
- the run got to its export: meta.tgz is the export's (model_index.json, configs, tokenizer, model card)
  and the .safetensors are its weights, so OUT_DIR/pretrained is that export put back together;
  from_pretrained checks every file's sha256 against the index.
- a timeout came first: meta.tgz holds each finished stage's config.json and extra.json and the
  tokenizer. Each stage becomes a run checkpoint again (fp16 weights upcast to fp32) in OUT_DIR,
  and OUT_DIR/pretrained is exported from it (--half: the same fp16 values). The CLIP's hash is of the upcast
  weights, so the prior's and decoder's record of it is set to that hash, after checking that both
  recorded the same CLIP.
report.tgz (reports, metrics, sample grids) is unpacked into OUT_DIR either way, so OUT_DIR is a run folder
that `RUN_DIR=OUT_DIR SKIP_TRAIN=1 bash .ci/gpu_recipe.sh` can sweep and benchmark (carried to a fresh device).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from safetensors.torch import load_file  # noqa: E402

from dalle2.core.checkpoint import FORMAT, atomic_torch_save, state_hash  # noqa: E402
from dalle2.pretrained import STAGES  # noqa: E402
from dalle2.unclip import DALLE2  # noqa: E402


def unpack(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # no links out of `into`, no devices
        tar.extractall(into, **safe)


def rebuild_run(files: Path, meta: Path, run: Path) -> None:
    """Run checkpoints (clip.pt, prior.pt, decoder.pt) from stage weights and their meta files."""
    tokenizer = json.loads((meta / "tokenizer.json").read_text())
    clip_hash, recorded = None, set()
    for stage in STAGES:
        if not (files / f"{stage}.safetensors").is_file():
            raise SystemExit(f"error: {files / (stage + '.safetensors')}: missing (the run did not finish {stage})")
        state = {k: v.float() for k, v in load_file(str(files / f"{stage}.safetensors")).items()}
        extra = json.loads((meta / stage / "extra.json").read_text())
        step = extra.pop("step")
        if stage == "clip":
            clip_hash = state_hash(state)
        else:
            recorded.add(extra.get("clip_hash"))
            extra["clip_hash"] = clip_hash
        extra["restored_from"] = "fp16 stage weights of a device run (.ci/restore_gpu_run.py)"
        ckpt = {"stage": stage, "format": FORMAT, "step": step, "tokenizer": tokenizer, "model": state,
                "config": json.loads((meta / stage / "config.json").read_text()), "extra": extra}
        atomic_torch_save(ckpt, run / f"{stage}.pt")
    if len(recorded) != 1:
        raise SystemExit(f"error: {meta}: the prior and the decoder were trained on different CLIPs ({recorded})")


def gpu_name(log: Path):
    """The GPU line nvidia-smi wrote at the top of the run's log.txt, or None."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    found = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("name, memory.total")]
    return found[0].strip() if found else None


def main(argv=None) -> Path:
    if len(argv or sys.argv[1:]) != 2:
        raise SystemExit(__doc__)
    files, run = (Path(a) for a in (argv or sys.argv[1:]))
    run.mkdir(parents=True, exist_ok=True)
    export = run / "pretrained"
    if (files / "report.tgz").is_file():
        unpack(files / "report.tgz", run)
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp)
        unpack(files / "meta.tgz", meta)
        if (meta / "model_index.json").is_file():  # the export itself
            shutil.copytree(meta, export, dirs_exist_ok=True)
            for stage in STAGES:
                (export / stage / "model.safetensors").write_bytes((files / f"{stage}.safetensors").read_bytes())
        else:
            rebuild_run(files, meta, run)
            card = ["--command", "bash .ci/gpu_recipe.sh (cut short before its export; restored from the stage files)"]
            card += ["--hardware", gpu] if (gpu := gpu_name(files / "log.txt")) else []
            subprocess.run([sys.executable, "-m", "dalle2.export", str(run), str(export), "--half", *card], check=True,
                           cwd=REPO)
    model = DALLE2.from_pretrained(export)  # every sha256 and CLIP hash checked
    print(f"restored {files} -> {export} (steps: "
          + ", ".join(f"{s} {getattr(model, s).step}" for s in STAGES) + f"); run files in {run}")
    return export


if __name__ == "__main__":
    main()
