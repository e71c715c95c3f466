"""The causal text encoder shared by CLIP's text tower and the decoder's own caption encoder
(dalle2/core/layers.py CausalTextEncoder): against the two classes it replaced (copied below as they were), the
same parameter init under a seed, the same state-dict keys, the same outputs for the same weights, and old
decoder weights loading through every path (checkpoint, export, --init-from)."""
import copy
import hashlib
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save

import clip.model as clip_model
import dalle2.decoder.model as unet_module
from clip.model import CLIP
from dalle2 import pretrained
from dalle2.core.checkpoint import FORMAT, atomic_torch_save, state_hash
from dalle2.core.config import apply_overrides, load_config
from dalle2.core.layers import CausalTextEncoder, Transformer
from dalle2.core.tokenizer import Tokenizer
from dalle2.decoder import Decoder, UNet
from dalle2.decoder.model import build_decoder

# --- the two classes as they were before the shared one (clip/model.py, dalle2/decoder/model.py) ----------

class OldTextTransformer(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 embed_dim: int, dropout: float = 0.0):
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = Transformer(width, layers, heads, dropout=dropout)
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, tokens):
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"expected tokens of shape (N, L) with L <= context_length={self.context_length}, "
                             f"got {tuple(tokens.shape)}")
        n, length = tokens.shape
        mask = tokens != 0
        x = self.token_embed(tokens) + self.pos_embed[:length]
        first = torch.arange(length, device=tokens.device) == 0
        x = self.transformer(x, mask=mask | first, causal=True)
        enc = self.ln_final(x)
        eos = (mask.sum(-1) - 1).clamp(min=0)
        feature = self.proj(enc[torch.arange(n, device=tokens.device), eos])
        return feature, enc, mask


class OldTextEncoder(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, tokens):
        L = tokens.shape[1]
        mask = (tokens != 0) | (torch.arange(L, device=tokens.device) == 0)
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x, mask=mask, causal=True))
        return x, mask


CLIP_KW = dict(vocab_size=40, image_size=16, embed_dim=16, vision_width=16, vision_layers=1, vision_heads=2,
               patch_size=8, text_width=32, text_layers=2, text_heads=2, context_length=12)
UNET_KW = dict(image_size=16, embed_dim=16, vocab_size=40, context_length=12, channels=16, channel_mult=[1, 2],
               num_res_blocks=1, attention_resolutions=[8], head_channels=16, text_encoder="own", text_width=32,
               text_layers=2, text_heads=2)


def built(cls, seed, old, monkeypatch, **kw):
    """cls(**kw) under torch.manual_seed(seed), with the text encoder class of before when `old`;
    returns the model and the global RNG state after construction."""
    with monkeypatch.context() as m:
        if old:
            m.setattr(clip_model, "TextTransformer", OldTextTransformer)
            m.setattr(unet_module, "TextEncoder", OldTextEncoder)
        torch.manual_seed(seed)
        model = cls(**kw)
        return model, torch.get_rng_state()


def perturb(model, seed=5, scale=0.05):
    """Move every parameter off its init (zero-initialised output layers would hide the rest)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def captions(n=4, length=12, vocab=40, seed=0):
    """Rows of different lengths, the last one all PAD (every position masked but position 0)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, length, dtype=torch.long)
    for i, real in enumerate([length, 5, 2, 0][:n]):
        tokens[i, :real] = torch.randint(1, vocab, (real,), generator=g)
    return tokens


def unet_inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    emb = nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1)
    return x, t, emb, captions(n)


def assert_same_state(new: dict, old: dict):
    """The same keys in the same order, every tensor bit for bit."""
    assert list(new) == list(old)
    for k in old:
        assert new[k].dtype == old[k].dtype and torch.equal(new[k], old[k]), k


@pytest.mark.parametrize("cls,kw", [(CLIP, CLIP_KW), (UNet, UNET_KW)], ids=["clip", "decoder"])
def test_init_under_a_seed_is_unchanged(cls, kw, monkeypatch):
    """Same draws in the same order: byte-identical parameters, the same keys, and the RNG left where the
    old code left it (so everything drawn after the model is built is unchanged too)."""
    old, old_rng = built(cls, 0, True, monkeypatch, **kw)
    new, new_rng = built(cls, 0, False, monkeypatch, **kw)
    assert_same_state(new.state_dict(), old.state_dict())
    assert torch.equal(new_rng, old_rng)
    # the two inits differ where they did before: CLIP re-draws its positions, the decoder's start at 0.01 std
    text = new.text if cls is CLIP else new.text_encoder
    assert isinstance(text, CausalTextEncoder)
    assert 0.005 < text.pos_embed.std().item() < (0.03 if cls is CLIP else 0.015)


