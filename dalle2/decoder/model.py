"""The DALL-E 2 decoder: a GLIDE-style text- and CLIP-conditioned UNet, and the Decoder that pairs it
with a diffusion process (Ramesh et al. 2022, section 2.1).

Layout follows Nichol & Dhariwal (improved/guided diffusion): residual blocks whose GroupNorm is
modulated by the timestep embedding (AdaGN), attention at chosen resolutions, strided-conv
downsampling, nearest+conv upsampling and skip connections from every encoder block to the decoder.
Conditioning follows GLIDE + unCLIP:
- the CLIP image embedding is projected and added to the timestep embedding, and projected into
  `clip_tokens` extra context tokens;
- the caption is encoded by the decoder's own causal transformer (GLIDE), or taken from CLIP's per-token
  text encodings (`text_encoder="clip"`, as lucidrains/DALLE2-pytorch does: no second tower to train);
  its tokens together with the CLIP tokens are the context every attention block attends to
  (keys/values concatenated with the image features'), and its EOS feature is also added to the
  timestep embedding;
- for classifier-free guidance the CLIP embedding (10%) and the caption (50%) are dropped
  INDEPENDENTLY during training and replaced by learned nulls.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle2.core.checkpoint import Provenance, model_from_checkpoint
from dalle2.core.config import DecoderModelConfig as Defaults
from dalle2.core.config import check_fields, field_default, unet_shape_problems
from dalle2.core.layers import Attention, CausalTextEncoder, TimestepEmbedding
from dalle2.core.runtime import eval_mode
from dalle2.diffusion import GaussianDiffusion


def norm_groups(channels: int) -> int:
    """GroupNorm groups: 32 (guided-diffusion) for wide layers, 4 channels per group for narrow ones."""
    return max(1, min(32, channels // 4))


def group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, never BatchNorm: a row's output must not depend on the other rows of the batch
    # (sampling batches mix guided / unguided rows and arbitrary batch sizes).
    return nn.GroupNorm(norm_groups(channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so the residual branch it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with AdaGN: h = norm(h) * (1 + scale) + shift, (scale, shift) from the timestep
    embedding (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021, section 3)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (N, Cin, H, W); emb: (N, E) already SiLU'd. Returns (N, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (N, Cout, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class ContextAttentionBlock(nn.Module):
    """GLIDE attention block: every head attends over [image features ; projected context] together,
    i.e. self-attention over the H*W positions whose keys/values also include the caption and CLIP
    tokens (GLIDE section 2.3; padding keys masked). Zero-initialised output projection."""

    def __init__(self, channels: int, head_channels: int, context_width: int, resolution: int):
        super().__init__()
        self.resolution = resolution  # side of the feature map it sees
        self.norm = group_norm(channels)
        self.context_proj = nn.Linear(context_width, channels)
        # Keys/values of image positions and of context tokens come from the same `kv` projection, which
        # is why the context is first mapped to `channels` (GLIDE's separate encoder_kv, factorised).
        self.attn = Attention(channels, channels // head_channels)
        zero_module(self.attn.out)

    def context_kv(self, context: torch.Tensor, context_mask: torch.Tensor):
        """The context's keys and values, which do not change between diffusion steps (computed once per
        sample by UNet.prepare_conditioning). context: (N, S, Wc); context_mask: (N, S) bool, True = real.
        Returns (keys, values) 2 x (N, h, S, d) and the key mask (N, S + H*W) (context keys first)."""
        k, v = self.attn.project_kv(self.context_proj(context))  # 2 x (N, h, S, d)
        image_keys = context_mask.new_ones(context_mask.shape[0], self.resolution ** 2)
        mask = torch.cat([context_mask, image_keys], dim=1)  # (N, S + HW)
        return k, v, mask

    def forward(self, x: torch.Tensor, ctx: tuple) -> torch.Tensor:
        """x: (N, C, H, W); ctx: `context_kv(...)`. Returns (N, C, H, W)."""
        n, c, h, w = x.shape
        k, v, mask = ctx
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C); a view when x is channels_last
        y = self.attn(tokens, mask=mask, kv_cache=(k, v))  # (N, HW, C)
        return x + y.transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (N, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, C, 2H, 2W)


class UNetStage(nn.Module):
    """One UNet position: a ResBlock, optionally followed by context attention, optionally a resampler."""

    def __init__(self, res: ResBlock, attn: Optional[ContextAttentionBlock] = None,
                 resample: Optional[nn.Module] = None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, x, emb, ctx=None):
        """x: (N, C, H, W); emb: (N, E); ctx: this stage's attention context (see ContextAttentionBlock)."""
        x = self.res(x, emb)
        if self.attn is not None:  # fixed at construction: no data-dependent control flow
            x = self.attn(x, ctx)
        if self.resample is not None:
            x = self.resample(x)
        return x


