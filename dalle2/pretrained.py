"""Exported weights: a folder of safetensors and JSON that loads without unpickling anything.

    model.save_pretrained("checkpoints/mine", dtype=torch.float16)   # or: python -m dalle2.export RUN OUT --half
    model = DALLE2.from_pretrained("checkpoints/mine")               # DALLE2.from_pretrained() = the shipped weights

Layout (training resume state stays in the run folder's `.pt` files; this is for sampling):

    model_index.json        format version; per stage: the CLIP hash, step, extra data, training seconds,
                            sha256 of the weights
    tokenizer.json          the tokenizer all three stages share
    clip/config.json        each stage's resolved config, exactly as its checkpoint holds it
    clip/model.safetensors  its weights (tensors only; fp32, or fp16 upcast to fp32 at load)
    prior/..., decoder/...
    README.md               the model card: data, recipe, provenance, training time, measured figures, limits

safetensors holds only tensors and JSON holds only plain data, so loading runs no code on any torch
version. The CLIP hash of each stage is recorded so that stages of different CLIPs are refused exactly
as DALLE2 refuses mismatched checkpoints. The folder is written next to its final name and renamed
into place, with model_index.json written last: an interrupted export never leaves a folder that loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch

from clip.model import build_clip
from dalle2.core.checkpoint import CheckpointError, load_checkpoint, state_hash
from dalle2.core.config import ConfigError, config_from_dict
from dalle2.core.files import atomic_write, atomic_write_text
from dalle2.core.report import markdown
from dalle2.core.tokenizer import Tokenizer
from dalle2.decoder.model import build_decoder
from dalle2.prior.model import build_prior

FORMAT_NAME = "open-dalle2"
FORMAT_VERSION = 1
STAGES = ("clip", "prior", "decoder")
INDEX, TOKENIZER, CONFIG, WEIGHTS, CARD = ("model_index.json", "tokenizer.json", "config.json", "model.safetensors",
                                           "README.md")
REPO = Path(__file__).resolve().parent.parent  # found from the package, never from the working directory
# The weights shipped with the repo, when present: the GPU-trained shapes32 recipe, else (until it is
# trained) the CPU-trained fallback. Looked up once, at import: a folder's presence, nothing read.
SHIPPED_CHOICES = (REPO / "checkpoints" / "shapes32", REPO / "checkpoints" / "shapes_cpu")


def first_folder(choices: tuple[Path, ...]) -> Path:
    """The first of `choices` that is a folder; the first one when none is (errors then name it)."""
    return next((d for d in choices if d.is_dir()), choices[0])


SHIPPED = first_folder(SHIPPED_CHOICES)
PROVENANCE = ("command", "hardware", "git_commit")  # card facts kept in model_index.json for later exports


def shipped_or(fallback: str | os.PathLike) -> Path:
    """The shipped weights' folder if this copy of the repo has one, else `fallback` (e.g. "runs")."""
    return SHIPPED if SHIPPED.is_dir() else Path(fallback)


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX).is_file()


# --- saving -----------------------------------------------------------------------------------

