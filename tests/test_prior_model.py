"""The diffusion prior (dalle2/prior/model.py): the causal transformer, its condition dropout for
classifier-free guidance, the embedding scaling and the best-of-candidates sampler. Tiny sizes, CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from dalle2.diffusion import GaussianDiffusion, classifier_free_guidance
from dalle2.prior import DiffusionPrior, PriorNetwork

D, TW, L, W = 16, 24, 8, 32


def make_net(**kw):
    torch.manual_seed(0)
    args = dict(embed_dim=D, text_width=TW, context_length=L, width=W, layers=2, heads=4)
    args.update(kw)
    return PriorNetwork(**args)


def make_inputs(n=4, seed=1, length=L):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, D, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    text_emb = F.normalize(torch.randn(n, D, generator=g), dim=-1) * math.sqrt(D)
    text_enc = torch.randn(n, length, TW, generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    text_mask = torch.arange(length)[None] < lengths[:, None]  # (N, L): [BOS .. EOS, PAD ...]
    return x_t, t, dict(text_emb=text_emb, text_enc=text_enc, text_mask=text_mask)


def test_output_shape_and_shorter_sequences():
    net = make_net().eval()
    x_t, t, cond = make_inputs(n=5)
    assert net(x_t, t, **cond).shape == (5, D)
    # A token sequence shorter than context_length is padded (masked) internally.
    x_t, t, cond = make_inputs(n=3, length=5)
    out = net(x_t, t, **cond)
    assert out.shape == (3, D) and torch.isfinite(out).all()


def test_output_depends_on_x_t_text_emb_and_t():
    net = make_net().eval()
    x_t, t, cond = make_inputs()
    ref = net(x_t, t, **cond)
    assert not torch.allclose(net(x_t + 1.0, t, **cond), ref, atol=1e-5)
    assert not torch.allclose(net(x_t, (t + 317) % 1000, **cond), ref, atol=1e-5)
    assert not torch.allclose(net(x_t, t, **{**cond, "text_emb": -cond["text_emb"]}), ref, atol=1e-5)
    enc = cond["text_enc"].clone()
    enc[:, 0] += 1.0  # the first token is always real
    assert not torch.allclose(net(x_t, t, **{**cond, "text_enc": enc}), ref, atol=1e-5)


def full_sequence_forward(net, x_t, t, text_emb, text_enc, text_mask, cond_drop):
    """The prior written the plain way (section 2.2): one causal pass over the whole sequence
    [text tokens (padded to Lc), text embedding, timestep, x_t, query] with the net's own weights."""
    n, length = text_enc.shape[:2]
    tokens = F.pad(net.text_enc_proj(text_enc), (0, 0, 0, L - length))
    mask = F.pad(text_mask, (0, L - length), value=False)
    emb = net.text_emb_proj(text_emb)
    drop = cond_drop[:, None]
    tokens = torch.where(drop[:, :, None], net.null_text_enc.expand_as(tokens), tokens)
    emb = torch.where(drop, net.null_text_emb.expand_as(emb), emb)
    mask = mask | drop
    seq = torch.cat([tokens, emb[:, None], net.time_embed(t)[:, None], net.x_proj(x_t)[:, None],
                     net.query.expand(n, 1, -1)], dim=1) + net.pos_emb  # (N, L + 4, W)
    keys = torch.cat([mask, mask.new_ones(n, 4)], dim=1)
    attn = (keys[:, None, :] & torch.ones(L + 4, L + 4, dtype=torch.bool).tril()) | torch.eye(L + 4, dtype=torch.bool)
    h = net.transformer(seq, mask=attn[:, None])  # (N, L + 4, W)
    return net.out(net.ln_f(h[:, -1])), h


