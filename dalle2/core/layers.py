"""Building blocks shared by every model in the project.

CLIP's two encoders, the diffusion prior and the decoder's text encoder are all stacks of the same
pre-LayerNorm transformer block; CLIP's text tower and the decoder's caption encoder are the same causal
text encoder; the sinusoidal timestep embedding is shared by the prior and the decoder. Keeping them here
means one implementation to read and to fix.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def extend_kv(cache: Optional[tuple[torch.Tensor, torch.Tensor]], kv: tuple[torch.Tensor, torch.Tensor]):
    """Keys/values 2 x (N, h, S, d) with cached ones 2 x (N, h, P, d) (or None) in front: 2 x (N, h, P+S, d)."""
    if cache is None:
        return kv
    # The same dtype as the new keys (both bf16 under autocast, where the cache was also made), so the
    # concatenation never promotes the new keys to float32 only for attention to cast them back.
    k, v = (c.to(x.dtype) for c, x in zip(cache, kv))
    return torch.cat([k, kv[0]], dim=2), torch.cat([v, kv[1]], dim=2)


class Attention(nn.Module):
    """Multi-head attention on top of `F.scaled_dot_product_attention` (flash / memory-efficient
    kernels on GPU). Self-attention when `context` is None; otherwise the queries come from `x`
    and keys/values from `context`."""

    def __init__(self, width: int, heads: int, context_width: Optional[int] = None):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width or width, 2 * width)
        self.out = nn.Linear(width, width)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `context` (N, S, Wc): 2 x (N, h, S, d)."""
        n, s = context.shape[:2]
        k, v = self.kv(context).view(n, s, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # 2 x (N, h, S, d)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
               causal: bool = False) -> torch.Tensor:
        """Queries from x: (N, T, W) over given keys/values 2 x (N, h, S, d). mask: (N, S) bool, True = may
        be attended, or (N, 1, T, S); causal: lower-triangular (T == S). Returns (N, T, W)."""
        n, t, w = x.shape
        q = self.q(x).view(n, t, self.heads, -1).transpose(1, 2)  # (N, h, T, d)
        attn_mask = None
        if mask is not None:
            attn_mask = mask[:, None, None, :] if mask.dim() == 2 else mask  # (N, 1, 1|T, S)
            if causal:
                attn_mask = attn_mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
                causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)  # (N, h, T, d)
        return self.out(y.transpose(1, 2).reshape(n, t, w))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, causal: bool = False,
                kv_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x: (N, T, W); context: (N, S, Wc) or None (self-attention); mask, causal: see `attend`.
        kv_cache: keys and values 2 x (N, h, P, d) computed earlier with `project_kv`, put in front of
        those of `context` (the mask then covers P + S keys). Work that does not change between
        diffusion steps (caption tokens, a causal prefix) is then done once per sample instead of once
        per step; softmax attention does not care where in the key list a key sits. Returns (N, T, W)."""
        k, v = extend_kv(kv_cache, self.project_kv(x if context is None else context))  # 2 x (N, h, P+S, d)
        return self.attend(x, k, v, mask, causal)


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, causal: bool = False,
                kv_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x: (N, T, W); mask: (N, T) bool key-padding mask (True = real token), or (N, 1, T, P+T) with
        a kv_cache of P earlier positions (see Attention). Returns (N, T, W)."""
        return self.forward_kv(x, mask, causal, kv_cache)[0]

    def forward_kv(self, x, mask=None, causal: bool = False, kv_cache=None):
        """forward, also returning this block's own keys and values of x: 2 x (N, h, T, d)."""
        h = self.ln_1(x)
        own = self.attn.project_kv(h)
        x = x + self.drop(self.attn.attend(h, *extend_kv(kv_cache, own), mask, causal))
        return x + self.drop(self.mlp(self.ln_2(x))), own


class Transformer(nn.Module):
    """A stack of `layers` TransformerBlocks."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, causal: bool = False,
                kv_caches: Optional[list] = None) -> torch.Tensor:
        """x: (N, T, W) -> (N, T, W). kv_caches: one (keys, values) per block from `prefix`, for x
        continuing a sequence whose first P positions were run before; mask is then (N, 1, T, P+T)."""
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, causal=causal, kv_cache=None if kv_caches is None else kv_caches[i])
        return x

    def prefix(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> list:
        """Run the first P positions x: (N, P, W) of a CAUSAL sequence and return every block's keys and
        values of them, [2 x (N, h, P, d)] * layers. Causal positions never see later ones, so these are
        exactly the keys/values a full-sequence forward computes, and `forward(rest, kv_caches=...)`
        gives the full forward's outputs at the remaining positions (a KV cache).
        mask: (N, 1, P, P) bool with the causal structure already in it."""
        caches = []
        for block in self.blocks:
            x, kv = block.forward_kv(x, mask)
            caches.append(kv)
        return caches


class CausalTextEncoder(nn.Module):
    """A caption encoder as in CLIP (section 2.4) and GLIDE (section 2.3): token + learned positional
    embedding, a causal transformer with a padding mask, a final LayerNorm. CLIP's text tower pools it at
    EOS; the decoder's own caption encoder uses it as is. pos_init_std: positions start at zero (0.0) or
    N(0, pos_init_std^2)."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 dropout: float = 0.0, pos_init_std: float = 0.0):
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(context_length, width) * pos_init_std if pos_init_std
                                      else torch.zeros(context_length, width))  # (L, W)
        self.transformer = Transformer(width, layers, heads, dropout=dropout)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: (N, L) long, [BOS, ..., EOS, PAD=0 ...], L <= context_length.
        Returns (enc (N, L, W) after ln_final, mask (N, L) bool, True = may be attended: a real token or
        position 0)."""
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"expected tokens of shape (N, L) with L <= context_length={self.context_length}, "
                             f"got {tuple(tokens.shape)}")
        length = tokens.shape[1]
        # Causal attention makes every real position depend only on the tokens before it, so a caption's
        # encodings are the same whatever padding follows; the key-padding mask additionally keeps PAD keys out
        # of the PAD positions' outputs. Position 0 (BOS) is always attendable so that even an all-PAD row has
        # a valid key for every query (no NaN from an empty softmax); for real captions this changes nothing.
        mask = (tokens != 0) | (torch.arange(length, device=tokens.device) == 0)  # (N, L)
        x = self.token_embed(tokens) + self.pos_embed[:length]  # (N, L, W)
        x = self.transformer(x, mask=mask, causal=True)  # (N, L, W)
        return self.ln_final(x), mask  # (N, L, W), (N, L)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer / DDPM.
    t: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features followed by a 2-layer MLP: t (N,) -> (N, out_dim)."""

    def __init__(self, out_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The sinusoid is made in float32; the MLP may hold bf16 weights (sampling casts the networks).
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))
