"""Checkpoint files: one format for every stage, written atomically, read with weights_only=True.

A checkpoint is a dict of plain types and tensors:
    stage       "clip" | "prior" | "decoder"
    format      format version of this dict
    step        optimizer steps taken
    config      the resolved Config as a dict (the model is rebuilt from it, never from tensor shapes)
    tokenizer   Tokenizer.state_dict() (a model travels with its tokenizer)
    model       the weights to use (EMA weights in final checkpoints when EMA is on)
    extra       stage-specific plain data (e.g. the hash of the CLIP the prior was trained on)
Resume checkpoints add: ema, optimizer, rng, raw_model (the non-EMA weights).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Optional

import torch

from .files import atomic_write

FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or of the wrong kind; the message names the file."""


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary name in the same folder, then rename: a crash never leaves a
    half-written checkpoint under the real name."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, stage: Optional[str] = None, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True (a checkpoint can never run code) and check its stage."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or another format: {reason[:120]})") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an Open DALL-E 2 checkpoint (no 'stage'/'model' entries)")
    if ckpt.get("format", 0) > FORMAT:
        raise CheckpointError(f"{path}: written by a newer version (format {ckpt['format']} > {FORMAT})")
    if stage is not None and ckpt["stage"] != stage:
        raise CheckpointError(f"{path}: is a '{ckpt['stage']}' checkpoint, expected a '{stage}' checkpoint")
    return ckpt


def state_hash(state_dict: dict, length: int = 16) -> str:
    """Short sha256 of a state dict's tensors (name, shape, dtype and bytes), independent of the file."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]


def model_from_checkpoint(path: str | os.PathLike, stage: str, build, map_location="cpu"):
    """Rebuild a stage's model from its checkpoint alone: `build(config, tokenizer) -> nn.Module`,
    then load the weights. The model gets `.config`, `.tokenizer`, `.step`, `.extra`,
    `.checkpoint_hash` (of its weights: what later stages record to detect a mismatched CLIP) and
    `.checkpoint_path` attributes."""
    from .config import ConfigError, config_from_dict
    from .tokenizer import Tokenizer

    ckpt = load_checkpoint(path, stage, map_location)
    try:
        cfg = config_from_dict(ckpt["config"], str(path))
        tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
    except (ConfigError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: its saved config or tokenizer cannot be read ({e})") from None
    model = build(cfg, tokenizer)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model its config describes "
                              f"({str(e).splitlines()[0][:160]})") from None
    model.config, model.tokenizer, model.step = cfg, tokenizer, int(ckpt.get("step", 0))
    model.extra = dict(ckpt.get("extra") or {})
    model.checkpoint_hash = state_hash(ckpt["model"])
    model.checkpoint_path = str(path)
    return model


def load_stage_weights(source: str | os.PathLike, stage: str) -> tuple[dict, Optional[dict], Optional[dict]]:
    """The weights (state dict), saved config dict and tokenizer state of `stage` from `source`: a training run folder
    (DIR/<stage>.pt), a stage checkpoint file, or an exported folder (DIR/<stage>/model.safetensors and
    config.json, or DIR itself holding them). Nothing is unpickled: .pt files load with weights_only=True."""
    import json
    src = Path(source)
    for folder in (src / stage, src):
        weights = folder / "model.safetensors"
        if weights.is_file():
            from safetensors.torch import load_file
            try:
                state = load_file(str(weights))
            except Exception as e:  # safetensors raises its own error types for a damaged file
                raise CheckpointError(f"{weights}: not a readable safetensors file ({str(e)[:120]})") from None
            found = {}
            for name, candidates in (("config", [folder / "config.json"]),
                                     ("tokenizer", [folder / "tokenizer.json", folder.parent / "tokenizer.json"])):
                path = next((c for c in candidates if c.is_file()), None)
                try:
                    found[name] = json.loads(path.read_text()) if path is not None else None
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{path}: not readable JSON ({e})") from None
            return state, found["config"], found["tokenizer"]
    path = src / f"{stage}.pt" if src.is_dir() else src
    if not path.is_file():
        raise CheckpointError(f"{source}: no {stage} weights there (looked for {src / stage / 'model.safetensors'}, "
                              f"{src / 'model.safetensors'} and {src / (stage + '.pt')})")
    ckpt = load_checkpoint(path, stage)
    return ckpt["model"], ckpt.get("config"), ckpt.get("tokenizer")


def init_from(model, source: str | os.PathLike, stage: str, model_config: Optional[dict] = None,
              tokenizer=None) -> None:
    """Start `model` from the weights of a finished or exported stage (`--init-from`), e.g. to add
    training time to a model with a fresh optimizer and schedule. Refuses weights whose saved
    `<stage>.model` config differs from `model_config` (a dict), naming both, and weights saved with
    another tokenizer than `tokenizer` (token ids would mean other words)."""
    state, config, tok_state = load_stage_weights(source, stage)
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