def save_pretrained(model, folder: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
                    card: Optional[dict] = None) -> Path:
    """Export a DALLE2 (stages loaded from checkpoints or from an export) to `folder`.

    dtype: None keeps the weights as they are (fp32); torch.float16 halves the files (upcast at load).
    card: facts for the model card that the run folder does not hold, all optional: "command" (how
    it was trained), "hardware", "notes", "git_commit" (default: this checkout's; command, hardware
    and commit default to those an earlier export of the same weights recorded), "run_dir" (where
    report/report.json and <stage>/metrics.jsonl are; default: the folder the decoder checkpoint was
    loaded from), "report" (a report.json to use instead, e.g. `python -m dalle2.evaluation.evaluate` run on the
    export itself, which measures exactly the files shipped). Returns the folder.
    An existing `folder` is replaced only if it is empty or an earlier export (has model_index.json)."""
    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    cast = [m for m in (model.prior.net, model.decoder.unet) if any(p.dtype != torch.float32 for p in m.parameters())]
    if cast:  # DALLE2.lean (the first generate on a GPU) rounded them in place: the original weights are gone
        raise CheckpointError("this model's networks were cast for sampling (DALLE2.lean, done by generate on a GPU), "
                              "which rounded their weights: save from a freshly loaded model")
    folder = Path(folder)
    stages = {s: getattr(model, s) for s in STAGES}
    for name, m in stages.items():
        if m.config is None:
            raise CheckpointError(f"the {name} has no .config: save_pretrained exports stages loaded with "
                                  f"from_checkpoint/from_run/from_pretrained (their config rebuilds the model)")
    tokenizer = model.clip.tokenizer
    for name in ("prior", "decoder"):
        other = getattr(stages[name], "tokenizer", None)
        if other is not None and other != tokenizer:
            raise CheckpointError(f"the {name} was saved with another tokenizer than the CLIP's; "
                                  "they do not fit together")
    card = {k: v for k, v in (card or {}).items() if v is not None}
    run_dir = Path(card["run_dir"]) if card.get("run_dir") else _source_run_dir(model.decoder)
    earlier = _earlier_index(model.decoder, run_dir)
    provenance = earlier.get("provenance") if isinstance(earlier.get("provenance"), dict) else {}
    card = {**{k: provenance[k] for k in PROVENANCE if isinstance(provenance.get(k), str)},
            **card}  # e.g. what the pipeline's own export recorded
    card.setdefault("git_commit", git_commit())

    index = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": None, "tokenizer": TOKENIZER,
             "provenance": {k: card.get(k) for k in PROVENANCE}, "stages": {}}
    blobs, dtypes = {}, set()
    for name, m in stages.items():
        tensors = _export_tensors(m.state_dict(), dtype, name)
        dtypes |= {str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()}
        # one metadata key: safetensors writes a map of several in a random order, and the file's sha256 (in the
        # index) would then differ between two exports of the same weights
        blob = _safetensors().save(tensors, metadata={"format": "pt"})
        if name == "clip":  # its own identity; the prior and decoder record the CLIP they were trained on
            clip_hash = m.checkpoint_hash or state_hash(m.state_dict())
        else:
            clip_hash = m.extra.get("clip_hash")
        index["stages"][name] = {
            "clip_hash": clip_hash, "step": int(m.step),
            "extra": {k: v for k, v in m.extra.items() if k != "clip_hash"},
            "parameters": sum(p.numel() for p in m.parameters()),
            "training_seconds": _training_seconds(m, name, run_dir, earlier),
            "weights": f"{name}/{WEIGHTS}", "sha256": hashlib.sha256(blob).hexdigest()}
        blobs[name] = blob
    index["dtype"] = "+".join(sorted(dtypes))

    def write(tmp: Path) -> None:
        for name, m in stages.items():
            atomic_write_text(tmp / name / CONFIG, _json(m.config.to_dict()))
            atomic_write(tmp / name / WEIGHTS, lambda f, b=blobs[name]: f.write(b))
        atomic_write_text(tmp / TOKENIZER, _json(tokenizer.state_dict()))
        atomic_write_text(tmp / CARD, model_card(model, index, run_dir, card, str(folder)))
        atomic_write_text(tmp / INDEX, _json(index))  # last: a folder without it never loads
    return _write_folder(folder, write)


def _export_tensors(state: dict, dtype, stage: str) -> dict:
    """Contiguous CPU copies (clone: safetensors refuses tensors that share memory); floating tensors
    cast to dtype, refusing any value that the smaller type cannot hold."""
    out = {}
    for key, t in state.items():
        key = key.replace("_orig_mod.", "")  # a torch.compile'd network's names -> the plain module's
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            cast = t.to(dtype)
            if torch.isfinite(t).all() and not torch.isfinite(cast).all():
                raise CheckpointError(f"{stage} tensor {key}: values beyond the range of {dtype}; "
                                      "export without --half")
            t = cast
        out[key] = t.contiguous().clone()
    return out


def _write_folder(folder: Path, write) -> Path:
    """`write(tmp)` fills a temporary sibling folder, which then replaces `folder`."""
    if folder.exists() and not (folder.is_dir() and (is_pretrained_folder(folder) or not any(folder.iterdir()))):
        raise CheckpointError(f"{folder}: exists and is not an exported model folder (no {INDEX}); "
                              f"choose a new folder, it is never overwritten")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _json(obj) -> str:
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError("exported weights need the safetensors package: pip install safetensors") from None
    return safetensors.torch


