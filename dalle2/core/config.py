"""One typed, validated config for every stage, loaded from `model_config.yml`.

The YAML file holds the full default config (the `shapes32` preset) at its top level and, under
`presets:`, named deltas (`tiny`, `cifar10`, ...). Loading = defaults <- preset <- `--set` overrides, then
every value is checked against the dataclasses below: an unknown key, a wrong type or an out-of-range
value raises ConfigError naming the key and the file before any work starts. YAML reads `1e-4` as a
string, so numbers are coerced to the declared type.

Field names equal constructor argument names, so building a model is `Model(**asdict(cfg.clip.model))`.
One set of defaults: the dataclasses' defaults are the file's top level, and a model constructor's
defaults are these fields (tests/test_config.py checks both), so a config file that leaves a key out,
or a model built in a notebook without a config, gets the recipe's value.
Paths of artifacts (checkpoints, run folders) never live here: they are command-line arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dalle2.core.errors import Dalle2Error
from dalle2.core.files import atomic_write_text

# Shipped inside the package (package data), so an editable and a normal install find it the same
# way: next to this file, never from the working directory.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "model_config.yml"
DEFAULT_PRESET = "shapes32"


class ConfigError(Dalle2Error, ValueError):
    """A problem with the config; the message names the file and the key."""


def _opt(default, doc: str = "", choices=None, min=None, max=None):
    return field(default=default, metadata={"doc": doc, "choices": choices, "min": min, "max": max})


def _list(default, doc: str = "", min=None):
    return field(default_factory=lambda: list(default), metadata={"doc": doc, "min": min})


@dataclass
class DataConfig:
    dataset: str = _opt("shapes", "which data: shapes | cifar10 | folder", choices=("shapes", "cifar10", "folder"))
    root: str = _opt("data/shapes_both", "dataset folder (relative to the working directory); shapes are "
                     "generated there if missing")
    variant: str = _opt("both", "shapes variant: objects (1-2 objects), positions (1 object and where it "
                        "is) or both (the two kinds in turn in one dataset; give it its own root)",
                        choices=("objects", "positions", "both"))
    n_train: int = _opt(40000, "shapes: training images to generate", min=1)
    n_test: int = _opt(4000, "shapes: test images to generate", min=1)
    seed: int = _opt(0, "shapes: generator seed", min=0)
    image_size: int = _opt(32, "side of the images the models see", choices=(16, 32, 64))
    flip: bool = _opt(True, "random horizontal flips (captions' left/right are swapped to stay true)")
    captions_file: str = _opt("captions.jsonl", "folder dataset: captions file (CSV or JSONL) inside root; when "
                              "missing, a Hugging Face metadata.jsonl or caption .txt files beside the images")
    download: bool = _opt(False, "cifar10: download through torchvision if missing")


@dataclass
class TrainConfig:
    steps: int = _opt(10000, "optimizer steps (with budget_minutes: at most this many)", min=1)
    budget_minutes: float = _opt(0.0, "0 = train for `steps`; > 0 = size the run to this many minutes of training: "
                                 "throughput is measured over the first steps (again at the end of warm-up) and "
                                 "the step count fixed so that warm-up and the whole cosine decay fit", min=0.0)
    batch_size: int = _opt(512, "global batch size (split across DDP ranks)", min=1)
    grad_accum: int = _opt(1, "micro-batches per optimizer step (gradients summed): a small GPU keeps the global "
                           "batch_size", min=1)
    lr: float = _opt(5e-4, "peak learning rate (AdamW)", min=0.0)
    min_lr_ratio: float = _opt(0.1, "cosine decay ends at lr * min_lr_ratio", min=0.0, max=1.0)
    warmup_steps: int = _opt(500, "linear warm-up steps", min=0)
    weight_decay: float = _opt(0.05, "AdamW weight decay (not applied to norms, biases, embeddings)", min=0.0)
    beta1: float = _opt(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = _opt(0.999, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = _opt(1.0, "max gradient norm (0 = off)", min=0.0)
    ema_decay: float = _opt(0.0, "EMA of weights (0 = off); the EMA weights are what sampling uses", min=0.0, max=1.0)
    precision: str = _opt("bf16", "autocast on CUDA: bf16, fp16 (with a gradient scaler; used by itself when the GPU "
                          "has no bf16) or fp32; always fp32 off CUDA", choices=("bf16", "fp16", "fp32"))
    compile: bool = _opt(True, "torch.compile the training step (CUDA only; ignored on the CPU)")
    log_every: int = _opt(50, "steps between metrics.jsonl lines", min=1)
    eval_every: int = _opt(0, "steps between evaluations (0 = only at the end)", min=0)
    save_every: int = _opt(1000, "steps between resume checkpoints", min=1)
    sample_every: int = _opt(0, "decoder: steps between sample grids (0 = only at the end)", min=0)
    seed: int = _opt(0, "seed of data order, augmentation and noise", min=0)


@dataclass
class ClipModelConfig:
    embed_dim: int = _opt(256, "joint embedding size", min=1)
    vision_width: int = _opt(256, "ViT width", min=1)
    vision_layers: int = _opt(6, "ViT layers", min=1)
    vision_heads: int = _opt(4, "ViT heads", min=1)
    patch_size: int = _opt(4, "ViT patch size", min=1)
    text_width: int = _opt(256, "text transformer width", min=1)
    text_layers: int = _opt(4, "text transformer layers", min=1)
    text_heads: int = _opt(4, "text transformer heads", min=1)
    context_length: int = _opt(16, "tokens per caption (BOS and EOS included); longer captions are truncated with "
                               "a warning", min=3)
    dropout: float = _opt(0.0, "dropout in both encoders", min=0.0, max=1.0)


@dataclass
class ClipConfig:
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2500, batch_size=1024, lr=8e-4, min_lr_ratio=0.05, warmup_steps=150, weight_decay=0.1, beta2=0.98))


@dataclass
class DiffusionConfig:
    timesteps: int = _opt(1000, "diffusion steps T", min=1)
    schedule: str = _opt("cosine", "noise schedule", choices=("cosine", "linear"))
    objective: str = _opt("eps", "what the network predicts", choices=("eps", "x0", "v"))
    loss_weighting: str = _opt("plain", "loss weight over timesteps", choices=("plain", "min_snr"))
    min_snr_gamma: float = _opt(5.0, "gamma of min-SNR weighting", min=0.0)


@dataclass
class PriorModelConfig:
    width: int = _opt(384, "transformer width", min=1)
    layers: int = _opt(4, "transformer layers", min=1)
    heads: int = _opt(6, "attention heads", min=1)
    dropout: float = _opt(0.0, "dropout", min=0.0, max=1.0)
    cond_drop_prob: float = _opt(0.1, "text conditioning dropped this often in training (for prior guidance)",
                                 min=0.0, max=1.0)


@dataclass
class PriorConfig:
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(objective="x0"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, batch_size=1024, lr=5e-4, warmup_steps=200, ema_decay=0.999))


@dataclass
class DecoderModelConfig:
    channels: int = _opt(64, "UNet base channels", min=1)
    patch_size: int = _opt(1, "pixels per side folded into channels before the UNet (pixel unshuffle; 2: the "
                           "UNet runs at half the image side on 12 channels, about 3x cheaper)", min=1)
    channel_mult: list[int] = _list([1, 2, 2], "channel multiplier per resolution", min=1)
    num_res_blocks: int = _opt(2, "residual blocks per resolution", min=1)
    attention_resolutions: list[int] = _list([16, 8], "feature-map sides with attention over image + context", min=1)
    head_channels: int = _opt(64, "channels per attention head", min=1)
    dropout: float = _opt(0.0, "dropout in residual blocks", min=0.0, max=1.0)
    text_encoder: str = _opt("clip", "caption features: 'own' (the decoder's causal transformer on the tokens) or "
                             "'clip' (CLIP's per-token encodings, cached in training, projected to text_width)",
                             choices=("own", "clip"))
    text_width: int = _opt(256, "width of the caption context (own: the decoder's text transformer)", min=1)
    text_layers: int = _opt(4, "decoder text transformer layers (text_encoder 'own')", min=1)
    text_heads: int = _opt(4, "decoder text transformer heads (text_encoder 'own')", min=1)
    clip_tokens: int = _opt(4, "context tokens projected from the CLIP image embedding", min=1)
    clip_drop_prob: float = _opt(0.1, "CLIP embedding dropped this often in training", min=0.0, max=1.0)
    text_drop_prob: float = _opt(0.5, "caption dropped this often in training (independently)", min=0.0, max=1.0)


@dataclass
class DecoderConfig:
    model: DecoderModelConfig = field(default_factory=DecoderModelConfig)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(objective="v", loss_weighting="min_snr"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=8000, batch_size=512, lr=3e-4, warmup_steps=500, weight_decay=0.0, ema_decay=0.999, save_every=2000))


@dataclass
class SamplingConfig:
    guidance_scale: float = _opt(3.0, "decoder classifier-free guidance scale (1 = none)", min=0.0)
    prior_guidance_scale: float = _opt(1.0, "prior classifier-free guidance scale (1 = none)", min=0.0)
    steps: int = _opt(50, "decoder sampling steps", min=1)
    prior_steps: int = _opt(64, "prior sampling steps", min=1)
    sampler: str = _opt("ddim", "sampler of the prior and the decoder: ddim, ddpm or dpmpp2m (DPM-Solver++(2M), "
                        "second order, deterministic)", choices=("ddim", "ddpm", "dpmpp2m"))
    eta: float = _opt(0.0, "DDIM eta (0 = deterministic)", min=0.0)
    candidates: int = _opt(2, "prior samples per caption; the one closest to the caption is kept", min=1)
    clip_x0: str = _opt("static", "clipping of the decoder's predicted x0", choices=("static", "dynamic", "none"))
    batch_size: int = _opt(256, "images per sampling batch", min=1)
    guidance_interval: list[float] = _list([0.0, 1.0], "decoder guidance only at steps with t/(T-1) in [lo, hi] "
                                           "(Kynkaanniemi et al. 2024); outside it only the conditional half runs",
                                           min=0.0)
    prior_guidance_interval: list[float] = _list([0.0, 1.0], "the same for the prior's guidance", min=0.0)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    preset: str = _opt(DEFAULT_PRESET, "the preset this config was built from")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- validation -------------------------------------------------------------------------------

def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """Coerce one YAML value to the declared type, or raise ConfigError naming the key."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")

    origin = typing.get_origin(typ)
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {item.__name__}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad("true or false")
    if typ is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise bad("an integer") from None
            if f.is_integer():
                return int(f)
        raise bad("an integer")
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        f = None
        if isinstance(value, (int, float)):
            f = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                f = float(value)
            except ValueError:
                pass
        if f is not None and not math.isfinite(f):
            raise bad("a finite number")  # nan and inf pass every min/max comparison
        if f is not None:
            return f
        raise bad("a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    raise TypeError(f"unsupported config type {typ} for {key}")


def _check_range(value: Any, meta: dict, key: str, source: str) -> None:
    items = value if isinstance(value, list) else [value]
    for v in items:
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise ConfigError(f"{source}: {key}: {v!r} is not one of {', '.join(map(str, meta['choices']))}")
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{source}: {key}: {v!r} is below the minimum {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{source}: {key}: {v!r} is above the maximum {meta['max']}")


def _build(cls: type, data: dict, prefix: str, source: str):
    """A dataclass instance from a (partial) dict; missing keys keep their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    default = cls()
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{full}' (known: {', '.join(fields)})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            # merge into the field's own default (e.g. the prior's diffusion defaults to x0)
            base = asdict(getattr(default, key))
            kwargs[key] = _build(typ, _merge(base, value if isinstance(value, dict) else {"": value}, full, source),
                                 full + ".", source)
        else:
            v = _coerce(value, typ, full, source)
            _check_range(v, fields[key].metadata, full, source)
            kwargs[key] = v
    return cls(**kwargs)


def _merge(base: dict, delta: dict, prefix: str, source: str) -> dict:
    """Recursive dict merge (delta wins); a mapping may only replace a mapping."""
    out = dict(base)
    for k, v in delta.items():
        if k == "":
            raise ConfigError(f"{source}: {prefix}: expected a mapping, got {v!r}")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{prefix}.{k}" if prefix else k, source)
        else:
            out[k] = v
    return out


def _resolve_key(key: str, cfg_dict: dict, source: str) -> list[str]:
    """'clip.train.lr' as is; the shorthand 'clip.lr' resolves when exactly one sub-section of
    'clip' has an 'lr' field."""
    parts = key.split(".")
    node = cfg_dict
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        if isinstance(node, dict) and i == len(parts) - 1:
            hits = [k for k, sub in node.items() if isinstance(sub, dict) and part in sub]
            if len(hits) == 1:
                return parts[:i] + [hits[0], part]
            if len(hits) > 1:
                raise ConfigError(f"{source}: '{key}' is ambiguous: use one of "
                                  + ", ".join(".".join(parts[:i] + [h, part]) for h in hits))
        raise ConfigError(f"{source}: unknown key '{key}'")
    return parts


def parse_override(text: str) -> tuple[str, Any]:
    """'clip.train.lr=3e-4' -> ('clip.train.lr', '3e-4' parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. clip.train.lr=3e-4")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                          f"quote it, e.g. --set '{key.strip()}=\"...\"'") from None


def load_config(path: str | os.PathLike | None = None, preset: Optional[str] = None,
                overrides: Optional[list[str]] = None) -> Config:
    """defaults (top level of the file) <- preset <- overrides, validated."""
    path = Path(path) if path else DEFAULT_CONFIG
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a folder, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not a text (UTF-8) file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    presets = raw.pop("presets", {}) or {}
    preset = preset or raw.pop("preset", None) or DEFAULT_PRESET
    raw.pop("preset", None)
    if preset not in presets and preset != DEFAULT_PRESET:
        raise ConfigError(f"{source}: unknown preset '{preset}' (known: {', '.join(presets) or DEFAULT_PRESET})")
    merged = _merge(raw, presets.get(preset) or {}, "", f"{source} (preset {preset})")
    merged["preset"] = preset
    cfg = apply_overrides(_build(Config, merged, "", source), overrides, source)
    return check_consistency(cfg, source if not overrides else f"{source} with --set")


def apply_overrides(cfg: Config, overrides: Optional[list[str]], source: str = "config") -> Config:
    """A copy of `cfg` with `--set KEY=VALUE` overrides applied and validated."""
    if not overrides:
        return cfg
    merged = cfg.to_dict()
    for item in overrides:
        key, value = parse_override(item)
        parts = _resolve_key(key, merged, "--set")
        delta: Any = value
        for part in reversed(parts):
            delta = {part: delta}
        merged = _merge(merged, delta, "", "--set")
    return _build(Config, merged, "", f"{source} with --set")


def check_consistency(cfg: Config, source: str) -> Config:
    """Cross-field checks (sizes that must divide, resolutions that must exist), so a bad
    combination fails at load time with the key named, not deep inside a model constructor."""
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"{source}: {key}: {msg}")
    size, c, d, p = cfg.data.image_size, cfg.clip.model, cfg.decoder.model, cfg.prior.model
    need(size % c.patch_size == 0, "clip.model.patch_size", f"{c.patch_size} does not divide data.image_size {size}")
    need(c.vision_width % c.vision_heads == 0, "clip.model.vision_heads",
         f"{c.vision_heads} does not divide vision_width {c.vision_width}")
    need(c.text_width % c.text_heads == 0, "clip.model.text_heads",
         f"{c.text_heads} does not divide text_width {c.text_width}")
    need(p.width % p.heads == 0, "prior.model.heads", f"{p.heads} does not divide width {p.width}")
    for stage in ("clip", "prior", "decoder"):
        tc = getattr(cfg, stage).train
        need(tc.grad_accum <= tc.batch_size, f"{stage}.train.grad_accum",
             f"{tc.grad_accum} micro-batches cannot split a batch_size of {tc.batch_size}")
    for key in ("guidance_interval", "prior_guidance_interval"):
        lo_hi = getattr(cfg.sampling, key)
        need(len(lo_hi) == 2 and lo_hi[0] <= lo_hi[1] <= 1.0, f"sampling.{key}",
             f"expected [lo, hi] with 0 <= lo <= hi <= 1, got {lo_hi}")
    for key, msg in unet_shape_problems(size, d.channels, d.channel_mult, d.attention_resolutions,
                                        d.head_channels, d.text_width, d.text_heads, d.patch_size):
        need(False, f"decoder.model.{key}", msg)
    return cfg


def unet_shape_problems(image_size: int, channels: int, channel_mult: list[int], attention_resolutions: list[int],
                        head_channels: int, text_width: int, text_heads: int,
                        patch_size: int = 1) -> list[tuple[str, str]]:
    """(field of decoder.model, message) for each way these decoder sizes do not fit together; [] when
    they fit. The config checks them at load time, the UNet (which can be built without a config) when
    it is built: one rule, one wording."""
    if not channel_mult:
        return [("channel_mult", "needs at least one resolution")]
    if image_size % patch_size:
        return [("patch_size", f"{patch_size} does not divide data.image_size {image_size}")]
    problems = []
    levels, grid = len(channel_mult), image_size // patch_size
    if grid % 2 ** (levels - 1):
        problems.append(("channel_mult", f"{levels} resolutions need data.image_size / patch_size ({grid}) "
                                         f"divisible by {2 ** (levels - 1)}" if patch_size > 1 else
                         f"{levels} resolutions need data.image_size divisible by {2 ** (levels - 1)}"))
    sides = [grid // 2 ** i for i in range(levels)]
    patched = f" with patch_size {patch_size}" if patch_size > 1 else ""
    for r in attention_resolutions:
        if r not in sides:
            problems.append(("attention_resolutions", f"{r} is never reached: the UNet's feature maps are "
                                                      f"{sides} for {image_size}px images{patched}"))
    for i, m in enumerate(channel_mult):
        if (sides[i] in attention_resolutions or i == levels - 1) and channels * m % head_channels:
            # the middle block (at the last level) always attends
            problems.append(("head_channels", f"{head_channels} does not divide the attention width {channels * m}"))
    if text_width % text_heads:
        problems.append(("text_heads", f"{text_heads} does not divide text_width {text_width}"))
    return problems


def check_fields(cls: type, values: dict, prefix: str, source: str) -> None:
    """Check `values`, a model constructor's arguments named like the fields of config dataclass `cls`,
    against the types and ranges declared there: a model built without a config file gets the same
    checks and messages as a config file (ConfigError is a ValueError)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        _check_range(_coerce(value, hints[key], prefix + key, source), fields[key].metadata, prefix + key, source)


def field_default(cls: type, name: str) -> Any:
    """The default of field `name` of config dataclass `cls`, list fields (built by a factory) included:
    what model constructors take as their own defaults, so that the two cannot disagree."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def config_from_dict(data: dict, source: str) -> Config:
    """A Config from a dict saved in a checkpoint; keys unknown to this version are an error."""
    return _build(Config, data, "", source)


# Where the data lives, as opposed to what it is (image size, variant): these come from the user's own
# config (--config / --preset / --set), never from a checkpoint, which is a downloaded file like any other.
DATA_LOCATION_KEYS = ("dataset", "root", "captions_file", "download")


def data_config_for_checkpoint(saved: Config, args: Optional[argparse.Namespace] = None) -> DataConfig:
    """The data to evaluate a checkpoint on: its saved data config (with --set applied) for what the
    data is, and the user's config for where it is: DATA_LOCATION_KEYS from --config (default:
    model_config.yml) at --preset (default: the checkpoint's preset name when that file has it,
    else the default preset) with --set. A checkpoint naming another dataset or folder is ignored."""
    path, preset = getattr(args, "config", None), getattr(args, "preset", None)
    overrides = list(getattr(args, "overrides", None) or [])
    if preset is None:
        try:
            raw = yaml.safe_load(Path(path or DEFAULT_CONFIG).read_text(encoding="utf-8")) or {}
            known = set((raw.get("presets") or {}) if isinstance(raw, dict) else {})
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            known = set()  # load_config below names the problem
        preset = saved.preset if saved.preset in known else None
    user = load_config(path, preset, overrides).data
    saved_data = apply_overrides(saved, overrides, "checkpoint config").data
    return dataclasses.replace(saved_data, **{k: getattr(user, k) for k in DATA_LOCATION_KEYS})


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config, --preset and --set on every entry point."""
    g = parser.add_argument_group("config")
    g.add_argument("--config", default=None,
                   help=f"config file (default: dalle2/{DEFAULT_CONFIG.name}, shipped with the package)")
    g.add_argument("--preset", default=None, help="named preset: tiny, shapes32 (default), cifar10, ...")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value, e.g. --set clip.train.lr=3e-4 (repeatable; 'clip.lr' works when unique)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.preset, args.overrides)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (temporary file, then rename)."""
    atomic_write_text(path, cfg.to_yaml())


def describe_options(cfg: Optional[Config] = None) -> str:
    """A Markdown table of every option with its value in `cfg` (default: the shapes32 preset of
    model_config.yml, what runs when nothing is chosen) and its doc. The README's table is this."""
    cfg = cfg if cfg is not None else load_config()
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif f.metadata.get("doc"):
                rows.append(f"| `{prefix}{f.name}` | `{value}` | {f.metadata['doc']} |")
    walk(cfg, "")
    return "\n".join(rows)
