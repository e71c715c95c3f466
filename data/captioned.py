"""The container every stage trains on, and its batches.

In-memory captioned image datasets: decode once, then sample batches by pure tensor indexing.

Every stage (CLIP, prior, decoder) trains on a `CaptionedImages`: all images as one uint8 tensor
(N, 3, H, W), every caption as an index into one table of unique strings. A batch is
`data.sample(idx, generator, flip)`: a gather, an optional horizontal flip and a caption pick, with
no Python loop over rows and no DataLoader workers, so data is never the bottleneck on small
datasets (the anti-pattern this replaces is per-sample decoding in `Dataset.__getitem__`).

Batches for training come from `StepBatches`, a pure function of the step: resuming at step s
replays exactly the batches an uninterrupted run would have seen, on any number of ranks.

Horizontal flips swap the words "left" and "right" in the caption, so flipped pairs stay true
(an unflipped "a red circle at the top left" mirrored is a red circle at the top right); on shapes the
position word is recomputed from the mirrored box (data/shapes.py), since near the middle a mirror can
change the class.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from dalle2.core.errors import Dalle2Error

SPLITS = ("train", "test")


class DatasetError(Dalle2Error):
    """Any problem with the data on disk: missing files, bad records, unreadable images."""


# ---------------------------------------------------------------------------------------------
# Captions and the flip rule.

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _swap_word(match: re.Match) -> str:
    word = match.group(0)
    new = "right" if word.lower() == "left" else "left"
    if word.isupper():
        return new.upper()
    if word[0].isupper():
        return new.capitalize()
    return new


def flip_caption(text: str) -> str:
    """The caption that is true of the horizontally mirrored image: "left" <-> "right".

    Whole words only ("leftover" is kept), case preserved ("Left" -> "Right", "LEFT" -> "RIGHT").
    Captions without those words are their own flip. Flipping twice gives the original back.
    """
    return _LEFT_RIGHT.sub(_swap_word, text)


def build_caption_table(variants: Sequence[Sequence[str]], flipped: Optional[Sequence[Sequence[str]]] = None):
    """Turn per-image caption lists into one table of captions plus index tensors.

    variants: for each image, its caption variants (>= 1; duplicates within an image are dropped).
    flipped: optionally, for each image, the caption true of its mirror image for each variant (parallel
      to variants); default flip_caption(c). Shapes positions need it: near the middle a mirrored box can
      change its position class, not just swap left/right (data/shapes.py `mirrored_caption`).
    Returns (captions, caption_ids (N, K), num_captions (N,), flip_ids (len(captions),)).
    The table also holds the flipped version of every caption, so a flip is one lookup in flip_ids.
    Each string appears once, except where images with the same caption have different true flips: an
    image whose flip is not flip_caption(c) gets an entry of its own for c (same string, its own flip id).
    Rows with fewer than K variants repeat theirs cyclically, so any column is a real variant.
    """
    # key: the caption string when its flip is flip_caption(string), else (string, its flip)
    index: dict = {}
    rows = []
    for i, vs in enumerate(variants):
        fs = [flip_caption(c) for c in vs] if flipped is None else list(flipped[i])
        if len(fs) != len(vs):
            raise ValueError(f"image {i}: {len(vs)} captions but {len(fs)} flipped captions")
        keys = (c if f == flip_caption(c) else (c, f) for c, f in zip(vs, fs))
        row = list(dict.fromkeys(index.setdefault(k, len(index)) for k in keys))
        if not row:
            raise ValueError("every image needs at least one caption")
        rows.append(row)
    flip_of = lambda k: flip_caption(k) if isinstance(k, str) else k[1]
    keys = list(index)
    for k in keys:  # grows while iterating: every flip becomes a (plain) entry too
        if flip_of(k) not in index:
            index[flip_of(k)] = len(index)
            keys.append(flip_of(k))
    captions = [k if isinstance(k, str) else k[0] for k in keys]
    flip_ids = torch.tensor([index[flip_of(k)] for k in keys], dtype=torch.long)
    k = max((len(r) for r in rows), default=1)
    caption_ids = torch.tensor([[r[j % len(r)] for j in range(k)] for r in rows], dtype=torch.long)
    caption_ids = caption_ids.view(len(rows), k)  # (N, K), also when N == 0
    num_captions = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return captions, caption_ids, num_captions, flip_ids


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) in [0, 255] -> float (N, 3, H, W) in [-1, 1], the models' range."""
    return images.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# The dataset container.

