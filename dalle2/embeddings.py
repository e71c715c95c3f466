"""The CLIP embedding cache shared by the prior and the decoder.

The frozen CLIP is run once per dataset split, in large batches, over every image in both views
(plain and horizontally flipped: the original implementation cached one random flip, so half the
time the cached embedding disagreed with the flipped image the decoder saw) and over every unique
caption (pooled embedding and per-token encodings). The result is stored next to the run as
`OUT/cache/<split>-<clip hash>.pt` together with a key of the data it was computed from; a cache
whose CLIP or data differ is rebuilt, never silently used.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from clip.model import CLIP
from dalle2.core.checkpoint import CheckpointError, atomic_torch_save
from dalle2.core.cli import load_and_print_config
from dalle2.core.config import Config
from dalle2.core.runtime import DistInfo, rank0_first, setup_distributed
from dalle2.core.training import Trainer, TrainingError, init_seed
from dalle2.pretrained import init_from
from data.captioned import CaptionedImages, StepBatches, to_float
from data.datasets import load_data


def data_key(ds: CaptionedImages) -> str:
    """A fingerprint of a split: its images, caption table and flip map."""
    h = hashlib.sha256()
    h.update(ds.images.cpu().contiguous().numpy().tobytes())
    h.update("\n".join(ds.captions).encode())
    h.update(ds.flip_ids.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Embeddings:
    """CLIP features of one split. image_emb: (N, 2, E) [plain, flipped], unit norm; text_emb: (U, E)
    unit norm; text_enc: (U, L, W) per-token encodings; text_mask: (U, L) bool; tokens: (U, L)."""
    image_emb: torch.Tensor
    text_emb: torch.Tensor
    text_enc: torch.Tensor
    text_mask: torch.Tensor
    tokens: torch.Tensor
    clip_hash: str
    data_key: str

    def to(self, device) -> "Embeddings":
        return Embeddings(*(getattr(self, f).to(device)
                            for f in ("image_emb", "text_emb", "text_enc", "text_mask", "tokens")),
                          self.clip_hash, self.data_key)

    def text(self, caption_ids: torch.Tensor) -> dict:
        """The prior's text conditioning for captions (B,): text_emb, text_enc (as float), text_mask."""
        return {"text_emb": self.text_emb[caption_ids].float(), "text_enc": self.text_enc[caption_ids].float(),
                "text_mask": self.text_mask[caption_ids]}

    def image(self, idx: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (B, E) of images idx in the view they were sampled in."""
        return self.image_emb[idx, flipped.long()].float()


@torch.no_grad()
def compute_embeddings(clip, ds: CaptionedImages, clip_hash: str, key: str, batch_size: int = 1024,
                       progress: bool = True) -> Embeddings:
    """CLIP features of every image (plain and flipped) and caption of `ds`; key = data_key(ds)."""
    clip.eval()
    dev = clip.device
    image_emb = torch.empty(len(ds), 2, clip.embed_dim, dtype=torch.float16)
    bar = tqdm(total=len(ds) + len(ds.captions), desc=f"CLIP embeddings {ds.name}", disable=not progress, unit="item")
    for i in range(0, len(ds), batch_size):
        x = to_float(ds.images[i:i + batch_size].to(dev))
        image_emb[i:i + batch_size, 0] = clip.encode_image(x).float().cpu().half()
        image_emb[i:i + batch_size, 1] = clip.encode_image(x.flip(-1)).float().cpu().half()
        bar.update(len(x))
    tokens = clip.tokenizer(ds.captions)
    embs, encs, masks = [], [], []
    for i in range(0, len(tokens), batch_size):
        emb, enc, mask = clip.encode_text_tokens(tokens[i:i + batch_size].to(dev))
        embs.append(emb.float().cpu())
        encs.append(enc.float().cpu().half())
        masks.append(mask.cpu())
        bar.update(len(emb))
    bar.close()
    return Embeddings(image_emb, torch.cat(embs).half(), torch.cat(encs), torch.cat(masks), tokens,
                      clip_hash, key)


def load_or_compute(clip, clip_hash: str, ds: CaptionedImages, cache_dir: str | Path, split: str,
                    progress: bool = True, log=print) -> Embeddings:
    """The cached embeddings of `ds` for this CLIP, computing (and saving) them when missing or stale."""
    path = Path(cache_dir) / f"{split}-{clip_hash}.pt"
    key = data_key(ds)
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("clip_hash") == clip_hash and blob.get("data_key") == key:
                return Embeddings(**{k: blob[k] for k in ("image_emb", "text_emb", "text_enc", "text_mask", "tokens")},
                                  clip_hash=clip_hash, data_key=key)
            log(f"embedding cache {path} was built from other data: rebuilding it")
        except Exception as e:  # a truncated or foreign file is rebuilt, never trusted
            log(f"embedding cache {path} is unreadable ({type(e).__name__}): rebuilding it")
    emb = compute_embeddings(clip, ds, clip_hash, key, progress=progress)  # the data is hashed once
    atomic_torch_save({k: getattr(emb, k) for k in ("image_emb", "text_emb", "text_enc", "text_mask", "tokens",
                                                     "clip_hash", "data_key")}, path)
    return emb


def load_clip_for_stage(clip_path: str | Path, device):
    """The frozen CLIP a later stage is built on, and its hash (the key of caches and checkpoints)."""
    clip_path = Path(clip_path)
    if not clip_path.exists():
        raise CheckpointError(f"{clip_path}: no CLIP checkpoint here; train one first with "
                              f"`python clip/train.py --out {clip_path.parent}` or pass --clip PATH")
    clip = CLIP.from_checkpoint(clip_path).to(device).eval().requires_grad_(False)
    return clip, clip.checkpoint_hash


def check_same_clip(model, clip) -> None:
    """A prior or decoder must run with the CLIP it was trained on (its hash is in model.extra).
    Models built in memory, with no recorded hash on either side, are not checked."""
    want, have = model.extra.get("clip_hash"), clip.checkpoint_hash
    if want is not None and have is not None and want != have:
        raise CheckpointError(f"{model.checkpoint_path or 'this model'}: was trained on CLIP {want}, but "
                              f"{clip.checkpoint_path or 'the CLIP given'} is CLIP {have}; "
                              f"use the clip.pt it was trained with")


@dataclass
class StageInputs:
    """What the prior and the decoder train from: the process group, the config (recording the CLIP
    used), the frozen CLIP and its hash, both splits and their CLIP embeddings."""
    dist: DistInfo
    cfg: Config
    clip: CLIP
    clip_hash: str
    train: CaptionedImages
    test: CaptionedImages
    emb_train: Embeddings
    emb_test: Embeddings


def prepare_stage(args) -> StageInputs:
    """What the prior and decoder training scripts share: the process group, the config, the frozen
    CLIP (OUT/clip.pt unless --clip), the data and the embedding caches of both splits."""
    dist = setup_distributed(args.device)
    cfg = load_and_print_config(args, dist.is_main)
    clip_path = Path(args.clip) if args.clip else Path(args.out) / "clip.pt"
    clip, clip_hash = load_clip_for_stage(clip_path, dist.device)
    if clip.config.data.image_size != cfg.data.image_size:
        raise TrainingError(f"{clip_path}: CLIP was trained on {clip.config.data.image_size}px images, the config "
                            f"says data.image_size={cfg.data.image_size}")
    # this stage's config records the CLIP actually used, so its checkpoint describes it fully
    cfg = replace(cfg, clip=clip.config.clip)
    train, test = load_data(cfg.data, dist)
    cache = Path(args.out) / "cache"
    emb_train, emb_test = rank0_first(lambda: (
        load_or_compute(clip, clip_hash, train, cache, "train", progress=dist.is_main),
        load_or_compute(clip, clip_hash, test, cache, "test", progress=dist.is_main)), dist)
    return StageInputs(dist, cfg, clip, clip_hash, train, test, emb_train, emb_test)


def stage_trainer(inputs: StageInputs, stage: str, build: Callable[[], nn.Module], args,
                  init_tokenizer=None) -> tuple[nn.Module, Trainer, StepBatches]:
    """The rest of what the prior and decoder scripts share: the model built from a seeded RNG (same
    config, same initial weights), its size printed, --init-from applied (fresh optimizer and schedule on
    top of earlier weights; `init_tokenizer`: the tokenizer those weights must have been trained with),
    the Trainer, and the device-side batch sampler of the training split."""
    dist, cfg, tc = inputs.dist, inputs.cfg, getattr(inputs.cfg, stage).train
    init_seed(tc)
    model = build()
    if dist.is_main:
        print(f"{stage}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"CLIP {inputs.clip_hash}, {len(inputs.train)} training images")
    if args.init_from:
        init_from(model, args.init_from, stage, asdict(getattr(cfg, stage).model), init_tokenizer)
    trainer = Trainer(stage, cfg, tc, model, args.out, tokenizer=inputs.clip.tokenizer,
                      extra={"clip_hash": inputs.clip_hash}, dist_info=dist)
    batches = StepBatches(len(inputs.train), tc.batch_size, tc.seed, dist.rank, dist.world_size, device=dist.device)
    return model, trainer, batches