def _earlier_index(decoder, run_dir: Optional[Path]) -> dict:
    """model_index.json of an earlier export of the same weights, {} if none: the export they were loaded
    from, or the run's own OUT/pretrained/ (written on the training machine by the pipeline). Its
    provenance (command, hardware, commit) and training times carry over to a re-export."""
    path = decoder.checkpoint_path
    candidates = [Path(path).parent.parent / INDEX] if path is not None and Path(path).name == WEIGHTS else []
    candidates += [run_dir / "pretrained" / INDEX] if run_dir is not None else []
    for candidate in candidates:
        try:
            found = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(found, dict):
            return found
    return {}


def _training_seconds(stage, name: str, run_dir: Optional[Path], earlier: dict) -> Optional[float]:
    """A stage's training-loop seconds: from the run's metrics.jsonl, else what an earlier export of the
    same stage (same step) recorded, else None."""
    if run_dir is not None:
        seconds = training_seconds(run_dir / name / "metrics.jsonl", getattr(stage.config, name).train.batch_size)
        if seconds is not None:
            return round(seconds, 1)
    stages = earlier.get("stages")
    entry = stages.get(name) if isinstance(stages, dict) else None
    if isinstance(entry, dict) and entry.get("step") == int(stage.step) \
            and isinstance(entry.get("training_seconds"), (int, float)):
        return float(entry["training_seconds"])
    return None


def _source_run_dir(decoder) -> Optional[Path]:
    """The run folder the decoder came from (OUT of OUT/decoder.pt), None for an export."""
    path = decoder.checkpoint_path
    if path is None or Path(path).name == WEIGHTS:
        return None
    return Path(path).parent


# --- loading ----------------------------------------------------------------------------------

def load_pretrained(folder: str | os.PathLike | None = None) -> dict:
    """The stages exported to `folder` (default: the shipped weights, SHIPPED), as {"clip", "prior",
    "decoder"}; `DALLE2.from_pretrained` assembles them. Nothing is unpickled: JSON and safetensors
    only. Any missing, unreadable or inconsistent file is one CheckpointError naming it."""

    if folder is None:
        if not SHIPPED.is_dir():
            raise CheckpointError(f"no shipped weights are present "
                                  f"({SHIPPED} does not exist in this copy of the repo): "
                                  f"train your own with `python -m dalle2.pipeline --out runs` and load them with "
                                  f"DALLE2.from_pretrained('runs'), or pass the folder of an export")
        folder = SHIPPED
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    index = read_index(folder)
    try:
        tokenizer = Tokenizer.from_state_dict(_read_json(folder / TOKENIZER))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / TOKENIZER}: not a tokenizer ({e})") from None
    return {s: _load_stage(folder, s, index["stages"][s], tokenizer) for s in STAGES}


def read_index(folder: Path) -> dict:
    """model_index.json, checked: format, version and one complete entry per stage."""
    path = folder / INDEX
    index = _read_json(path)
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an Open DALL-E 2 model index (expected \"format\": \"{FORMAT_NAME}\")")
    version = index.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(f"{path}: format version {version!r}, this code reads version {FORMAT_VERSION}"
                              + (" (written by a newer version: update the code)" if newer else ""))
    stages = index.get("stages")
    types = {"clip_hash": (str, type(None)), "sha256": str, "step": int, "extra": dict}
    for s in STAGES:
        entry = stages.get(s) if isinstance(stages, dict) else None
        bad = [k for k, kind in types.items() if not isinstance(entry, dict) or not isinstance(entry.get(k, {}), kind)
               or (k != "extra" and k not in entry)]
        if bad:
            raise CheckpointError(f"{path}: the entry of stage '{s}' lacks a valid {', '.join(bad)}")
    return index


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (an incomplete export? export it again)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