@dataclass
class CaptionedImages:
    """A whole split in memory. Tensors may live on the GPU (`.to(device)`); images stay uint8.

    images: (N, 3, H, W) uint8. captions: caption strings (originals and their flips; a string repeats
      only where images sharing it have different true flips, see build_caption_table).
    caption_ids: (N, K) long, each image's K variants as indices into `captions`.
    num_captions: (N,) long, how many of the K variants are real (>= 1).
    flip_ids: (len(captions),) long, the caption that is true after a horizontal flip.
    metadata: shapes' metadata.jsonl records (they describe the unflipped image), else None.
    labels: (N,) long class ids and class_names (CIFAR-10, for zero-shot classification), else None.
    """
    images: torch.Tensor
    captions: list
    caption_ids: torch.Tensor
    num_captions: torch.Tensor
    flip_ids: torch.Tensor
    metadata: Optional[list] = None
    name: str = ""
    labels: Optional[torch.Tensor] = None
    class_names: Optional[list] = None

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.dim() != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.caption_ids.dim() != 2 or self.caption_ids.shape[0] != n or self.num_captions.shape != (n,):
            raise ValueError("caption_ids must be (N, K) and num_captions (N,) for N images")
        if self.flip_ids.shape != (len(self.captions),):
            raise ValueError("flip_ids must have one entry per caption")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def to(self, device) -> "CaptionedImages":
        """A copy with every tensor on `device` (images stay uint8: 4x less memory than float)."""
        moved = {f: getattr(self, f).to(device) for f in
                 ("images", "caption_ids", "num_captions", "flip_ids")}
        if self.labels is not None:
            moved["labels"] = self.labels.to(device)
        return replace(self, **moved)

    def sample(self, idx: torch.Tensor, generator: torch.Generator, flip: bool):
        """Gather a batch, flip half of it at random, and pick a random real caption variant per row.

        idx: (B,) long image indices. generator: the only randomness; on the images' device (e.g.
        `StepBatches.generator`), nothing here waits for the GPU: no host copy, no data-dependent
        shape. Returns images (B, 3, H, W) uint8, caption ids (B,) long and flipped (B,) bool, all on
        the images' device. A flipped row's image is mirrored left-right and its caption replaced by
        its flip (left <-> right), so image and caption still agree.
        """
        device = self.images.device
        idx = idx.to(device)  # a no-op for indices from StepBatches(device=...)
        b = idx.shape[0]
        # Two draws in a fixed order from one generator: the same batch for the same step on resume.
        u = torch.rand(b, generator=generator, device=generator.device).to(device)
        flipped = (torch.rand(b, generator=generator, device=generator.device) < 0.5).to(device)
        if not flip:
            flipped = torch.zeros_like(flipped)

        num = self.num_captions.index_select(0, idx)  # (B,)
        variant = torch.minimum((u * num).long(), num - 1)  # uniform over the real variants only
        cap = self.caption_ids.index_select(0, idx).gather(1, variant[:, None]).squeeze(1)  # (B,)
        cap = torch.where(flipped, self.flip_ids[cap], cap)
        # index_select copies whole rows (memcpy), far faster than advanced indexing of uint8; the
        # mirror is a select over the whole batch (finding the flipped rows first would be a sync).
        images = self.images.index_select(0, idx)  # (B, 3, H, W)
        if flip:  # a Python bool: no sync
            images = torch.where(flipped[:, None, None, None], images.flip(-1), images)  # (B, 3, H, W)
        return images, cap, flipped

    def caption_of(self, i: int) -> str:
        """The first caption variant of image i."""
        return self.captions[int(self.caption_ids[i, 0])]


# ---------------------------------------------------------------------------------------------
# Deterministic batches for exact resume and DDP.

def _mix(*parts) -> int:
    """A stable 63-bit seed from a few values (Python's hash() is salted for strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class StepBatches:
    """The batch of every step as a pure function of the step.

    The data is an endless stream of epoch permutations (epoch e shuffled by a generator seeded
    from (seed, e)); the global batch at `step` is stream positions [step*B, (step+1)*B), and rank r
    of world_size gets its contiguous slice of B // world_size. No state: resuming at step s gives
    exactly the batches of an uninterrupted run. A batch that straddles an epoch boundary takes
    the end of one permutation and the start of the next (it may repeat an image).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device="cpu"):
        if n < 1:
            raise ValueError(f"StepBatches needs a non-empty dataset, got n={n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        # Permutations, indices and the augmentation generator live on `device` (the GPU in training), so
        # a step's batch is drawn without a host-to-device copy. The same device gives the same batches.
        self.device = torch.device(device)
        self._perms: dict = {}  # a small cache of recent permutations; results never depend on it

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch `epoch`: a permutation of range(n), (n,) long on `device`."""
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator(device=self.device).manual_seed(_mix("epoch", self.seed, epoch))
            perm = torch.randperm(self.n, generator=g, device=self.device)
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def indices(self, step: int) -> torch.Tensor:
        """This rank's image indices for `step`: (batch_size // world_size,) long, on `device`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b = self.local_batch_size
        start = step * self.batch_size + self.rank * b  # stream positions [start, start + b)
        parts = []
        for e in range(start // self.n, (start + b - 1) // self.n + 1):  # python ints: no device sync
            lo, hi = max(start, e * self.n) - e * self.n, min(start + b, (e + 1) * self.n) - e * self.n
            parts.append(self.permutation(e)[lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def generator(self, step: int) -> torch.Generator:
        """A generator on `device` for this step's augmentation randomness (flips, caption variants),
        seeded from (seed, step, rank): reproducible on resume, different on each rank."""
        return torch.Generator(device=self.device).manual_seed(_mix("step", self.seed, step, self.rank))