# The decoder's checkpoints and exports (and the weight hashes computed from them) call the caption encoder's
# embeddings token_embedding / positional_embedding; the shared `CausalTextEncoder` calls them token_embed /
# pos_embed. {attribute path: state-dict key}, both relative to the TextEncoder.
TEXT_ENCODER_KEYS = {"token_embed.weight": "token_embedding.weight", "pos_embed": "positional_embedding"}


def _text_encoder_keys_out(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: write TEXT_ENCODER_KEYS' keys, in place and in the same order."""
    ours = [k for k in state_dict if k.startswith(prefix)]  # this module's keys: the last ones written
    for k in ours:
        name = k[len(prefix):]
        state_dict[prefix + TEXT_ENCODER_KEYS.get(name, name)] = state_dict.pop(k)


class TextEncoder(CausalTextEncoder):
    """The decoder's own caption encoder (GLIDE section 2.3): a `CausalTextEncoder` (token + learned
    position embeddings, a causal transformer with a padding mask, a final LayerNorm) whose positions start
    at N(0, 0.01^2). Returns every token's feature (the attention context) and the mask; the UNet adds the
    EOS token's feature to the timestep embedding.

    Its state dict uses the keys of TEXT_ENCODER_KEYS, mapped both ways (written by a state_dict post-hook,
    read back by `_load_from_state_dict`), so every loading path (checkpoints, exports, --init-from, resume)
    reads the decoders saved so far and writes the same keys."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int):
        super().__init__(vocab_size, context_length, width, layers, heads, pos_init_std=0.01)
        self.register_state_dict_post_hook(_text_encoder_keys_out)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs before the children load from the same dict, so renaming here serves token_embed too.
        for name, key in TEXT_ENCODER_KEYS.items():
            if prefix + key in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class UNet(nn.Module):
    """GLIDE/unCLIP decoder UNet predicting a 3-channel target (eps or v: the diffusion's concern)."""

    def __init__(self, *, image_size: int, embed_dim: int, vocab_size: int, context_length: int,
                 channels: int = Defaults.channels, patch_size: int = Defaults.patch_size,
                 channel_mult: Sequence[int] = tuple(field_default(Defaults, "channel_mult")),
                 num_res_blocks: int = Defaults.num_res_blocks,
                 attention_resolutions: Sequence[int] = tuple(field_default(Defaults, "attention_resolutions")),
                 head_channels: int = Defaults.head_channels, dropout: float = Defaults.dropout,
                 text_encoder: str = Defaults.text_encoder, text_width: int = Defaults.text_width,
                 text_layers: int = Defaults.text_layers, text_heads: int = Defaults.text_heads,
                 clip_tokens: int = Defaults.clip_tokens, clip_drop_prob: float = Defaults.clip_drop_prob,
                 text_drop_prob: float = Defaults.text_drop_prob,
                 clip_text_width: Optional[int] = None):  # defaults: one source, the config
        """image_size: side of the square input; embed_dim: CLIP embedding width; vocab_size / context_length:
        the caption tokenizer's; patch_size: p, each p x p pixel block folded into 3p^2 channels before the
        body and unfolded after it (pixel unshuffle / shuffle: the body runs at image_size / p, as in
        Hoogeboom et al. 2023's patching); channels: base width, multiplied by channel_mult[i] at level i (each level
        halves the resolution); num_res_blocks: ResBlocks per level; attention_resolutions: feature-map side
        lengths with context attention; head_channels: channels per attention head; text_encoder: "own" (the
        decoder's caption transformer, text_*) or "clip" (CLIP's per-token encodings of width
        clip_text_width, projected to text_width); clip_tokens: context tokens projected from the CLIP
        embedding; *_drop_prob: classifier-free-guidance dropout rates of the two conditions (unCLIP
        section 2.1). The defaults are the config's (DecoderModelConfig, model_config.yml)."""
        super().__init__()
        channel_mult, attention_resolutions = list(channel_mult), list(attention_resolutions)
        for name, v in [("image_size", image_size), ("embed_dim", embed_dim), ("vocab_size", vocab_size),
                        ("context_length", context_length)]:  # the sizes that come from outside decoder.model
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"UNet: {name} must be a positive int, got {v!r}")
        check_fields(Defaults, dict(channels=channels, patch_size=patch_size, channel_mult=channel_mult,
                                    num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
                                    head_channels=head_channels, dropout=dropout, text_encoder=text_encoder,
                                    text_width=text_width, text_layers=text_layers, text_heads=text_heads,
                                    clip_tokens=clip_tokens, clip_drop_prob=clip_drop_prob,
                                    text_drop_prob=text_drop_prob), "decoder.model.", "UNet")
        for key, msg in unet_shape_problems(image_size, channels, channel_mult, attention_resolutions, head_channels,
                                            text_width, text_heads, patch_size):
            raise ValueError(f"UNet: decoder.model.{key}: {msg}")
        for ch in sorted({channels * m for m in channel_mult}):
            if ch % norm_groups(ch):
                raise ValueError(f"UNet: width {ch} (channels * channel_mult) is not divisible by its "
                                 f"{norm_groups(ch)} GroupNorm groups; use a multiple of 4 (of 32 above 128)")
        if dropout == 1.0:
            raise ValueError("UNet: decoder.model.dropout must be below 1 (1 would drop every activation)")
        self.image_size, self.embed_dim, self.patch_size = image_size, embed_dim, patch_size
        if text_encoder == "clip" and not (isinstance(clip_text_width, int) and clip_text_width > 0):
            raise ValueError("decoder.model.text_encoder 'clip' needs clip_text_width (clip.model.text_width)")
        self.text_source = text_encoder
        self.context_length, self.clip_tokens, self.text_width = context_length, clip_tokens, text_width
        self.clip_drop_prob, self.text_drop_prob = clip_drop_prob, text_drop_prob
        emb_dim = 4 * channels

        # --- conditioning (unCLIP 2.1): timestep + CLIP embedding + caption EOS -> one vector ---
        self.time_embed = TimestepEmbedding(emb_dim)
        # A unit-norm CLIP embedding has coordinates of size ~1/sqrt(E): scaled by sqrt(E) it has unit
        # variance like every other input, and its context tokens get the same LayerNorm as the caption's
        # (text tokens leave the text encoder's ln_final at rms 1; unscaled, the CLIP tokens came out at
        # rms ~0.05, so at initialisation the decoder barely heard the image embedding).
        self.clip_scale = embed_dim ** 0.5
        self.clip_to_emb = nn.Linear(embed_dim, emb_dim)
        self.clip_to_tokens = nn.Linear(embed_dim, clip_tokens * text_width)
        self.clip_token_norm = nn.LayerNorm(text_width)
        if text_encoder == "own":
            self.text_encoder = TextEncoder(vocab_size, context_length, text_width, text_layers, text_heads)
        else:  # CLIP's encodings leave its ln_final at rms ~1; project, then LayerNorm to keep that scale
            self.text_in = nn.Sequential(nn.Linear(clip_text_width, text_width), nn.LayerNorm(text_width))
        self.text_to_emb = nn.Linear(text_width, emb_dim)
        # Learned nulls for classifier-free guidance: a CLIP embedding (about unit norm, like real ones) and a
        # full-length caption context with a full mask (its last token stands in for the EOS feature).
        self.null_image_emb = nn.Parameter(torch.randn(embed_dim) * embed_dim ** -0.5)
        self.null_text = nn.Parameter(torch.randn(context_length, text_width) * 0.02)

        # --- UNet body (Nichol & Dhariwal layout) ---
        def attn(ch: int, res: int) -> Optional[ContextAttentionBlock]:
            return ContextAttentionBlock(ch, head_channels, text_width, res) if res in attention_resolutions else None

        pixels = 3 * patch_size ** 2  # channels of the (possibly patched) image the body reads and writes
        self.conv_in = nn.Conv2d(pixels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, ch, res = [channels], channels, image_size // patch_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(UNetStage(ResBlock(ch, channels * mult, emb_dim, dropout), attn(channels * mult, res)))
                ch = channels * mult
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)
                res //= 2
        self.middle = nn.ModuleList([
            UNetStage(ResBlock(ch, ch, emb_dim, dropout), ContextAttentionBlock(ch, head_channels, text_width, res)),
            UNetStage(ResBlock(ch, ch, emb_dim, dropout)),
        ])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out = channels * mult
                upsample = Upsample(out) if level != 0 and i == num_res_blocks else None
                block = ResBlock(ch + skip_chs.pop(), out, emb_dim, dropout)
                self.up.append(UNetStage(block, attn(out, res), upsample))
                ch = out
            if level != 0:
                res *= 2
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, pixels, 3, padding=1)))

    def drop_masks(self, n: int, device=None, generator: Optional[torch.Generator] = None):
        """Training-time classifier-free-guidance dropout, drawn independently for the two conditions
        (the original unCLIP code tied them to one mask). Returns drop_clip (N,) bool, drop_text (N,) bool."""
        u = torch.rand(2, n, device=device, generator=generator)  # (2, N)
        return u[0] < self.clip_drop_prob, u[1] < self.text_drop_prob

    def text_inputs(self, tokens: Optional[torch.Tensor] = None, text_enc: Optional[torch.Tensor] = None,
                    text_mask: Optional[torch.Tensor] = None) -> dict:
        """The caption keyword arguments this UNet reads, from whatever the caller has: the tokens (N, L)
        for text_encoder "own", CLIP's encodings (N, L, Wclip) with their mask (N, L) for "clip". All
        None = no caption (the learned null). A "clip" UNet given tokens but no encodings is an error."""
        if self.text_source == "own":
            return {"tokens": tokens}
        if text_enc is None and tokens is not None:
            raise ValueError("this decoder reads CLIP's per-token text encodings (text_encoder 'clip'): "
                             "pass text_enc and text_mask (CLIP.encode_text_tokens), not only tokens")
        return {"text_enc": text_enc, "text_mask": text_mask}

    def encode_caption(self, tokens=None, text_enc=None, text_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption features (N, L, Wt) and mask (N, L) bool (True = real) from the tokens ("own") or from
        CLIP's encodings ("clip"). Position 0 (BOS) always counts as real, so no attention row is empty."""
        if self.text_source == "own":
            return self.text_encoder(tokens)
        L = text_enc.shape[1]
        mask = text_mask.bool() | (torch.arange(L, device=text_mask.device) == 0)  # (N, L)
        return self.text_in(text_enc), mask  # (N, L, Wt), (N, L)

    def condition(self, image_emb: torch.Tensor, tokens: Optional[torch.Tensor], drop_clip: torch.Tensor,
                  drop_text: torch.Tensor, text_enc: Optional[torch.Tensor] = None,
                  text_mask: Optional[torch.Tensor] = None):
        """Build the conditioning from the two (possibly dropped) conditions.
        image_emb: (N, E); tokens: (N, L) (text_encoder "own") or text_enc (N, L, Wclip) + text_mask (N, L)
        ("clip"); drop_*: (N,) bool. Returns cond_emb (N, 4C), context (N, K+S, Wt), context_mask (N, K+S)
        with K = clip_tokens, S = context_length."""
        n = image_emb.shape[0]
        L = (tokens if self.text_source == "own" else text_enc).shape[1]
        if L > self.context_length:
            raise ValueError(f"tokens have length {L} > context_length {self.context_length}")
        image_emb = torch.where(drop_clip[:, None], self.null_image_emb.to(image_emb.dtype), image_emb)  # (N, E)

        text, mask = self.encode_caption(tokens, text_enc, text_mask)  # (N, L, Wt), (N, L)
        # Pad to context_length in feature space (masked), so the null caption always has the same length.
        text = F.pad(text, (0, 0, 0, self.context_length - L))  # (N, S, Wt)
        mask = F.pad(mask, (0, self.context_length - L), value=False)  # (N, S)
        text = torch.where(drop_text[:, None, None], self.null_text.to(text.dtype), text)
        mask = mask | drop_text[:, None]
        eos = text[torch.arange(n, device=text.device), mask.sum(1) - 1]  # (N, Wt)

        clip_in = image_emb * self.clip_scale  # (N, E), unit variance per coordinate
        cond_emb = self.clip_to_emb(clip_in) + self.text_to_emb(eos)  # (N, 4C)
        clip_ctx = self.clip_to_tokens(clip_in).view(n, self.clip_tokens, self.text_width)  # (N, K, Wt)
        clip_ctx = self.clip_token_norm(clip_ctx)
        context = torch.cat([clip_ctx, text.to(clip_ctx.dtype)], dim=1)  # (N, K+S, Wt)
        context_mask = torch.cat([mask.new_ones(n, self.clip_tokens), mask], dim=1)  # (N, K+S)
        return cond_emb, context, context_mask

    def prepare_conditioning(self, *, image_emb: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                             text_enc: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None,
                             cond_drop: Optional[torch.Tensor] = None) -> dict:
        """Everything the conditions contribute that does not change between diffusion steps: the caption
        transformer, the CLIP projections and every attention block's context keys/values. A sampler
        computes it once per sample and passes it to each step (`forward(x_t, t, cond=...)`).
        Arguments as in `forward`. Returns {"emb": (N, 4C), "ctx": {stage name: (keys, values, mask)}}, one
        entry per stage with attention, named as in the module tree ("down.1", "middle.0", "up.2")."""
        n = image_emb.shape[0]
        if self.training:
            drop_clip, drop_text = self.drop_masks(n, image_emb.device)
        else:
            drop_clip = drop_text = torch.zeros(n, dtype=torch.bool, device=image_emb.device)
        if cond_drop is not None:
            drop_clip, drop_text = drop_clip | cond_drop, drop_text | cond_drop
        text = self.text_inputs(tokens, text_enc, text_mask)
        if all(v is None for v in text.values()):  # no caption: placeholders, replaced by the null caption
            dev = image_emb.device
            text = ({"tokens": torch.zeros(n, 2, dtype=torch.long, device=dev)} if self.text_source == "own" else
                    {"text_enc": image_emb.new_zeros(n, 2, self.text_in[0].in_features),
                     "text_mask": torch.ones(n, 2, dtype=torch.bool, device=dev)})
            drop_text = torch.ones_like(drop_text)
        cond_emb, context, context_mask = self.condition(image_emb, text.get("tokens"), drop_clip, drop_text,
                                                         text.get("text_enc"), text.get("text_mask"))
        return {"emb": cond_emb, "ctx": {name: stage.attn.context_kv(context, context_mask)
                                         for name, stage in self.attention_stages()}}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, image_emb: Optional[torch.Tensor] = None,
                tokens: Optional[torch.Tensor] = None, text_enc: Optional[torch.Tensor] = None,
                text_mask: Optional[torch.Tensor] = None, cond_drop: Optional[torch.Tensor] = None,
                cond: Optional[dict] = None) -> torch.Tensor:
        """x_t: (N, 3, H, W); t: (N,) long timesteps; image_emb: (N, E) unit-norm CLIP image embedding;
        tokens: (N, L) long (PAD = 0), or None for "no caption" (the learned null caption: the image
        manipulations of section 3 condition on the CLIP embedding alone); text_enc, text_mask: instead of
        tokens for text_encoder "clip" (see `text_inputs`); cond_drop: (N,) bool or
        None, rows forced fully unconditional; cond: `prepare_conditioning(...)` of these, computed
        earlier (then they are not given). Returns the model output (N, 3, H, W)."""
        if cond is None:
            if image_emb is None:
                raise ValueError("the decoder needs image_emb (and tokens, or None for no caption), "
                                 "or cond=prepare_conditioning(...)")
            cond = self.prepare_conditioning(image_emb=image_emb, tokens=tokens, text_enc=text_enc,
                                             text_mask=text_mask, cond_drop=cond_drop)
        emb = F.silu(self.time_embed(t) + cond["emb"])  # (N, 4C); SiLU once here, shared by every ResBlock
        ctx = cond["ctx"]

        def run(name, stage, h):  # each attention stage reads the context prepared under its own name
            return stage(h, emb, ctx[name] if stage.attn is not None else None)

        p = self.patch_size
        h = self.conv_in(F.pixel_unshuffle(x_t, p) if p > 1 else x_t)
        skips = [h]
        for i, stage in enumerate(self.down):
            h = run(f"down.{i}", stage, h) if isinstance(stage, UNetStage) else stage(h)
            skips.append(h)
        for i, stage in enumerate(self.middle):
            h = run(f"middle.{i}", stage, h)
        for i, stage in enumerate(self.up):
            h = run(f"up.{i}", stage, torch.cat([h, skips.pop()], dim=1))
        return F.pixel_shuffle(self.out(h), p) if p > 1 else self.out(h)

    def attention_stages(self) -> list[tuple[str, "UNetStage"]]:
        """(name, stage) of every stage with context attention, named as in the module tree."""
        return [(f"{part}.{i}", stage)
                for part in ("down", "middle", "up") for i, stage in enumerate(getattr(self, part))
                if isinstance(stage, UNetStage) and stage.attn is not None]