def read_stage(folder: Path, stage: str, entry: dict) -> tuple[dict, dict]:
    """One exported stage's raw contents: (state dict as stored, config dict), the weights' sha256
    checked against the index `entry`. Shared by loading and by training's --init-from."""
    weights_path = folder / stage / WEIGHTS
    config = _read_json(folder / stage / CONFIG)
    try:
        blob = weights_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: missing (an incomplete export? export it again)") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != entry["sha256"]:
        raise CheckpointError(f"{weights_path}: its sha256 {digest[:16]}... differs from the one {INDEX} records "
                              f"({str(entry['sha256'])[:16]}...): the file was changed or is corrupted; "
                              "export it again")
    try:
        state = _safetensors().load(blob)
    except Exception as e:  # safetensors' own error type differs between versions
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({str(e)[:120]})") from None
    return state, config


def _load_stage(folder: Path, stage: str, entry: dict, tokenizer):
    """One stage: config.json -> model, model.safetensors (its sha256 checked against the index) ->
    weights, with its Provenance set as model_from_checkpoint sets it."""

    config_path, weights_path = folder / stage / CONFIG, folder / stage / WEIGHTS
    state, config = read_stage(folder, stage, entry)
    try:
        cfg = config_from_dict(config, str(config_path))
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path}: not a config this code reads ({e})") from None
    model = _build(stage, cfg, tokenizer)
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path}: its tensors do not match the model {config_path.name} describes"
                              + (f"; missing: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
                                 if missing else "")
                              + (f"; unexpected: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
                                 if unexpected else ""))
    for key, t in state.items():
        if t.shape != want[key].shape:
            raise CheckpointError(f"{weights_path}: tensor {key} has shape {tuple(t.shape)}, the model needs "
                                  f"{tuple(want[key].shape)}")
        state[key] = t.to(want[key].dtype)  # fp16 exports are upcast here, on the CPU
    model.load_state_dict(state)
    extra = dict(entry.get("extra") or {})
    if stage != "clip" and entry["clip_hash"] is not None:
        extra["clip_hash"] = entry["clip_hash"]
    # the CLIP's identity is the hash the prior and decoder recorded; theirs is of their own weights
    own_hash = entry["clip_hash"] if stage == "clip" else state_hash(state)
    model.set_provenance(cfg, tokenizer, entry["step"], extra, own_hash, weights_path)
    return model


def _build(stage: str, cfg, tokenizer):
    """The stage's model from its config, as each from_checkpoint builds it."""
    if stage == "clip":
        model = build_clip(cfg.clip.model, tokenizer.vocab_size, cfg.data.image_size)
        model.tokenizer = tokenizer
        return model
    if stage == "prior":
        return build_prior(cfg)
    return build_decoder(cfg, tokenizer.vocab_size)


# --- the model card ---------------------------------------------------------------------------

def training_seconds(metrics_path: Path, batch_size: int) -> Optional[float]:
    """Seconds a stage trained, from its metrics.jsonl: each log line covers the steps since the
    previous one at its images/s (the loop's wall time, resumed sessions included). None if absent."""
    try:
        lines = metrics_path.read_text().splitlines()
    except OSError:
        return None
    total, last_step = 0.0, 0
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "images_per_s" in rec and rec.get("images_per_s"):
            total += (rec["step"] - last_step) * batch_size / rec["images_per_s"]
            last_step = rec["step"]
    return total if last_step else None


def hardware(device=None) -> str:
    """A one-line description of this machine (its GPUs when `device` is CUDA), for model cards."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(device)} (CUDA), torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:  # Linux names the model
        name = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {os.cpu_count()} cores, {name}, torch {torch.__version__}"


def git_commit() -> Optional[str]:
    """The repo's commit (with '+ uncommitted changes' when dirty), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _limits(report: dict) -> list[str]:
    """What the measured figures say the model gets wrong most of the time."""
    faith = ((report.get("sets") or {}).get("test") or {}).get("faithfulness") or {}
    out = []
    for split, label in (("seen", "captions with colour-shape pairs seen in training"),
                         ("heldout", "zero-shot colour-shape pairs")):
        s = faith.get(split) or {}
        if not s.get("n"):
            continue
        weak = [f"{a} {s[a]:.2f}" for a in ("colour", "shape", "size", "position", "binding", "count", "exact")
                if isinstance(s.get(a), float) and s[a] < 0.5]
        if weak:
            out.append(f"- On {label} (n={s['n']}) it is right less than half the time on: {', '.join(weak)}.")
    return out


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "not recorded"
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200
            else f"{seconds / 3600:.1f} h")