def test_cached_text_prefix_equals_the_full_causal_sequence():
    """The net encodes the text prefix once (prepare_conditioning, a KV cache) and runs only the 3
    step tokens per diffusion step. That must equal one causal pass over the whole sequence, whose
    prefix positions indeed do not depend on x_t (so caching them is exact)."""
    net = make_net(layers=3).eval()
    x_t, t, cond = make_inputs(n=6, length=6)
    cond_drop = torch.tensor([False, True, False, False, True, False])
    ref, h = full_sequence_forward(net, x_t, t, **cond, cond_drop=cond_drop)
    torch.testing.assert_close(net(x_t, t, **cond, cond_drop=cond_drop), ref, atol=1e-5, rtol=1e-5)
    prepared = net.prepare_conditioning(**cond, cond_drop=cond_drop)
    for x in (x_t, x_t + 3.0):  # one prepared prefix serves every step
        torch.testing.assert_close(net(x, t, cond=prepared),
                                   full_sequence_forward(net, x, t, **cond, cond_drop=cond_drop)[0],
                                   atol=1e-5, rtol=1e-5)
    _, h_moved = full_sequence_forward(net, x_t + 3.0, t, **cond, cond_drop=cond_drop)
    torch.testing.assert_close(h[:, :L + 2], h_moved[:, :L + 2])  # text tokens, text embedding, timestep
    assert not torch.allclose(h[:, -1], h_moved[:, -1], atol=1e-5)


def test_padding_positions_are_ignored():
    net = make_net().eval()
    x_t, t, cond = make_inputs(n=6)
    ref = net(x_t, t, **cond)
    enc = cond["text_enc"].clone()
    enc[~cond["text_mask"]] = 100.0 * torch.randn(int((~cond["text_mask"]).sum()), TW)
    torch.testing.assert_close(net(x_t, t, **{**cond, "text_enc": enc}), ref, atol=1e-5, rtol=1e-5)
    # Even an all-padding row stays finite (each position may always attend to itself).
    mask = cond["text_mask"].clone()
    mask[0] = False
    assert torch.isfinite(net(x_t, t, **{**cond, "text_mask": mask})).all()


def test_drop_mask_rate():
    net = make_net(cond_drop_prob=0.1)
    m = net.drop_mask(20000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == (20000,)
    assert abs(m.float().mean().item() - 0.1) < 0.01
    m2 = net.drop_mask(20000, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, m2)  # the generator controls it
    assert not make_net(cond_drop_prob=0.0).drop_mask(1000, "cpu").any()
    assert make_net(cond_drop_prob=1.0).drop_mask(1000, "cpu").all()


def test_dropped_rows_use_nulls_and_ignore_text():
    net = make_net().eval()
    x_t, t, cond = make_inputs()
    drop = torch.tensor([True, False, True, False])
    ref = net(x_t, t, **cond, cond_drop=drop)
    other = dict(text_emb=torch.randn(4, D), text_enc=torch.randn(4, L, TW),
                 text_mask=torch.zeros(4, L, dtype=torch.bool))
    out = net(x_t, t, **other, cond_drop=drop)
    torch.testing.assert_close(out[drop], ref[drop])  # dropped rows: independent of the text
    assert not torch.allclose(out[~drop], ref[~drop], atol=1e-5)  # kept rows: depend on it
    # ...but the unconditional output still depends on x_t, and the nulls are learned parameters.
    assert not torch.allclose(net(x_t + 1.0, t, **cond, cond_drop=drop)[drop], ref[drop], atol=1e-5)
    names = dict(net.named_parameters())
    assert names["null_text_enc"].shape == (L, W) and names["null_text_emb"].shape == (W,)


def test_training_forward_uses_drop_mask(monkeypatch):
    net = make_net(cond_drop_prob=0.5)  # dropout = 0: train/eval differ only by condition dropout
    x_t, t, cond = make_inputs()
    fixed = torch.tensor([False, True, True, False])
    calls = []

    def fake_drop_mask(n, device, generator=None):
        calls.append(n)
        return fixed.clone()

    monkeypatch.setattr(net, "drop_mask", fake_drop_mask)
    net.train()
    out = net(x_t, t, **cond)
    assert calls == [4]
    net.eval()
    torch.testing.assert_close(out, net(x_t, t, **cond, cond_drop=fixed))
    # An explicit cond_drop is used as given, also in training mode.
    net.train()
    torch.testing.assert_close(net(x_t, t, **cond, cond_drop=torch.zeros(4, dtype=torch.bool)),
                               net.eval()(x_t, t, **cond))
    assert calls == [4]


def test_eval_mode_draws_no_randomness(monkeypatch):
    net = make_net(dropout=0.5, cond_drop_prob=0.5).eval()

    def no_drop(*a, **k):
        raise AssertionError("eval mode must not draw condition dropout")

    monkeypatch.setattr(net, "drop_mask", no_drop)
    x_t, t, cond = make_inputs()
    a, b = net(x_t, t, **cond), net(x_t, t, **cond)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, net(x_t, t, **cond, cond_drop=torch.zeros(4, dtype=torch.bool)))


