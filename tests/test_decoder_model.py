"""The decoder UNet (dalle2/decoder/model.py): shapes, zero init, GroupNorm-only, CFG dropout, padding."""
import pytest
import torch
import torch.nn as nn

from dalle2.decoder import Decoder, UNet
from dalle2.decoder.model import ContextAttentionBlock

TINY = dict(embed_dim=16, vocab_size=50, context_length=16, channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[8], head_channels=16, text_encoder="own", text_width=32, text_layers=1,
            text_heads=2)


def make_unet(image_size=16, **kw):
    torch.manual_seed(0)
    return UNet(image_size=image_size, **{**TINY, **kw})


def perturb(model, scale=0.05):
    """Move every parameter off its init (zero-initialised layers would hide everything downstream)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def inputs(n, image_size=16, seed=0, length=16, real=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, image_size, image_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    emb = nn.functional.normalize(torch.randn(n, TINY["embed_dim"], generator=g), dim=-1)
    tokens = torch.zeros(n, length, dtype=torch.long)
    tokens[:, :real] = torch.randint(1, TINY["vocab_size"], (n, real), generator=g)
    return x, t, emb, tokens


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only add contention (30x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def model():
    return perturb(make_unet()).eval()


@pytest.mark.parametrize("size", [16, 32])
def test_output_shape(size):
    m = make_unet(size, attention_resolutions=[size // 2]).eval()
    x, t, emb, tok = inputs(2, size)
    assert m(x, t, image_emb=emb, tokens=tok).shape == (2, 3, size, size)


def test_patch_size_2_runs_the_body_at_half_the_side():
    m = perturb(make_unet(16, patch_size=2, attention_resolutions=[4])).eval()
    assert m.conv_in.in_channels == 12 and m.out[-1].out_channels == 12
    sides = []
    m.down[0].register_forward_hook(lambda mod, args, out: sides.append(out.shape[-1]))
    x, t, emb, tok = inputs(2, 16)
    x.requires_grad_(True)
    y = m(x, t, image_emb=emb, tokens=tok)
    assert y.shape == (2, 3, 16, 16) and sides == [8]
    y[0].sum().backward()  # every pixel of image 0 reaches the output, and nothing of image 1 does
    assert (x.grad[0] != 0).all() and (x.grad[1] == 0).all()


def test_patch_size_errors_name_the_key():
    with pytest.raises(ValueError, match="decoder.model.patch_size: 3 does not divide"):
        make_unet(16, patch_size=3)
    with pytest.raises(ValueError, match="attention_resolutions.*with patch_size 2"):
        make_unet(16, patch_size=2, attention_resolutions=[16])


def test_no_batchnorm_and_groupnorm_present():
    m = make_unet(16)
    mods = list(m.modules())
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in mods)
    assert sum(isinstance(mod, nn.GroupNorm) for mod in mods) > 5


def test_output_is_exactly_zero_at_init():
    m = make_unet(16).train()
    x, t, emb, tok = inputs(3)
    assert torch.equal(m(x, t, image_emb=emb, tokens=tok), torch.zeros(3, 3, 16, 16))


def test_drop_mask_rates_and_independence():
    m = make_unet(16)
    clip, text = m.drop_masks(20000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert clip.dtype == torch.bool and clip.shape == (20000,)
    assert abs(clip.float().mean() - 0.1) < 0.01
    assert abs(text.float().mean() - 0.5) < 0.015
    assert abs((clip & text).float().mean() - 0.05) < 0.008  # independent: joint = product
    assert not torch.equal(clip, text)


def test_forward_uses_independent_drop_masks(monkeypatch):
    """Training forward: a CLIP-only drop uses the learned null embedding but keeps the caption."""
    m = perturb(make_unet(16, dropout=0.0))
    x, t, emb, tok = inputs(4)
    x2, t2, emb2, tok2 = inputs(4, seed=1)
    m.eval()
    with torch.no_grad():
        expected = m(x, t, image_emb=m.null_image_emb.expand(4, -1), tokens=tok)
        m.train()
        monkeypatch.setattr(m, "drop_masks", lambda n, device, generator=None: (torch.ones(n, dtype=torch.bool),
                                                                                 torch.zeros(n, dtype=torch.bool)))
        got = m(x, t, image_emb=emb, tokens=tok)
        got_other_caption = m(x, t, image_emb=emb, tokens=tok2)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, got_other_caption)  # the caption still matters when only CLIP is dropped
    # caption-only drop: output no longer depends on tokens, still on the CLIP embedding
    monkeypatch.setattr(m, "drop_masks", lambda n, device, generator=None: (torch.zeros(n, dtype=torch.bool),
                                                                             torch.ones(n, dtype=torch.bool)))
    with torch.no_grad():
        a = m(x, t, image_emb=emb, tokens=tok)
        b = m(x, t, image_emb=emb, tokens=tok2)
        c = m(x, t, image_emb=emb2, tokens=tok)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_cond_drop_rows_ignore_conditions(model):
    x, t, emb, tok = inputs(4)
    _, _, emb2, tok2 = inputs(4, seed=1, real=9)
    drop = torch.tensor([True, False, True, False])
    with torch.no_grad():
        a = model(x, t, image_emb=emb, tokens=tok, cond_drop=drop)
        b = model(x, t, image_emb=emb2, tokens=tok2, cond_drop=drop)
    torch.testing.assert_close(a[drop], b[drop])
    assert not torch.allclose(a[~drop], b[~drop], atol=1e-4)


def test_conditions_matter(model):
    x, t, emb, tok = inputs(2)
    _, _, emb2, tok2 = inputs(2, seed=1)
    with torch.no_grad():
        base = model(x, t, image_emb=emb, tokens=tok)
        assert not torch.allclose(base, model(x, t, image_emb=emb2, tokens=tok), atol=1e-4)
        assert not torch.allclose(base, model(x, t, image_emb=emb, tokens=tok2), atol=1e-4)
        assert not torch.allclose(base, model(x, t.flip(0) + 1, image_emb=emb, tokens=tok), atol=1e-4)


def test_eval_deterministic_train_stochastic(model):
    x, t, emb, tok = inputs(4)
    with torch.no_grad():
        assert torch.equal(model(x, t, image_emb=emb, tokens=tok), model(x, t, image_emb=emb, tokens=tok))
        model.train()
        assert not torch.equal(model(x, t, image_emb=emb, tokens=tok), model(x, t, image_emb=emb, tokens=tok))


def test_batch_independence(model):
    x, t, emb, tok = inputs(4)
    with torch.no_grad():
        full = model(x, t, image_emb=emb, tokens=tok)
        one = model(x[2:3], t[2:3], image_emb=emb[2:3], tokens=tok[2:3])
    torch.testing.assert_close(one, full[2:3], atol=1e-5, rtol=1e-4)


def test_padding_invariance(model):
    x, t, emb, tok = inputs(2, length=16, real=5)
    with torch.no_grad():
        full = model(x, t, image_emb=emb, tokens=tok)
        short = model(x, t, image_emb=emb, tokens=tok[:, :8])  # same caption, fewer trailing pads
        torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-4)
        # PAD positions' features (here: their position embeddings) must be masked out everywhere
        pos = model.text_encoder.pos_embed
        pos[5:] += torch.randn(pos[5:].shape)
        torch.testing.assert_close(model(x, t, image_emb=emb, tokens=tok), full, atol=1e-5, rtol=1e-4)
        pos[:5] += torch.randn(pos[:5].shape)  # real positions do matter
        assert not torch.allclose(model(x, t, image_emb=emb, tokens=tok), full, atol=1e-4)


def test_prepared_conditioning_equals_the_plain_forward(model):
    """What a sampler computes once per sample (caption encoder, CLIP projections, every attention
    block's context keys/values) gives the same output as the plain forward, at any x_t and t."""
    x, t, emb, tok = inputs(4)
    drop = torch.tensor([False, True, False, False])
    for tokens in (tok, None):
        cond = model.prepare_conditioning(image_emb=emb, tokens=tokens, cond_drop=drop)
        # one context per attention block, under the name of the stage that holds it in the module tree
        holders = {name.rpartition(".attn")[0] for name, m in model.named_modules()
                   if isinstance(m, ContextAttentionBlock)}
        assert set(cond["ctx"]) == holders and len(holders) >= 2
        for x_t, t_ in ((x, t), (x * 0.5 + 1, (t + 100) % 1000)):
            torch.testing.assert_close(model(x_t, t_, cond=cond),
                                       model(x_t, t_, image_emb=emb, tokens=tokens, cond_drop=drop))
    # Each attention block is handed the keys/values of its OWN context projection.
    _, context, context_mask = model.condition(emb, tok, drop, drop)
    seen = []
    blocks = [m for m in model.modules() if isinstance(m, ContextAttentionBlock)]
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append((m, args[1]))) for b in blocks]
    model(x, t, image_emb=emb, tokens=tok, cond_drop=drop)
    for h in hooks:
        h.remove()
    assert len(seen) == len(blocks)
    for block, (k, v, mask) in seen:
        k_ref, v_ref, mask_ref = block.context_kv(context, context_mask)
        torch.testing.assert_close(k, k_ref)
        torch.testing.assert_close(v, v_ref)
        assert torch.equal(mask, mask_ref) and mask.shape[1] == context.shape[1] + block.resolution ** 2
    with pytest.raises(ValueError, match="image_emb"):
        model(x, t)