class Decoder(Provenance, nn.Module):
    """UNet + diffusion process; the decoder checkpoint stores the UNet weights and config."""

    def __init__(self, unet: UNet, diffusion):
        super().__init__()
        self.unet = unet
        # Plain attribute, never a registered submodule: the diffusion process holds no learned state.
        object.__setattr__(self, "diffusion", diffusion)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> "Decoder":
        """The decoder saved at `path` (EMA weights), with .config, .tokenizer, .step, .extra."""
        return model_from_checkpoint(path, "decoder", lambda cfg, tok: build_decoder(cfg, tok.vocab_size),
                                     map_location)

    def loss(self, images: torch.Tensor, image_emb: torch.Tensor, tokens: Optional[torch.Tensor] = None,
             text_enc: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """images: (N, 3, H, W) float in [-1, 1]; image_emb: (N, E); the caption as tokens (N, L) and/or
        CLIP's encodings text_enc (N, L, Wclip) + text_mask (N, L): the UNet reads the one it was built
        for. Returns a scalar."""
        kwargs = dict(image_emb=image_emb, **self.unet.text_inputs(tokens, text_enc, text_mask))
        losses = self.diffusion.training_loss(self.unet, images, model_kwargs=kwargs, generator=generator)  # (N,)
        return losses.mean()

    @torch.no_grad()
    def sample(self, image_emb: torch.Tensor, tokens: Optional[torch.Tensor] = None, *, steps: int = 50,
               sampler: str = "ddim", eta: float = 0.0, guidance_scale: float = 3.0,
               generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
               clip_x0: Optional[str] = "static", progress: bool = False, guidance_interval=None, callback=None,
               text_enc: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """image_emb: (N, E) CLIP image embeddings (e.g. from the prior); the captions as tokens (N, L)
        and/or CLIP encodings text_enc + text_mask (see `loss`); all None = no caption.
        guidance_scale: classifier-free guidance on both conditions at once (unconditional = both nulls).
        generator: one, or a list of N (one per image); guidance_interval, callback: see
        GaussianDiffusion.sample. Returns images (N, 3, H, W) float in [-1, 1]."""
        s = self.unet.image_size
        with eval_mode(self.unet):  # no dropout and no random condition dropout while sampling
            x = self.diffusion.sample(self.unet, (image_emb.shape[0], 3, s, s), steps=steps, sampler=sampler, eta=eta,
                                      model_kwargs=dict(image_emb=image_emb,
                                                        **self.unet.text_inputs(tokens, text_enc, text_mask)),
                                      generator=generator,
                                      noise=noise, clip_x0=clip_x0, guidance_scale=guidance_scale, progress=progress,
                                      guidance_interval=guidance_interval, callback=callback)
        return x.clamp(-1, 1)


def build_decoder(cfg, vocab_size: int) -> Decoder:
    """The decoder described by a full Config: image size from `cfg.data`, CLIP embedding size and
    caption length from `cfg.clip.model`, the UNet from `cfg.decoder.model`, the process from
    `cfg.decoder.diffusion`; vocab_size from the tokenizer."""
    unet = UNet(image_size=cfg.data.image_size, embed_dim=cfg.clip.model.embed_dim, vocab_size=vocab_size,
                context_length=cfg.clip.model.context_length, clip_text_width=cfg.clip.model.text_width,
                **asdict(cfg.decoder.model))
    return Decoder(unet, GaussianDiffusion(**asdict(cfg.decoder.diffusion)))