def test_classifier_free_guidance_combines_cond_and_null_outputs():
    """The diffusion's guidance wrapper drives the network's nulls through cond_drop."""
    net = make_net().eval()
    x_t, t, cond = make_inputs()
    out_c = net(x_t, t, **cond)
    out_u = net(x_t, t, **cond, cond_drop=torch.ones(4, dtype=torch.bool))
    guided = classifier_free_guidance(net, 3.0)(x_t, t, **cond)
    torch.testing.assert_close(guided, out_u + 3.0 * (out_c - out_u), atol=1e-5, rtol=1e-5)


# ---- DiffusionPrior ---------------------------------------------------------------------------------


def make_prior(**kw):
    return DiffusionPrior(make_net(**kw), GaussianDiffusion(timesteps=100, objective="x0"))


def clip_like(n, seed=3):
    """Unit-norm CLIP embeddings and token encodings, as the CLIP encoders would give."""
    _, _, cond = make_inputs(n=n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return (F.normalize(torch.randn(n, D, generator=g), dim=-1),
            {**cond, "text_emb": F.normalize(cond["text_emb"], dim=-1)})


def test_scale_unscale_and_diffusion_is_not_a_submodule():
    prior = make_prior()
    e = F.normalize(torch.randn(5, D), dim=-1)
    x = prior.scale(e)
    torch.testing.assert_close(x.norm(dim=-1), torch.full((5,), math.sqrt(D)))
    torch.testing.assert_close(prior.unscale(x), e)
    torch.testing.assert_close(prior.unscale(3.7 * x).norm(dim=-1), torch.ones(5))
    assert isinstance(prior.diffusion, GaussianDiffusion)
    assert all(k.startswith("net.") for k in prior.state_dict())


class FakeDiffusion:
    """Stands in for GaussianDiffusion.sample to control what the prior picks among."""

    def __init__(self, out):
        self.out, self.calls = out, []

    def sample(self, model, shape, **kw):
        self.calls.append((model, shape, kw))
        return self.out.clone()


def test_sample_keeps_candidate_closest_to_text():
    net = make_net()
    n, c = 3, 4
    text_emb = F.normalize(torch.randn(n, D), dim=-1)
    _, _, cond = make_inputs(n=n)
    # Candidate k of caption i: text_emb[i] mixed with noise; caption i's best is index best[i].
    best = torch.tensor([2, 0, 3])
    noise = F.normalize(torch.randn(n, c, D), dim=-1)
    weight = torch.full((n, c), 0.2)
    weight[torch.arange(n), best] = 0.9
    cands = weight[..., None] * text_emb[:, None] + (1 - weight[..., None]) * noise  # (N, c, D)
    fake = FakeDiffusion(7.0 * cands.reshape(n * c, D))  # any scale: unscale re-normalises
    prior = DiffusionPrior(net, fake)
    out = prior.sample(text_emb, cond["text_enc"], cond["text_mask"], candidates=c, steps=5, guidance_scale=2.5)
    torch.testing.assert_close(out, F.normalize(cands[torch.arange(n), best], dim=-1))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(n))
    # One batched call with the conditions repeated per candidate (row i*c + k is caption i).
    (model, shape, kw), = fake.calls
    assert model is net and shape == (n * c, D)
    assert kw["steps"] == 5 and kw["guidance_scale"] == 2.5
    torch.testing.assert_close(kw["model_kwargs"]["text_emb"], prior.scale(text_emb).repeat_interleave(c, 0))
    assert torch.equal(kw["model_kwargs"]["text_mask"], cond["text_mask"].repeat_interleave(c, 0))
    assert kw["model_kwargs"]["text_enc"].shape == (n * c, L, TW)


