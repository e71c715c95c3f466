"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"),
small enough to be trained from scratch on 32x32 / 64x64 images.

Two encoders map an image and a caption to unit vectors in one shared embedding space (section 2.4):
    image -> VisionTransformer -> (N, E)        caption -> TextTransformer -> (N, E)
and a symmetric cross-entropy over the N x N cosine-similarity matrix of a batch (Figure 3) pulls
matching pairs together. unCLIP (Ramesh et al. 2022) then uses the frozen model: the prior maps the text
embedding (and the per-token encodings) to an image embedding, the decoder inverts the image embedding.

Both encoders use the shared pre-LN `Transformer` from `dalle2.core.layers`; the text tower is its
`CausalTextEncoder` (shared with the decoder's caption encoder) with EOS pooling on top.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle2.core.checkpoint import Provenance, model_from_checkpoint
from dalle2.core.config import ClipModelConfig as Defaults
from dalle2.core.layers import CausalTextEncoder, Transformer

# exp(logit_scale) is clamped to at most 100 "to prevent scaling the logits by more than 100, which we
# found necessary to prevent training instability" (CLIP, section 2.5).
MAX_LOGIT_SCALE = math.log(100.0)


class VisionTransformer(nn.Module):
    """ViT image encoder (Dosovitskiy et al. 2021) as used by CLIP (section 2.4): conv patch embedding,
    learned positional embedding, pre-LN transformer, LayerNorm, mean pooling, linear projection."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 embed_dim: int, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size = image_size
        self.grid = image_size // patch_size
        # No bias: ln_pre right after it would cancel a constant shift anyway (as in CLIP's ViT).
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(self.grid ** 2, width))
        # CLIP's ViT adds a LayerNorm before the transformer; it keeps the summed embeddings at unit scale.
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, dropout=dropout)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) float in [-1, 1], H == W == image_size. Returns unnormalised (N, E)."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of shape (N, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}")
        x = self.patch_embed(images)  # (N, W, g, g)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # (N, g*g, W)
        x = self.ln_post(self.transformer(self.ln_pre(x)))  # (N, g*g, W)
        # Mean pooling over patches instead of CLIP's class token (global average pooling, ViT appendix D.3;
        # Beyer et al. 2022 "Better plain ViT baselines"). Measured here: with N(0, 0.02) init a class token
        # starts as the same constant for every image (after ln_pre it dominates its own residual stream and
        # attention is near uniform), so from scratch the loss sat at log(N) for most of 40 AdamW steps on a
        # tiny batch, while the mean of the patch tokens carries the image from step 0 and the loss fell at once.
        return self.proj(x.mean(dim=1))  # (N, E)


class TextTransformer(CausalTextEncoder):
    """CLIP's text encoder (section 2.4): a `CausalTextEncoder` (token + learned positional
    embedding, masked self-attention, final LayerNorm) with the sequence feature taken at the EOS token
    and projected to the embedding space."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 embed_dim: int, dropout: float = 0.0):
        super().__init__(vocab_size, context_length, width, layers, heads, dropout)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens: (N, L) long, [BOS, ..., EOS, PAD=0 ...], L <= context_length.
        Returns (feature (N, E) unnormalised, enc (N, L, W) after ln_final, mask (N, L) bool True = real token)."""
        enc, _ = super().forward(tokens)  # (N, L, W)
        # The mask handed to the prior and the decoder marks only real tokens (they add position 0 themselves).
        mask = tokens != 0  # (N, L) True = real token
        # Pool at EOS = the last non-PAD token (CLIP section 2.4 uses the [EOS] activations): under causal
        # attention it is the only position that has seen the whole caption.
        eos = (mask.sum(-1) - 1).clamp(min=0)  # (N,)
        feature = self.proj(enc[torch.arange(tokens.shape[0], device=tokens.device), eos])  # (N, E)
        return feature, enc, mask


def contrastive_loss(logits_per_image: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Figure 3): (CE over texts for each image + CE over images for each text) / 2.

    logits_per_image: (N, N), row i = image i against every text; labels: (N,) long caption identity or None.

    With labels, the target of image i is spread uniformly over every text j with labels[j] == labels[i]
    (and symmetrically for texts). Why: in shapes / CIFAR batches several images often share a caption, and the
    one-hot diagonal then calls the other images' copies of that caption negatives. When the copies are exact
    (same tokens, deterministic encoder) their logits are tied and both targets give the same loss and gradient,
    but as soon as the copies differ (text dropout > 0, or labels that group different captions of one class,
    e.g. several CIFAR templates) the one-hot target trains the model to separate true matches by noise or
    wording; the soft target is stationary exactly when matching logits are equal. With all labels distinct it
    is the identity, i.e. exactly the standard loss. Note: a soft target has entropy, so the loss floor is the
    mean target entropy (log k for a caption repeated k times), as it is for the one-hot target with tied logits.

    Under DDP this is the per-rank loss: the negatives are the local batch only (no all_gather of the
    embeddings across ranks), which is simpler and is what the training loop expects.
    """
    n = logits_per_image.shape[0]
    logits_per_image = logits_per_image.float()  # the softmax in fp32 also under autocast
    if labels is None:
        targets = torch.arange(n, device=logits_per_image.device)  # (N,) one-hot on the diagonal
        return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets))
    labels = labels.to(logits_per_image.device)
    same = (labels[:, None] == labels[None, :]).float()  # (N, N) symmetric, diagonal 1
    # Rows sum to 1; still symmetric (all members of a group have the same count), so it serves both directions.
    targets = same / same.sum(-1, keepdim=True)  # (N, N)
    return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets))