def _measured_on_these(report: dict, index: dict) -> bool:
    """Whether the report evaluated an export whose three weight files have this index's sha256s (e.g.
    the export this one replaces, evaluated before it)."""
    try:
        evaluated = json.loads((Path(report["checkpoints"]) / INDEX).read_text())["stages"]
        return all(evaluated[s]["sha256"] == index["stages"][s]["sha256"] for s in STAGES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def model_card(model, index: dict, run_dir: Optional[Path], card: dict, name: str) -> str:
    """The README.md of an export, from the stages' configs, the run's metrics and evaluation report."""
    cfg = model.decoder.config
    d = cfg.data
    report_path = Path(card["report"]) if card.get("report") else \
        run_dir / "report" / "report.json" if run_dir is not None else None
    report = None
    if card.get("report"):  # asked for: it must be there
        if not report_path.is_file():
            raise CheckpointError(f"{report_path}: no such evaluation report")
        report = _read_json(report_path)
    elif report_path is not None and report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except (OSError, json.JSONDecodeError):
            report = None
    out = [f"# Open DALL-E 2: {cfg.preset} ({d.dataset}, {d.image_size}px)", "",
           f"Text-to-image weights of Open DALL-E 2 (unCLIP): CLIP, diffusion prior and decoder, "
           f"{index['dtype']} safetensors (upcast to fp32 at load).", "", "```python",
           "from dalle2 import DALLE2", "model = DALLE2.from_pretrained()  # the weights shipped in the repo"
           if Path(name).resolve() == SHIPPED.resolve() else f"model = DALLE2.from_pretrained(\"{name}\")",
           "images = model.generate([\"a large gold pentagon and a small blue circle\"], n_per_text=4, seed=0)",
           "```", "", f"or `python sample.py \"a red circle\" --checkpoints {name}`.", "", "## Data", ""]
    if d.dataset == "shapes":
        out.append(f"Synthetic shapes (`data/SHAPES_SPEC.md`), variant `{d.variant}`, generator seed {d.seed}: "
                   f"{d.n_train} training and {d.n_test} test images at {d.image_size}px in `{d.root}`, with exact "
                   f"captions; some colour-shape pairs are held out of training (the zero-shot figures below).")
    else:
        out.append(f"`{d.dataset}` at `{d.root}`, {d.image_size}px images.")
    out += ["", "## Recipe", "", f"Command: `{card.get('command') or 'not recorded (exported from a run folder)'}`. "
            f"Preset `{cfg.preset}`; every option is in each stage's `config.json`.", "",
            "| stage | parameters | steps | batch | images seen | lr | EMA | training time |",
            "|---|---|---|---|---|---|---|---|"]
    for s in STAGES:
        tc = getattr(getattr(model, s).config, s).train
        step = index["stages"][s]["step"]
        secs = index["stages"][s].get("training_seconds")
        out.append(f"| {s} | {index['stages'][s]['parameters'] / 1e6:.2f}M | {step} | {tc.batch_size} | "
                   f"{step * tc.batch_size:,} | {tc.lr:g} | {tc.ema_decay:g} | "
                   f"{_duration(secs)} |")
    out += ["", "Training time: the training loop's wall time from each stage's `metrics.jsonl` (data preparation "
            "and the CLIP embedding cache not included; kept in `model_index.json` across re-exports).", "",
            "## Provenance", "",
            f"- git commit: {card.get('git_commit') or 'unknown (not a git checkout)'}",
            f"- trained on: {card.get('hardware') or 'not recorded in the run folder'}",
            f"- exported: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            + (f" from `{run_dir}`" if run_dir is not None else ""),
            f"- CLIP {index['stages']['clip']['clip_hash']}; prior and decoder trained on CLIP "
            f"{index['stages']['prior']['clip_hash']} / {index['stages']['decoder']['clip_hash']}"]
    if card.get("notes"):
        out += ["", str(card["notes"])]
    out += ["", "## Measured", ""]
    if report is None:
        out += ["No evaluation report was found in the run folder: these weights have not been measured. "
                f"Measure them with `python -m dalle2.evaluation.evaluate --checkpoints {name}`."]
    else:
        try:
            body = markdown(report).splitlines()[1:]  # its title names the run folder
        except (KeyError, TypeError, AttributeError) as e:
            body = [f"(the report could not be read: {type(e).__name__} {e})"]
            report = None
        if report is not None and _measured_on_these(report, index):
            out += [f"Measured on these {index['dtype']} files (the evaluated folder holds weights with the same "
                    "sha256).", ""]
        elif not card.get("report") and index["dtype"] != "float32":
            out += [f"Measured on the run's float32 weights; these files are {index['dtype']}, so their figures may "
                    f"differ slightly (`python -m dalle2.evaluation.evaluate --checkpoints {name}` measures them "
                    "exactly).", ""]
        body = [line for line in body if "Pictures:" not in line]  # the pictures stay in the report folder
        out += [f"From `{report_path}` (`python -m dalle2.evaluation.evaluate`):"] + \
               [("#" + line) if line.startswith("#") else line for line in body]  # one level down
    out += ["", "## What this model cannot do", "",
            f"- It draws only {d.image_size}x{d.image_size} images of what its training data shows"
            + (": the shapes, colours, sizes and positions of the shapes vocabulary. Words outside that vocabulary "
               "are spelled as bytes and mean nothing to it." if d.dataset == "shapes" else ".")]
    if report is not None:
        out += _limits(report)
    if report is not None and report.get("reader_accuracy"):
        out += ["- The figures are the project's attribute reader's readings (its accuracy on real renders is "
                "the first table above), not human judgements."]
    return "\n".join(out) + "\n"


# --- starting training from earlier weights (--init-from) -----------------------------------------

def load_stage_weights(source: str | os.PathLike, stage: str) -> tuple[dict, Optional[dict], Optional[dict]]:
    """The weights (state dict), saved config dict and tokenizer state of `stage` from `source`: an
    exported folder (model_index.json), a training run folder (DIR/<stage>.pt) or a stage checkpoint
    file. Nothing is unpickled: exports are safetensors and JSON, .pt files load with weights_only=True."""
    src = Path(source)
    if is_pretrained_folder(src):
        state, config = read_stage(src, stage, read_index(src)["stages"][stage])
        return state, config, _read_json(src / TOKENIZER)
    path = src / f"{stage}.pt" if src.is_dir() else src
    if not path.is_file():
        raise CheckpointError(f"{source}: no {stage} weights there (neither an export with {INDEX} nor "
                              f"{src / (stage + '.pt')})")
    ckpt = load_checkpoint(path, stage)
    return ckpt["model"], ckpt.get("config"), ckpt.get("tokenizer")


def init_from(model, source: str | os.PathLike, stage: str, model_config: Optional[dict] = None,
              tokenizer=None, loaded: Optional[tuple] = None) -> None:
    """Start `model` from the weights of a finished or exported stage (`--init-from`), e.g. to add
    training time to a model with a fresh optimizer and schedule. Refuses weights whose saved
    `<stage>.model` config differs from `model_config` (a dict), naming both, and weights saved with
    another tokenizer than `tokenizer` (token ids would mean other words). `loaded`: what
    load_stage_weights(source, stage) returned, if the caller read it already."""
    state, config, tok_state = loaded or load_stage_weights(source, stage)
    if tokenizer is not None and tok_state is not None and tok_state != tokenizer.state_dict():
        raise CheckpointError(f"{source}: its {stage} was trained with another tokenizer (vocabulary) than "
                              f"this run's; train on the same data and CLIP, or start without --init-from")
    saved = (config or {}).get(stage, {}).get("model") if isinstance(config, dict) else None
    if model_config is not None and saved is not None and saved != model_config:
        diff = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
        raise CheckpointError(f"{source}: its {stage} was built with other {stage}.model settings "
                              f"({', '.join(f'{k}: {saved.get(k)} vs {model_config.get(k)}' for k in diff)})")
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}  # half-precision exports
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: the {stage} weights do not fit this model "
                              f"({str(e).splitlines()[0][:160]})") from None
