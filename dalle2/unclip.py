"""DALLE2: CLIP text encoder -> diffusion prior -> decoder, the notebook API (unCLIP, Ramesh et al. 2022).

    from dalle2 import DALLE2
    model = DALLE2.from_run("runs").to("cuda")
    images = model.generate(["a large gold pentagon and a small blue circle"], n_per_text=4,
                            seed=0)  # (4, 3, 32, 32) in [0, 1]
    model.to_pil(images)[0].save("pentagon.png")

`sample.py` is a thin command line over `generate`. The image manipulations of section 3 of the paper
(variations, interpolations, text diffs) are methods too.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from clip.model import CLIP
from dalle2 import pretrained
from dalle2.core.checkpoint import CheckpointError
from dalle2.core.config import SamplingConfig
from dalle2.core.images import to_pil
from dalle2.core.runtime import autocast, resolve_precision
from dalle2.decoder import Decoder
from dalle2.embeddings import check_same_clip
from dalle2.pretrained import save_pretrained
from dalle2.prior import DiffusionPrior
from data.captioned import to_float
from data.decode import square_resize

STAGES = ("clip", "prior", "decoder")


def image_seeds(rows: Sequence[str], seed: int | Sequence[int]) -> list[int]:
    """The seed of each image (one per row of captions): with an int seed s, the m-th image of a caption
    in the call gets s + m (m counts that caption's images, so it does not depend on the other captions
    or their order); a list gives one seed per image. An image is fixed by its caption, its seed and the
    settings: `generate(caption, seed=s + m)` remakes image m of `generate(caption, n_per_text=.., seed=s)`."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != len(rows):
            raise ValueError(f"seed: {len(seed)} seeds given for {len(rows)} images (give one per image, or one int)")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
            raise ValueError(f"seed: expected integers, got {list(seed)!r}")
        return list(seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int or a list of ints, got {seed!r}")
    seen: dict[str, int] = {}
    out = []
    for caption in rows:
        out.append(seed + seen.get(caption, 0))
        seen[caption] = seen.get(caption, 0) + 1
    return out


def image_generators(caption: str, seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Two CPU generators (prior, decoder) of one image, seeded from a hash of (seed, caption): the noise
    is the same on every device and batch, different captions never share it, and the decoder's does not
    depend on how much noise the prior drew (its sampler or step count)."""
    digest = hashlib.sha256(f"{seed}\n{caption}".encode()).digest()
    return tuple(torch.Generator().manual_seed(int.from_bytes(digest[i:i + 8], "little") >> 1) for i in (0, 8))


def slerp(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation of unit vectors a, b: (..., D) at fraction theta (broadcast) -> unit (..., D)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    theta = torch.as_tensor(theta, dtype=torch.float32, device=a.device)  # scalar or (..., 1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # (..., 1)
    so = torch.sin(omega)
    out = (torch.sin((1 - theta) * omega) * a + torch.sin(theta * omega) * b) / so
    return F.normalize(out, dim=-1)


class DALLE2(nn.Module):
    """The three trained stages, checked to fit together, with batched, seeded sampling."""

    def __init__(self, clip, prior, decoder, sampling: Optional[SamplingConfig] = None):
        super().__init__()
        for model in (prior, decoder):
            check_same_clip(model, clip)
        for name, dim in (("prior", prior.embed_dim), ("decoder", decoder.unet.embed_dim)):
            if dim != clip.embed_dim:
                raise CheckpointError(f"the {name} works on {dim}-dim CLIP embeddings, the CLIP given makes "
                                      f"{clip.embed_dim}-dim ones; they do not fit together")
        self.clip, self.prior, self.decoder = clip.eval(), prior.eval(), decoder.eval()
        self.tokenizer = clip.tokenizer
        if sampling is None:  # the sampling defaults saved with the decoder, else the library's
            sampling = decoder.config.sampling if decoder.config is not None else SamplingConfig()
        self.sampling = sampling
        self.image_size = decoder.unet.image_size

    # --- loading ----------------------------------------------------------------------------

    @classmethod
    def from_checkpoints(cls, clip: str | Path, prior: str | Path, decoder: str | Path,
                         map_location="cpu") -> "DALLE2":

        return cls(CLIP.from_checkpoint(clip, map_location=map_location),
                   DiffusionPrior.from_checkpoint(prior, map_location=map_location),
                   Decoder.from_checkpoint(decoder, map_location=map_location))

    @classmethod
    def from_run(cls, run_dir: str | Path, map_location="cpu") -> "DALLE2":
        """A run folder holding clip.pt, prior.pt and decoder.pt (the shared --out of the training scripts)."""
        run_dir = Path(run_dir)
        missing = [s for s in STAGES if not (run_dir / f"{s}.pt").is_file()]
        if missing:
            how = {"clip": "python clip/train.py", "prior": "python dalle2/train_prior.py",
                   "decoder": "python dalle2/train_decoder.py"}
            raise CheckpointError(f"{run_dir}: missing {', '.join(f'{m}.pt' for m in missing)}; train "
                                  + "; ".join(f"{m} with `{how[m]} --out {run_dir}`" for m in missing)
                                  + f" (or all at once: `python -m dalle2.pipeline --out {run_dir}`)")
        return cls.from_checkpoints(*(run_dir / f"{s}.pt" for s in STAGES), map_location=map_location)

    @classmethod
    def from_pretrained(cls, folder: str | Path | None = None, device="cpu") -> "DALLE2":
        """An exported folder (model_index.json, safetensors: nothing is unpickled) or a training run
        folder (clip.pt, prior.pt, decoder.pt: as from_run), on `device`. No folder: the weights
        shipped in the repo's checkpoints/ (shapes32/, else shapes_cpu/: see dalle2/pretrained.py)."""
        if folder is None or pretrained.is_pretrained_folder(folder):
            stages = pretrained.load_pretrained(folder)
            return cls(stages["clip"], stages["prior"], stages["decoder"]).to(device)
        return cls.from_run(folder).to(device)

    def save_pretrained(self, folder: str | Path, *, dtype: Optional[torch.dtype] = None,
                        card: Optional[dict] = None) -> Path:
        """Export to `folder` for from_pretrained: safetensors + JSON + a model card (README.md).
        dtype=torch.float16 halves the files. See dalle2.pretrained.save_pretrained for `card`."""
        return save_pretrained(self, folder, dtype=dtype, card=card)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def compile(self, mode: Optional[str] = None) -> "DALLE2":
        """torch.compile the prior network and the decoder UNet in place, for sampling speed. Default
        mode: "reduce-overhead" on CUDA (CUDA graphs: one image is launch-bound, ~45k kernel launches
        for 50+50 steps measured on an H200) and "default" on CPU. The first call compiles (slow).
        Compiled stages are for sampling; save checkpoints from uncompiled models."""
        mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        self._lean_if_moved()  # compile the sampling weights (bf16 on CUDA), not weights cast later
        self.prior.net = torch.compile(self.prior.net, mode=mode)
        self.decoder.unet = torch.compile(self.decoder.unet, mode=mode)
        return self

    def lean(self, dtype: Optional[torch.dtype] = None) -> "DALLE2":
        """Cast the networks sampling runs, in place: the prior network and the decoder UNet to `dtype`
        (default bf16 on CUDA, fp16 on GPUs without bf16, float32 elsewhere) and, on CUDA, the UNet to channels_last.
        Cast weights, not per-op autocast: no weight is re-cast at each step. The diffusion arithmetic stays float32
        (step_model hands the networks their inputs in their dtype) and CLIP stays float32 (its text
        encoder runs once per batch). `generate` does this by itself on the first call on a device;
        call it yourself to choose, e.g. `lean(torch.float32)` keeps fp32 on CUDA. Casting to bf16 rounds
        the weights: save or train from a freshly loaded model."""
        dev = self.device
        if dtype is None:  # bf16 where the GPU has it, fp16 where not (as autocast chooses), fp32 off CUDA
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16,
                     "fp32": torch.float32}[resolve_precision(dev, "bf16")]
        self.prior.net.to(dtype)
        fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
        self.decoder.unet.to(dtype=dtype, memory_format=fmt)
        self._lean_device = dev
        return self

    def _lean_if_moved(self) -> None:
        if getattr(self, "_lean_device", None) != self.device:
            self.lean()

    def val_mode(self) -> "DALLE2":
        """Evaluation mode for all three stages (the seed README's name for .eval())."""
        return self.eval()

    # --- text to image ----------------------------------------------------------------------

    def _opt(self, value, name):
        return getattr(self.sampling, name) if value is None else value

    @torch.no_grad()
    def generate(self, texts: str | Sequence[str], n_per_text: int = 1, *, guidance_scale: Optional[float] = None,
                 prior_guidance_scale: Optional[float] = None, steps: Optional[int] = None,
                 prior_steps: Optional[int] = None, sampler: Optional[str] = None, eta: Optional[float] = None,
                 candidates: Optional[int] = None, seed: int | Sequence[int] = 0, batch_size: Optional[int] = None,
                 progress: bool = False, return_embeddings: bool = False,
                 guidance_interval: Optional[Sequence[float]] = None,
                 prior_guidance_interval: Optional[Sequence[float]] = None,
                 image_embeds: Optional[torch.Tensor] = None):
        """Images for each caption, `n_per_text` each (rows: text 0 sample 0, text 0 sample 1, ...).
        Returns float (N, 3, H, W) in [0, 1] (and the (N, E) image embeddings if return_embeddings).
        image_embeds: (N, E) CLIP image embeddings, one per row, to decode (with the captions) instead
        of the prior's samples, e.g. real images' own (`encode_image`): the decoder measured alone.
        Defaults come from the decoder checkpoint's `sampling` config. seed: an int, or one int per image
        (see `image_seeds`); each image draws its noise from its own CPU generators (`image_generators`),
        so its caption, seed and the settings fix it whatever the batch size, the other captions and
        the device (up to float differences). progress: one bar over every prior and decoder step."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("generate() needs at least one caption")
        if n_per_text < 1:
            raise ValueError(f"n_per_text must be >= 1, got {n_per_text}")
        rows = [t for t in texts for _ in range(n_per_text)]
        if image_embeds is not None and (image_embeds.dim() != 2 or len(image_embeds) != len(rows)
                                         or image_embeds.shape[1] != self.clip.embed_dim):
            raise ValueError(f"image_embeds must be ({len(rows)}, {self.clip.embed_dim}): one CLIP image embedding "
                             f"per row (captions x n_per_text), got {tuple(image_embeds.shape)}")
        seeds = image_seeds(rows, seed)
        opts = dict(guidance_scale=guidance_scale, prior_guidance_scale=prior_guidance_scale, steps=steps,
                    prior_steps=prior_steps, sampler=sampler, eta=eta, candidates=candidates,
                    guidance_interval=guidance_interval, prior_guidance_interval=prior_guidance_interval)
        opts = {k: self._opt(v, k) for k, v in opts.items()}
        bs = self._opt(batch_size, "batch_size")
        self._lean_if_moved()
        images, embs = [], []
        batches = range(0, len(rows), bs)
        # Disabled off a terminal (logs, tests) as well as by the flag.
        prior_steps = 0 if image_embeds is not None else opts["prior_steps"]
        bar = tqdm(total=len(batches) * (prior_steps + opts["steps"]), desc="sampling", unit="step",
                   disable=None if progress else True)
        with bar:
            for start in batches:
                gens = [image_generators(c, s) for c, s in zip(rows[start:start + bs], seeds[start:start + bs])]
                given = None if image_embeds is None else image_embeds[start:start + bs].float().to(self.device)
                x, image_emb = self._generate_batch(rows[start:start + bs], gens, opts, lambda i: bar.update(1), given)
                images.append(x.cpu())
                embs.append(image_emb.float().cpu())
        out = torch.cat(images)
        if not torch.isfinite(out).all():  # NaN pixels would be saved as black images without a word
            raise FloatingPointError("sampling produced NaN/inf pixels: "
                                     "check guidance_scale, steps and the checkpoints")
        return (out, torch.cat(embs)) if return_embeddings else out

    def _generate_batch(self, texts, generators, opts: dict, callback=None, image_emb=None):
        """One batch: caption -> CLIP text features -> prior embedding (unless `image_emb` is given) ->
        decoder image. generators: a (prior, decoder) pair of CPU generators per caption; opts: generate's
        resolved options."""
        tokens = self.tokenizer(texts).to(self.device)  # (B, L)
        with autocast(self.device, "bf16"):  # CLIP runs once per batch; the networks are cast (lean)
            text_emb, text_enc, text_mask = self.clip.encode_text_tokens(tokens)
        if image_emb is None:
            image_emb = self.prior.sample(text_emb.float(), text_enc.float(), text_mask, steps=opts["prior_steps"],
                                          sampler=opts["sampler"], eta=opts["eta"],
                                          guidance_scale=opts["prior_guidance_scale"], candidates=opts["candidates"],
                                          generator=[g for g, _ in generators],
                                          guidance_interval=opts["prior_guidance_interval"], callback=callback)
        x = self._decode(image_emb, tokens, guidance_scale=opts["guidance_scale"], steps=opts["steps"],
                         sampler=opts["sampler"], eta=opts["eta"], generator=[g for _, g in generators],
                         guidance_interval=opts["guidance_interval"], callback=callback,
                         text_enc=text_enc, text_mask=text_mask)
        return x, image_emb

    def _decode(self, image_emb, tokens, *, guidance_scale=None, steps=None, sampler=None, eta=None,
                generator=None, noise=None, guidance_interval=None, callback=None, text_enc=None,
                text_mask=None) -> torch.Tensor:
        """Decoder sampling with config defaults; the caption as tokens and CLIP's encodings of them (the
        decoder reads the one it was built for; all None = no caption). Returns (N, 3, H, W) in [0, 1]."""
        x = self.decoder.sample(image_emb, tokens, text_enc=text_enc, text_mask=text_mask,
                                steps=self._opt(steps, "steps"),
                                sampler=self._opt(sampler, "sampler"), eta=self._opt(eta, "eta"),
                                guidance_scale=self._opt(guidance_scale, "guidance_scale"), generator=generator,
                                noise=noise, clip_x0=self.sampling.clip_x0,
                                guidance_interval=self._opt(guidance_interval, "guidance_interval"),
                                callback=callback)
        return ((x.float() + 1) / 2).clamp(0, 1)

    def forward(self, shape=(3, 32, 32), text: str = "", cf_guidance_scale: Optional[float] = None,
                **kwargs) -> torch.Tensor:
        """The seed README's call style: `image = dalle2((3, 32, 32), text="...", cf_guidance_scale=2)`.
        Returns one image (1, 3, H, W) in [0, 1]."""
        if tuple(shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"this decoder makes {self.image_size}x{self.image_size} images, "
                             f"shape {tuple(shape)} asked")
        return self.generate([text], guidance_scale=cf_guidance_scale, **kwargs)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list:
        """(N, 3, H, W) in [0, 1] -> list of PIL images."""
        return [to_pil(x) for x in images]

    # --- image manipulations (paper section 3) ----------------------------------------------

    def _image_input(self, image) -> torch.Tensor:
        """A PIL image, a uint8 (3,H,W)/(N,3,H,W) tensor or a float one in [0, 1] -> float [-1, 1] on device."""
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(square_resize(image.convert("RGB"), self.image_size)).permute(2, 0, 1)
        if image.dim() == 3:
            image = image[None]
        image = to_float(image) if image.dtype == torch.uint8 else image.float() * 2 - 1
        if image.shape[-1] != self.image_size:
            image = F.interpolate(image, size=(self.image_size, self.image_size), mode="bilinear",
                                  antialias=True, align_corners=False)
        return image.to(self.device)

    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        """CLIP image embeddings (N, E) of images (see _image_input for accepted forms)."""
        return self.clip.encode_image(self._image_input(image)).float()

    @torch.no_grad()
    def variations(self, image, n: int = 4, *, eta: float = 1.0, seed: int = 0, **kwargs) -> torch.Tensor:
        """n images that keep what CLIP sees in `image` (section 3.1): decode its CLIP embedding with
        DDIM eta > 0 and no caption. A batch of N images gives N * n rows (image 0's n variations
        first). Returns (N * n, 3, H, W) in [0, 1]."""
        z = self.encode_image(image).repeat_interleave(n, dim=0)  # (N * n, E)
        g = torch.Generator(device=self.device).manual_seed(seed)
        return self._decode(z, None, eta=eta, sampler="ddim", generator=g, **kwargs)

    @torch.no_grad()
    def interpolate(self, image_a, image_b, steps: int = 5, *, seed: int = 0, **kwargs) -> torch.Tensor:
        """Blend two images (section 3.2): slerp between their CLIP embeddings, decoded from the SAME
        noise at every step (DDIM, eta 0), so only the embedding changes. Batches of N images on each
        side blend pair i with its own noise (seeded with seed + i, so pair i is what the single call
        with that seed gives). Returns (N * steps, 3, H, W), pair 0's frames first."""
        za, zb = self.encode_image(image_a), self.encode_image(image_b)  # (N, E) each
        if za.shape[0] != zb.shape[0]:
            raise ValueError(f"interpolate: {za.shape[0]} images on one side and {zb.shape[0]} on the other; "
                             f"give the same number on both sides (pairs)")
        n = za.shape[0]
        theta = torch.linspace(0, 1, steps, device=self.device)[None, :, None]  # (1, steps, 1)
        z = slerp(za[:, None], zb[:, None], theta).reshape(n * steps, -1)  # (N * steps, E)
        s = self.image_size
        noise = torch.cat([torch.randn((1, 3, s, s),
                                       generator=torch.Generator(device=self.device).manual_seed(seed + i),
                                       device=self.device).expand(steps, -1, -1, -1) for i in range(n)])
        return self._decode(z, None, sampler="ddim", eta=0.0, noise=noise.contiguous(), **kwargs)

    @torch.no_grad()
    def text_diff(self, image, from_text: str, to_text: str, amounts: Sequence[float] = (0.0, 0.25, 0.5),
                  **kwargs) -> torch.Tensor:
        """Edit an image towards a text change (section 3.3): z_d = normalize(z_t(to) - z_t(from)), then
        decode slerp(z_i, z_d, amount) from the image's own DDIM-inverted noise (so amount 0 reconstructs
        the image). A batch of N images is edited image by image in one pass. Returns
        (N * len(amounts), 3, H, W) in [0, 1], image 0's edits first."""
        x = self._image_input(image)  # (N, 3, H, W)
        n, a = x.shape[0], len(amounts)
        z_i = self.clip.encode_image(x).float()  # (N, E)
        t = self.clip.encode_text([from_text, to_text]).float()
        z_d = F.normalize(t[1] - t[0], dim=-1)  # (E,)
        theta = torch.tensor(list(amounts), device=self.device, dtype=torch.float32)[None, :, None]  # (1, A, 1)
        z = slerp(z_i[:, None], z_d.expand(n, 1, -1), theta).reshape(n * a, -1)  # (N * A, E)
        steps = self._opt(kwargs.pop("steps", None), "steps")
        noise = self.decoder.diffusion.ddim_invert(self.decoder.unet, x, steps=steps,
                                                   model_kwargs={"image_emb": z_i, "tokens": None})  # (N, 3, H, W)
        noise = noise[:, None].expand(-1, a, -1, -1, -1).reshape(n * a, *noise.shape[1:])
        return self._decode(z, None, sampler="ddim", eta=0.0, steps=steps, noise=noise.contiguous(), **kwargs)