def test_autocast_bfloat16(model):
    x, t, emb, tok = inputs(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x.to(memory_format=torch.channels_last), t, image_emb=emb, tokens=tok)
    assert y.shape == (2, 3, 16, 16) and torch.isfinite(y).all()


@pytest.mark.parametrize("bad", [
    dict(image_size=18),                           # not divisible by 2**(len(channel_mult)-1)
    dict(attention_resolutions=[4]),               # 16px with 2 levels reaches 16 and 8 only
    dict(channels=30),                             # not divisible by its GroupNorm groups
    dict(head_channels=24),                        # attention width 64 not divisible
    dict(text_heads=3),                            # text_width 32 not divisible
    dict(clip_drop_prob=1.5),
    dict(channel_mult=[]),
])
def test_config_errors(bad):
    kw = dict(TINY, image_size=16)
    kw.update(bad)
    with pytest.raises(ValueError):
        UNet(**kw)


def test_tokens_longer_than_context_raise(model):
    x, t, emb, _ = inputs(1)
    with pytest.raises(ValueError):
        model(x, t, image_emb=emb, tokens=torch.ones(1, 17, dtype=torch.long))


# ---------------- with the real diffusion process ----------------

def make_decoder(image_size=8, patch_size=1):
    # 8px keeps these CPU trainings/samplings to a few seconds
    diffusion = pytest.importorskip("dalle2.diffusion")
    unet = make_unet(image_size, dropout=0.0, attention_resolutions=[4 // patch_size], patch_size=patch_size)
    return Decoder(unet, diffusion.GaussianDiffusion())


def test_decoder_has_only_unet_state():
    dec = make_decoder()
    assert all(k.startswith("unet.") for k in dec.state_dict())


@pytest.mark.parametrize("patch_size", [1, 2])
def test_decoder_loss_falls(patch_size):
    dec = make_decoder(patch_size=patch_size)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    _, _, emb, tok = inputs(4)
    opt = torch.optim.Adam(dec.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        loss = dec.loss(images, emb, tok, generator=torch.Generator().manual_seed(step % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_decoder_sample_shape_range_determinism():
    dec = make_decoder()
    perturb(dec.unet).train()  # sample() must switch to eval itself and restore the mode
    _, _, emb, tok = inputs(2)
    a = dec.sample(emb, tok, steps=4, generator=torch.Generator().manual_seed(0))
    b = dec.sample(emb, tok, steps=4, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 8, 8)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert dec.unet.training


def test_clip_and_caption_conditioning_start_at_the_same_scale():
    # A unit-norm CLIP embedding of width E has coordinates ~1/sqrt(E); without rescaling, its context
    # tokens and its timestep-embedding term came out ~20x smaller than the caption's (rms 0.05 vs 1).
    unet = UNet(image_size=16, **{**TINY, "embed_dim": 256, "text_width": 64})
    n = 32
    g = torch.Generator().manual_seed(0)
    emb = nn.functional.normalize(torch.randn(n, 256, generator=g), dim=-1)
    tokens = torch.randint(1, TINY["vocab_size"], (n, 10), generator=g)
    keep = torch.zeros(n, dtype=torch.bool)
    cond_emb, context, mask = unet.condition(emb, tokens, keep, keep)
    rms = lambda x: x.pow(2).mean().sqrt().item()
    clip_tokens, text_tokens = context[:, :unet.clip_tokens], context[:, unet.clip_tokens:unet.clip_tokens + 10]
    assert 0.5 < rms(clip_tokens) / rms(text_tokens) < 2.0
    text, tmask = unet.text_encoder(tokens)
    clip_term = unet.clip_to_emb(emb * unet.clip_scale)
    text_term = unet.text_to_emb(text[:, -1])
    assert 0.5 < rms(clip_term) / rms(text_term) < 2.0


def clip_text_unet():
    torch.manual_seed(0)
    return perturb(UNet(image_size=16, **{**TINY, "text_encoder": "clip", "clip_text_width": 24})).eval()


def test_clip_text_encodings_as_the_caption_context():
    # text_encoder "clip": no text tower of its own; the caption context is CLIP's per-token encodings
    unet = clip_text_unet()
    assert not hasattr(unet, "text_encoder") and sum(p.numel() for p in unet.text_in.parameters()) < 2000
    x, t, emb, _ = inputs(3)
    g = torch.Generator().manual_seed(5)
    enc, enc2 = torch.randn(3, 7, 24, generator=g), torch.randn(3, 7, 24, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    out = unet(x, t, image_emb=emb, text_enc=enc, text_mask=mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, unet(x, t, image_emb=emb, text_enc=enc2, text_mask=mask))  # the caption matters
    cond = unet.prepare_conditioning(image_emb=emb, text_enc=enc, text_mask=mask)
    assert torch.allclose(unet(x, t, cond=cond), out, atol=1e-6)
    # padding positions (mask False) do not change the output
    padded = torch.cat([enc, torch.randn(3, 3, 24, generator=g)], 1)
    pmask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], 1)
    assert torch.allclose(unet(x, t, image_emb=emb, text_enc=padded, text_mask=pmask), out, atol=1e-5)
    # no caption at all is the learned null, the same as dropping the caption
    null = unet(x, t, image_emb=emb)
    assert torch.isfinite(null).all() and not torch.allclose(null, out)
    with pytest.raises(ValueError, match="text_enc and text_mask"):
        unet(x, t, image_emb=emb, tokens=torch.ones(3, 5, dtype=torch.long))


def test_decoder_loss_and_sample_pick_the_inputs_their_unet_reads():
    from dalle2.diffusion import GaussianDiffusion
    own = Decoder(make_unet(), GaussianDiffusion(timesteps=20, objective="v"))
    clip = Decoder(clip_text_unet(), GaussianDiffusion(timesteps=20, objective="v"))
    x, _, emb, tokens = inputs(2)
    enc, mask = torch.randn(2, 16, 24), torch.ones(2, 16, dtype=torch.bool)
    for dec in (own, clip):
        loss = dec.loss(x.clamp(-1, 1), emb, tokens=tokens, text_enc=enc, text_mask=mask)
        assert loss.dim() == 0 and torch.isfinite(loss)
        img = dec.sample(emb, tokens, text_enc=enc, text_mask=mask, steps=2, generator=torch.Generator().manual_seed(0))
        assert img.shape == (2, 3, 16, 16)