def test_sample_is_unit_norm_deterministic_and_guidance_runs():
    prior = make_prior()
    prior.train()  # sample() must switch to eval itself (no random condition dropout) and restore
    _, cond = clip_like(3)
    args = (cond["text_emb"], cond["text_enc"], cond["text_mask"])
    a = prior.sample(*args, steps=4, generator=torch.Generator().manual_seed(0))
    assert prior.net.training
    assert a.shape == (3, D)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))
    b = prior.sample(*args, steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = prior.sample(*args, steps=4, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)
    d = prior.sample(*args, steps=4, sampler="ddpm", guidance_scale=3.0, candidates=3,
                     generator=torch.Generator().manual_seed(0))
    assert d.shape == (3, D) and torch.isfinite(d).all()
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(3))


def test_loss_falls_on_synthetic_mapping():
    """Fit image_emb = normalize(A @ text_emb) with a tiny prior: the x0 loss must clearly fall."""
    torch.manual_seed(0)
    prior = make_prior(layers=2, width=32, cond_drop_prob=0.1)
    A = torch.randn(D, D)
    n = 64
    image_emb, cond = clip_like(n, seed=5)
    image_emb = F.normalize(cond["text_emb"] @ A.T, dim=-1)

    def eval_loss():
        prior.eval()
        with torch.no_grad():
            return prior.loss(image_emb, **cond, generator=torch.Generator().manual_seed(123)).item()

    before = eval_loss()
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    prior.train()
    for _ in range(60):
        loss = prior.loss(image_emb, **cond, generator=g)
        assert loss.dim() == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        prior.train()
    after = eval_loss()
    assert after < 0.25 * before, (before, after)  # measured ~1.2 -> ~0.05


def test_bad_inputs_raise_clear_errors():
    prior = make_prior()
    net = prior.net.eval()
    image_emb, cond = clip_like(2)
    x_t, t, _ = make_inputs(n=2)
    te, enc, mask = cond["text_emb"], cond["text_enc"], cond["text_mask"]
    cases = [
        (dict(text_emb=te[:0], text_enc=enc[:0], text_mask=mask[:0]), "non-empty"),
        (dict(text_emb=torch.randn(2, D + 1), text_enc=enc, text_mask=mask), f"embed_dim={D}, got {D + 1}"),
        (dict(text_emb=te, text_enc=torch.randn(2, L, TW - 1), text_mask=mask), f"text_width={TW}, got {TW - 1}"),
        (dict(text_emb=te, text_enc=torch.randn(2, L + 3, TW), text_mask=torch.ones(2, L + 3, dtype=torch.bool)),
         f"context_length={L}, got {L + 3}"),
        (dict(text_emb=te, text_enc=enc, text_mask=mask[:, :3]), "text_mask"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            prior.sample(**kw, steps=2)
        with pytest.raises(ValueError, match=msg):
            prior.loss(image_emb[: kw["text_emb"].shape[0]], **kw)
        if kw["text_emb"].shape[0] == 2:
            with pytest.raises(ValueError, match=msg):
                net(x_t, t, **kw)
    with pytest.raises(ValueError, match="image_emb"):
        prior.loss(torch.randn(2, D - 1), **cond)
    with pytest.raises(ValueError, match="x_t"):
        net(torch.randn(2, D + 2), t, **cond)
    with pytest.raises(ValueError, match="candidates"):
        prior.sample(**cond, candidates=0)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        make_net(cond_drop_prob=1.5)


def test_default_size_builds():
    net = PriorNetwork(embed_dim=256, text_width=256, context_length=16)
    n_params = sum(p.numel() for p in net.parameters())
    assert 7e6 < n_params < 9e6  # the recipe's 4 layers x width 384 (~7.1M) + projections and embeddings