def caption_labels(tokens: torch.Tensor) -> torch.Tensor:
    """Caption identity from token rows: tokens (N, L) -> labels (N,) long, equal iff the rows are equal.
    Convenient `labels` for `CLIP.loss` when the dataset does not provide caption ids."""
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


class CLIP(Provenance, nn.Module):
    """Contrastive Language-Image Pre-training: a ViT image encoder and a causal text transformer whose
    L2-normalised outputs are compared by a cosine similarity scaled by a learned temperature."""

    def __init__(self, *, vocab_size: int, image_size: int, embed_dim: int = Defaults.embed_dim,
                 vision_width: int = Defaults.vision_width, vision_layers: int = Defaults.vision_layers,
                 vision_heads: int = Defaults.vision_heads, patch_size: int = Defaults.patch_size,
                 text_width: int = Defaults.text_width, text_layers: int = Defaults.text_layers,
                 text_heads: int = Defaults.text_heads, context_length: int = Defaults.context_length,
                 dropout: float = Defaults.dropout):  # defaults: one source, the config
        super().__init__()
        self.image_size = image_size
        self.context_length = context_length
        self.embed_dim = embed_dim
        self.text_width = text_width
        self.visual = VisionTransformer(image_size, patch_size, vision_width, vision_layers, vision_heads,
                                        embed_dim, dropout)
        self.text = TextTransformer(vocab_size, context_length, text_width, text_layers, text_heads,
                                    embed_dim, dropout)
        # Learned temperature, initialised to 1/0.07 (CLIP section 2.5), stored as a log for positivity.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # A plain attribute (not part of state_dict): set by whoever builds the model, used for list[str] input.
        self.tokenizer = None
        self.apply(self._init_weights)
        # Embedding-like parameters get the same N(0, 0.02) as the linear layers.
        for p in (self.visual.pos_embed, self.text.pos_embed):
            nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # N(0, 0.02) weights and zero biases (GPT-2 / nanoGPT); LayerNorms keep their (1, 0) default.
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> "CLIP":
        """The CLIP saved at `path` by clip/train.py, with its tokenizer attached and .config, .step,
        .checkpoint_hash set. Loaded with weights_only=True."""

        def build(cfg, tokenizer):
            model = build_clip(cfg.clip.model, tokenizer.vocab_size, cfg.data.image_size)
            model.tokenizer = tokenizer
            return model
        return model_from_checkpoint(path, "clip", build, map_location)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to <= 100 (CLIP section 2.5). Clamped here rather than in place, so the
        parameter never needs an out-of-graph edit; above the cap its gradient is simply zero."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) float in [-1, 1] -> (N, E) unit-norm image embeddings."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens: (N, L) long, PAD = 0. Returns (emb (N, E) unit norm, enc (N, L, text_width) per-token
        encodings after the final LayerNorm, mask (N, L) bool True = real token). The prior and the decoder
        consume `enc` with `mask`."""
        feature, enc, mask = self.text(tokens.to(self.device))
        return F.normalize(feature, dim=-1), enc, mask

    def encode_text(self, text: Union[torch.Tensor, Sequence[str]]) -> torch.Tensor:
        """text: (N, L) long tokens, or a list of N strings tokenized by `self.tokenizer` -> (N, E) unit norm."""
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, torch.Tensor):
            if self.tokenizer is None:
                raise ValueError("CLIP.encode_text got strings but model.tokenizer is None; set "
                                 "model.tokenizer (e.g. the Tokenizer saved with the checkpoint) or pass tokens")
            text = self.tokenizer(list(text))
        return self.encode_text_tokens(text)[0]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (N, 3, H, W) in [-1, 1]; tokens: (N, L) long.
        Returns (logits_per_image (N, N), logits_per_text (N, N) = its transpose), scaled cosine similarities."""
        image_feature = self.visual(images)  # (N, E) unnormalised, bf16 under autocast
        text_feature = self.text(tokens.to(self.device))[0]  # (N, E)
        logits_per_image = self.similarity_logits(image_feature, text_feature)  # (N, N) float32
        return logits_per_image, logits_per_image.t()

    def similarity_logits(self, image_feature: torch.Tensor, text_feature: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities in float32, also under autocast: (N, E), (M, E) -> (N, M).

        A bf16 matmul rounds logits near the clamp of 100 to steps of 0.5 (8 bits of mantissa), coarser
        than the differences between close captions, so the features are normalised in fp32 and the matmul
        runs with autocast disabled (it costs N*M*E multiply-adds, nothing next to the encoders)."""
        with torch.autocast(device_type=image_feature.device.type, enabled=False):
            image_emb = F.normalize(image_feature.float(), dim=-1)  # (N, E)
            text_emb = F.normalize(text_feature.float(), dim=-1)  # (M, E)
            return self.scale().float() * image_emb @ text_emb.t()  # (N, M)

    def loss(self, images: torch.Tensor, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Symmetric contrastive loss of the batch (per rank under DDP). labels: (N,) caption identity or None;
        see `contrastive_loss` and `caption_labels`."""
        logits_per_image, _ = self(images, tokens)
        return contrastive_loss(logits_per_image, labels)


def build_clip(model_cfg, vocab_size: int, image_size: int) -> CLIP:
    """Build CLIP from the `clip.model` config (a dataclass or a dict whose keys are CLIP's keyword
    arguments) plus the tokenizer's vocab_size and the data's image_size."""
    if dataclasses.is_dataclass(model_cfg) and not isinstance(model_cfg, type):
        cfg = dataclasses.asdict(model_cfg)
    elif isinstance(model_cfg, dict):
        cfg = dict(model_cfg)
    else:
        raise TypeError(f"build_clip expects a dataclass instance or a dict, got {type(model_cfg).__name__}")
    for key in ("vocab_size", "image_size"):
        if key in cfg:
            raise ValueError(f"clip model config must not set {key!r}: it comes from the tokenizer / data config")
    return CLIP(vocab_size=vocab_size, image_size=image_size, **cfg)