def test_clip_keeps_its_keys_and_gives_the_same_outputs_for_old_weights(monkeypatch):
    old, _ = built(CLIP, 1, True, monkeypatch, **CLIP_KW)
    old = perturb(old).eval()
    new, _ = built(CLIP, 2, False, monkeypatch, **CLIP_KW)
    new.eval()
    assert [k for k in new.state_dict() if k.startswith("text.")][:2] == ["text.pos_embed", "text.token_embed.weight"]
    new.load_state_dict(old.state_dict(), strict=True)
    tokens = captions()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for a, b in zip(new.encode_text_tokens(tokens), old.encode_text_tokens(tokens)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert torch.equal(new.text(tokens)[0], old.text(tokens)[0])  # unnormalised feature, as the loss sees it
        assert torch.equal(new(images, tokens)[0], old(images, tokens)[0])
    assert new.encode_text_tokens(tokens)[2][3].sum() == 0  # CLIP's mask stays "real tokens only"
    with pytest.raises(ValueError, match=r"L <= context_length=12, got \(1, 13\)"):
        new.encode_text_tokens(torch.ones(1, 13, dtype=torch.long))


def test_decoder_old_state_dict_loads_strict_and_gives_the_same_outputs(monkeypatch):
    old, _ = built(UNet, 1, True, monkeypatch, **UNET_KW)
    old = perturb(old).eval()
    new, _ = built(UNet, 2, False, monkeypatch, **UNET_KW)
    new.eval()
    old_state = old.state_dict()
    assert "text_encoder.token_embedding.weight" in old_state and "text_encoder.positional_embedding" in old_state
    new.load_state_dict(old_state, strict=True)
    assert torch.equal(new.text_encoder.pos_embed, old.text_encoder.positional_embedding)
    assert torch.equal(new.text_encoder.token_embed.weight, old.text_encoder.token_embedding.weight)
    assert_same_state(new.state_dict(), old_state)  # and it writes the same keys back
    x, t, emb, tokens = unet_inputs()
    with torch.no_grad():
        for a, b in zip(new.text_encoder(tokens), old.text_encoder(tokens)):
            assert torch.equal(a, b)
        assert torch.equal(new(x, t, image_emb=emb, tokens=tokens), old(x, t, image_emb=emb, tokens=tokens))


def test_decoder_key_map_survives_a_copy_and_accepts_attribute_names(monkeypatch):
    """EMA is a deepcopy: it must write and read the same keys; a state dict named after the attributes
    (e.g. collected from named_parameters) loads too."""
    model = perturb(built(UNet, 1, False, monkeypatch, **UNET_KW)[0])
    ema = copy.deepcopy(model)
    assert_same_state(ema.state_dict(), model.state_dict())
    fresh = built(UNet, 2, False, monkeypatch, **UNET_KW)[0]
    fresh.load_state_dict(ema.state_dict(), strict=True)
    assert_same_state(fresh.state_dict(), model.state_dict())
    by_attribute = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert "text_encoder.pos_embed" in by_attribute
    fresh = built(UNet, 3, False, monkeypatch, **UNET_KW)[0]
    fresh.load_state_dict(by_attribute, strict=True)
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_old_decoder_weights_load_through_checkpoint_export_and_init_from(tmp_path, monkeypatch):
    """A decoder (text_encoder 'own') saved by the old code loads with Decoder.from_checkpoint, from an
    export (the stage loader from_pretrained uses) and with --init-from's load_stage_weights + init_from."""
    cfg = apply_overrides(load_config(preset="tiny"), ["decoder.model.text_encoder=own"])
    tokenizer = Tokenizer(["red", "blue", "circle", "square", "a"], context_length=cfg.clip.model.context_length)
    with monkeypatch.context() as m:
        m.setattr(unet_module, "TextEncoder", OldTextEncoder)
        torch.manual_seed(0)
        old = build_decoder(cfg, tokenizer.vocab_size)
    perturb(old.unet)
    old.eval()
    state = old.state_dict()
    assert "unet.text_encoder.positional_embedding" in state
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
    t = torch.tensor([3, 700])
    emb = nn.functional.normalize(torch.randn(2, cfg.clip.model.embed_dim, generator=g), dim=-1)
    tokens = tokenizer(["a red circle", "blue square"])
    with torch.no_grad():
        want = old.unet(x, t, image_emb=emb, tokens=tokens)

    def output(decoder):
        with torch.no_grad():
            return decoder.eval().unet(x, t, image_emb=emb, tokens=tokens)

    # 1. a checkpoint (dalle2/core/checkpoint.py model_from_checkpoint)
    path = tmp_path / "decoder.pt"
    atomic_torch_save({"stage": "decoder", "format": FORMAT, "step": 7, "config": cfg.to_dict(),
                       "tokenizer": tokenizer.state_dict(), "model": state, "extra": {}}, path)
    loaded = Decoder.from_checkpoint(path)
    assert torch.equal(output(loaded), want)
    assert loaded.checkpoint_hash == state_hash(state) == state_hash(loaded.state_dict())

    # 2. an export (dalle2/pretrained.py: what from_pretrained does for each stage)
    folder = tmp_path / "export"
    (folder / "decoder").mkdir(parents=True)
    blob = save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt", "stage": "decoder"})
    (folder / "decoder" / "model.safetensors").write_bytes(blob)
    (folder / "decoder" / "config.json").write_text(json.dumps(cfg.to_dict()))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer.state_dict()))
    entry = {"clip_hash": None, "step": 7, "extra": {}, "sha256": hashlib.sha256(blob).hexdigest()}
    (folder / "model_index.json").write_text(json.dumps(
        {"format": pretrained.FORMAT_NAME, "format_version": pretrained.FORMAT_VERSION,
         "stages": {s: entry for s in pretrained.STAGES}}))
    assert torch.equal(output(pretrained._load_stage(folder, "decoder", entry, tokenizer)), want)

    # 3. --init-from, from the export and from the checkpoint
    for source in (folder, path):
        torch.manual_seed(1)
        fresh = build_decoder(cfg, tokenizer.vocab_size)
        pretrained.init_from(fresh, source, "decoder", cfg.to_dict()["decoder"]["model"], tokenizer)
        assert torch.equal(output(fresh), want)
