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
from types import MappingProxyType
from typing import Mapping, Optional

import torch

from dalle2.core.config import Config, ConfigError, config_from_dict
from dalle2.core.errors import Dalle2Error
from dalle2.core.files import atomic_write
from dalle2.core.tokenizer import Tokenizer

FORMAT = 1


class CheckpointError(Dalle2Error):
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
        raise CheckpointError(f"{path}: not a readable checkpoint "
                              f"(truncated or another format: {reason[:120]})") from None
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


class Provenance:
    """What a stage loaded from a checkpoint (`model_from_checkpoint`) or an export (dalle2/pretrained.py)
    knows of itself, declared on the model classes (CLIP, DiffusionPrior, Decoder derive from this) so
    that callers read attributes instead of probing for them. A model built in memory keeps these
    defaults: no config, tokenizer, hash or path, step 0, no extra facts."""
    config: Optional[Config] = None
    tokenizer: Optional[Tokenizer] = None
    step: int = 0
    extra: Mapping = MappingProxyType({})  # {"clip_hash": the CLIP a prior or decoder was trained on, ...}
    checkpoint_hash: Optional[str] = None  # of its weights: what later stages record to detect a mismatched CLIP
    checkpoint_path: Optional[str] = None

    def set_provenance(self, config: Config, tokenizer: Optional[Tokenizer], step: int, extra: Optional[dict],
                       checkpoint_hash: str, checkpoint_path: str | os.PathLike) -> None:
        self.config, self.tokenizer, self.step, self.extra = config, tokenizer, int(step), dict(extra or {})
        self.checkpoint_hash, self.checkpoint_path = checkpoint_hash, str(checkpoint_path)


def model_from_checkpoint(path: str | os.PathLike, stage: str, build, map_location="cpu"):
    """Rebuild a stage's model from its checkpoint alone: `build(config, tokenizer) -> nn.Module`,
    then load the weights and set its `Provenance` (the model class derives from it)."""

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
    model.set_provenance(cfg, tokenizer, ckpt.get("step", 0), ckpt.get("extra"), state_hash(ckpt["model"]), path)
    return model
