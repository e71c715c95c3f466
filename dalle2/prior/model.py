"""The DALL-E 2 diffusion prior (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation
with CLIP Latents", section 2.2).

The prior maps a caption to a CLIP image embedding. Following the paper's diffusion prior, it is a
decoder-only causal transformer over the sequence

    [text token encodings (L), CLIP text embedding, timestep embedding, noised image embedding, query]

and the output at the final (query) token predicts the *un-noised* image embedding directly (the x0
objective, which section 2.2 found better than predicting the noise).

Two modules:
- `PriorNetwork`: the transformer, with classifier-free-guidance condition dropout (learned nulls).
- `DiffusionPrior`: the network + a `GaussianDiffusion` process + the scaling between L2-normalised
  CLIP embeddings and the unit-variance coordinates the diffusion works in; `loss(...)` for training,
  `sample(...)` for generation (best of `candidates` by cosine to the text embedding).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle2.core.checkpoint import Provenance, model_from_checkpoint
from dalle2.core.config import PriorModelConfig
from dalle2.core.layers import TimestepEmbedding, Transformer
from dalle2.core.runtime import eval_mode
from dalle2.diffusion import GaussianDiffusion


def check_text_inputs(text_emb: torch.Tensor, text_enc: torch.Tensor, text_mask: torch.Tensor, *,
                      embed_dim: int, text_width: int, context_length: int) -> None:
    """Raise a ValueError naming expected vs got for malformed text conditioning, so a bad call
    fails here and not with a shape traceback from deep inside attention."""
    if text_emb.dim() != 2 or text_emb.shape[0] == 0:
        raise ValueError(f"text_emb must be a non-empty (N, {embed_dim}) tensor, got shape {tuple(text_emb.shape)}")
    n = text_emb.shape[0]
    if text_emb.shape[1] != embed_dim:
        raise ValueError(f"text_emb width must be embed_dim={embed_dim}, got {text_emb.shape[1]}")
    if text_enc.dim() != 3 or text_enc.shape[0] != n:
        raise ValueError(f"text_enc must be (N={n}, L, {text_width}), got shape {tuple(text_enc.shape)}")
    if text_enc.shape[2] != text_width:
        raise ValueError(f"text_enc width must be text_width={text_width}, got {text_enc.shape[2]}")
    if text_enc.shape[1] > context_length:
        raise ValueError(f"text_enc length must be <= context_length={context_length}, got {text_enc.shape[1]}")
    if tuple(text_mask.shape) != tuple(text_enc.shape[:2]):
        raise ValueError(f"text_mask must be (N, L)={tuple(text_enc.shape[:2])} like text_enc, "
                         f"got shape {tuple(text_mask.shape)}")


class PriorNetwork(nn.Module):
    """Causal transformer predicting x0 (the scaled, un-noised CLIP image embedding) from the
    sequence [text tokens, text embedding, timestep, x_t, learned query] (DALL-E 2 section 2.2)."""

    def __init__(self, *, embed_dim: int, text_width: int, context_length: int,
                 width: int = PriorModelConfig.width, layers: int = PriorModelConfig.layers,
                 heads: int = PriorModelConfig.heads, dropout: float = PriorModelConfig.dropout,
                 cond_drop_prob: float = PriorModelConfig.cond_drop_prob):  # defaults: one source, the config
        super().__init__()
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.embed_dim, self.text_width, self.context_length = embed_dim, text_width, context_length
        self.width, self.cond_drop_prob = width, cond_drop_prob

        # Every input becomes one or more width-dim tokens.
        self.text_enc_proj = nn.Linear(text_width, width)
        self.text_emb_proj = nn.Linear(embed_dim, width)
        self.x_proj = nn.Linear(embed_dim, width)
        self.time_embed = TimestepEmbedding(width)
        # The final token: its output, after the causal stack has let it see everything, is x0.
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        # Sequence: L text tokens + text embedding + timestep + x_t + query.
        self.pos_emb = nn.Parameter(torch.randn(context_length + 4, width) * 0.02)
        # Classifier-free guidance (Ho & Salimans 2021; DALL-E 2 section 2.2 drops the text
        # conditioning 10% of the time): learned stand-ins for the text tokens and text embedding.
        self.null_text_enc = nn.Parameter(torch.randn(context_length, width) * 0.02)
        self.null_text_emb = nn.Parameter(torch.randn(width) * 0.02)

        self.transformer = Transformer(width, layers, heads, dropout=dropout)
        self.ln_f = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)

    def drop_mask(self, n: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Rows whose text conditioning is dropped during training: (N,) bool, each True with
        probability cond_drop_prob. Drawn on the generator's device, then moved to `device`."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return (torch.rand(n, generator=generator, device=gen_device) < self.cond_drop_prob).to(device)

    def prepare_conditioning(self, *, text_emb: torch.Tensor, text_enc: torch.Tensor, text_mask: torch.Tensor,
                             cond_drop: Optional[torch.Tensor] = None) -> dict:
        """The part of the forward pass that does not depend on the timestep or x_t, so a sampler runs it
        once per sample instead of once per step (`forward(..., cond=...)`): the causal transformer over
        the text prefix [text tokens, text embedding], kept as every layer's keys and values. No later
        position can change them (causal attention), so this is exact. Arguments as in `forward`.
        Returns {"kv": [2 x (N, heads, P, d)] * layers, "mask": (N, 1, 3, P + 3) bool} with P = Lc + 1."""
        check_text_inputs(text_emb, text_enc, text_mask, embed_dim=self.embed_dim,
                          text_width=self.text_width, context_length=self.context_length)
        n, length = text_enc.shape[:2]
        device = text_emb.device
        if cond_drop is None:
            # Training drops the text for a random fraction of rows (CFG); eval never draws randomness.
            cond_drop = self.drop_mask(n, device) if self.training else torch.zeros(n, dtype=torch.bool, device=device)
        elif tuple(cond_drop.shape) != (n,):
            raise ValueError(f"cond_drop must be (N,)=({n},) bool, got shape {tuple(cond_drop.shape)}")
        cond_drop = cond_drop.to(device=device, dtype=torch.bool)

        # Shorter token sequences are padded (and masked) to context_length so that the trailing
        # tokens always sit at the same learned positions.
        tokens = self.text_enc_proj(text_enc)  # (N, L, W)
        mask = text_mask.to(torch.bool)
        if length < self.context_length:
            tokens = F.pad(tokens, (0, 0, 0, self.context_length - length))  # (N, Lc, W)
            mask = F.pad(mask, (0, self.context_length - length), value=False)  # (N, Lc)
        emb = self.text_emb_proj(text_emb)  # (N, W)

        # Dropped rows: null token sequence (every position attendable) and null text embedding.
        drop = cond_drop[:, None]  # (N, 1)
        tokens = torch.where(drop[:, :, None], self.null_text_enc.to(tokens.dtype).expand_as(tokens), tokens)
        mask = mask | drop
        emb = torch.where(drop, self.null_text_emb.to(emb.dtype).expand_as(emb), emb)
        prefix = torch.cat([tokens, emb[:, None].to(tokens.dtype)], dim=1)  # (N, P, W)
        p = prefix.shape[1]
        prefix = prefix + self.pos_emb[:p].to(prefix.dtype)

        # Attention mask: causal, padding tokens hidden as keys, and each position may always see
        # itself, so a padded first token has one key and no row softmaxes over nothing (which would
        # give NaN and leak into the other positions through the values).
        keys = torch.cat([mask, mask.new_ones(n, 1)], dim=1)  # (N, P); the text embedding is always real
        causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
        eye = torch.eye(p, dtype=torch.bool, device=device)
        prefix_mask = (keys[:, None, :] & causal) | eye  # (N, P, P)
        kv = self.transformer.prefix(prefix, mask=prefix_mask[:, None])
        # The 3 step tokens [timestep, x_t, query] see every real prefix key and, causally, each other.
        step_causal = torch.ones(3, 3, dtype=torch.bool, device=device).tril()
        step_mask = torch.cat([keys[:, None, :].expand(n, 3, p), step_causal.expand(n, 3, 3)], dim=2)  # (N, 3, P+3)
        return {"kv": kv, "mask": step_mask[:, None]}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, text_emb: Optional[torch.Tensor] = None,
                text_enc: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None,
                cond_drop: Optional[torch.Tensor] = None, cond: Optional[dict] = None) -> torch.Tensor:
        """x_t: (N, D) noised (sqrt(D)-scaled) image embedding; t: (N,) long timesteps;
        text_emb: (N, D) sqrt(D)-scaled CLIP text embedding; text_enc: (N, L, text_width) CLIP token
        encodings with L <= context_length; text_mask: (N, L) bool, True = real token;
        cond_drop: (N,) bool, True = use the learned nulls instead of the text (unconditional).
        When None, training mode draws a random cond_drop_prob fraction; eval mode drops nothing.
        cond: `prepare_conditioning(...)` of these arguments, computed earlier (then they are not given).
        Returns (N, D): predicted x0 in the scaled space."""
        if cond is None:
            if text_emb is None or text_enc is None or text_mask is None:
                raise ValueError("the prior needs text_emb, text_enc and text_mask (or cond=prepare_conditioning(...))")
            cond = self.prepare_conditioning(text_emb=text_emb, text_enc=text_enc, text_mask=text_mask,
                                             cond_drop=cond_drop)
        n = cond["mask"].shape[0]
        if tuple(x_t.shape) != (n, self.embed_dim):
            raise ValueError(f"x_t must be (N, D)=({n}, {self.embed_dim}), got shape {tuple(x_t.shape)}")
        if tuple(t.shape) != (n,):
            raise ValueError(f"t must be (N,)=({n},), got shape {tuple(t.shape)}")
        x = self.x_proj(x_t)  # (N, W)
        steps = torch.stack([self.time_embed(t).to(x.dtype), x, self.query.to(x.dtype).expand(n, -1)], dim=1)
        steps = steps + self.pos_emb[-3:].to(x.dtype)  # (N, 3, W)
        h = self.transformer(steps, mask=cond["mask"], kv_caches=cond["kv"])  # (N, 3, W)
        return self.out(self.ln_f(h[:, -1]))  # (N, D)


class DiffusionPrior(Provenance, nn.Module):
    """Network + diffusion process + embedding scaling. The prior checkpoint stores the network
    weights and config; the diffusion process has no weights and is rebuilt from the config."""

    def __init__(self, net: PriorNetwork, diffusion: GaussianDiffusion):
        super().__init__()
        self.net = net
        # A plain attribute, not a submodule: the process owns no parameters (guided-diffusion style).
        self.diffusion = diffusion

    @property
    def embed_dim(self) -> int:
        return self.net.embed_dim

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> "DiffusionPrior":
        """The prior saved at `path` (EMA weights), with .config, .tokenizer, .step, .extra."""
        return model_from_checkpoint(path, "prior", lambda cfg, tok: build_prior(cfg), map_location)

    # CLIP embeddings are L2-normalised, so each coordinate has variance ~1/D; Gaussian diffusion
    # assumes unit-variance data, hence the prior works on e * sqrt(D).
    def scale(self, emb: torch.Tensor) -> torch.Tensor:
        """emb: (N, D) CLIP embedding (re-normalised here) -> (N, D) with norm sqrt(D)."""
        return F.normalize(emb.float(), dim=-1) * math.sqrt(emb.shape[-1])

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, D) scaled-space embedding -> (N, D) unit-norm CLIP embedding."""
        return F.normalize(x.float(), dim=-1)

    def _check(self, text_emb, text_enc, text_mask):
        net = self.net
        check_text_inputs(text_emb, text_enc, text_mask, embed_dim=net.embed_dim,
                          text_width=net.text_width, context_length=net.context_length)

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, text_enc: torch.Tensor,
             text_mask: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """image_emb, text_emb: (N, D) CLIP embeddings; text_enc: (N, L, text_width); text_mask: (N, L).
        Returns the scalar loss. The network is built to predict x0 (section 2.2), so the prior's
        diffusion should use objective="x0" (the config default for the prior)."""
        self._check(text_emb, text_enc, text_mask)
        if tuple(image_emb.shape) != tuple(text_emb.shape):
            raise ValueError(f"image_emb must be (N, D)={tuple(text_emb.shape)} like text_emb, "
                             f"got shape {tuple(image_emb.shape)}")
        kwargs = dict(text_emb=self.scale(text_emb), text_enc=text_enc, text_mask=text_mask)
        return self.diffusion.training_loss(self.net, self.scale(image_emb), model_kwargs=kwargs,
                                            generator=generator).mean()

    @torch.no_grad()
    def sample(self, text_emb: torch.Tensor, text_enc: torch.Tensor, text_mask: torch.Tensor, *,
               steps: int = 64, sampler: str = "ddim", eta: float = 0.0, guidance_scale: float = 1.0,
               candidates: int = 2, generator: Optional[torch.Generator] = None, guidance_interval=None,
               callback=None) -> torch.Tensor:
        """text_emb: (N, D); text_enc: (N, L, text_width); text_mask: (N, L) -> (N, D) unit-norm
        image embeddings. Draws `candidates` samples per caption in one batch and keeps, per caption,
        the one with the highest cosine to its text embedding (DALL-E 2 section 2.2: "we generate
        two samples of z_i and select the one with a higher dot product with z_t").
        generator: one, or a list of N (one per caption, drawing its `candidates` rows);
        guidance_interval, callback: see GaussianDiffusion.sample."""
        self._check(text_emb, text_enc, text_mask)
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        n, d = text_emb.shape
        kwargs = dict(text_emb=self.scale(text_emb).repeat_interleave(candidates, 0),  # (N*c, D)
                      text_enc=text_enc.repeat_interleave(candidates, 0),  # (N*c, L, text_width)
                      text_mask=text_mask.repeat_interleave(candidates, 0))  # (N*c, L)
        with eval_mode(self.net):  # no random condition dropout or dropout while sampling
            # guidance_scale != 1: the diffusion runs the net once per step on conditional + null-text rows
            # (classifier-free guidance); the text prefix is encoded once (prepare_conditioning).
            x = self.diffusion.sample(self.net, (n * candidates, d), steps=steps, sampler=sampler, eta=eta,
                                      model_kwargs=kwargs, generator=generator, guidance_scale=guidance_scale,
                                      device=text_emb.device, guidance_interval=guidance_interval,
                                      callback=callback)
        emb = self.unscale(x).view(n, candidates, d)  # (N, c, D)
        sims = (emb * F.normalize(text_emb.float(), dim=-1)[:, None]).sum(-1)  # (N, c)
        best = sims.argmax(dim=1)  # (N,)
        return emb[torch.arange(n, device=emb.device), best]  # (N, D)


def build_prior(cfg) -> DiffusionPrior:
    """The prior described by a full Config: sizes of the CLIP it reads from `cfg.clip.model`, its own
    architecture from `cfg.prior.model`, the process from `cfg.prior.diffusion`."""
    from dataclasses import asdict
    c = cfg.clip.model
    net = PriorNetwork(embed_dim=c.embed_dim, text_width=c.text_width, context_length=c.context_length,
                       **asdict(cfg.prior.model))
    return DiffusionPrior(net, GaussianDiffusion(**asdict(cfg.prior.diffusion)))
