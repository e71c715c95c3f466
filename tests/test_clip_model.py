"""CLIP model: shapes, normalisation, text pooling / masking, logit-scale clamp, the contrastive loss."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from clip import CLIP, build_clip, caption_labels, contrastive_loss
from dalle2.core.tokenizer import Tokenizer

CAPTIONS = ["a red circle", "a blue square on the left", "a green triangle", "a small yellow star"]
TINY = dict(embed_dim=16, vision_width=32, vision_layers=2, vision_heads=2, patch_size=8,
            text_width=32, text_layers=2, text_heads=2, context_length=16)


def tiny_clip(image_size=32, seed=0, **overrides):
    torch.manual_seed(seed)
    tok = Tokenizer.build(CAPTIONS, context_length=overrides.get("context_length", TINY["context_length"]))
    model = CLIP(vocab_size=tok.vocab_size, image_size=image_size, **{**TINY, **overrides}).eval()
    model.tokenizer = tok
    return model, tok


def images(n, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_unit_norm(size):
    model, tok = tiny_clip(size)
    x, tokens = images(4, size), tok(CAPTIONS)
    img = model.encode_image(x)
    emb, enc, mask = model.encode_text_tokens(tokens)
    assert img.shape == (4, 16) and emb.shape == (4, 16)
    assert enc.shape == (4, tok.context_length, 32) and mask.shape == tokens.shape and mask.dtype == torch.bool
    assert torch.equal(mask, tokens != 0)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    lpi, lpt = model(x, tokens)
    assert lpi.shape == lpt.shape == (4, 4)
    torch.testing.assert_close(lpt, lpi.t())
    torch.testing.assert_close(lpi, model.scale() * img @ emb.t())
    assert model.device == torch.device("cpu")


def test_default_config_builds_for_both_sizes():
    for size in (32, 64):
        model = CLIP(vocab_size=300, image_size=size)
        assert model.visual.pos_embed.shape[0] == (size // 4) ** 2


def test_encode_text_strings_equal_tokens():
    model, tok = tiny_clip()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(CAPTIONS), model.encode_text(tok(CAPTIONS)))
        torch.testing.assert_close(model.encode_text(CAPTIONS[0]), model.encode_text(tok(CAPTIONS[:1])))
    model.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        model.encode_text(CAPTIONS)


def test_padding_invariance():
    model, tok = tiny_clip()
    short, long = tok(CAPTIONS, context_length=8), tok(CAPTIONS)  # same captions, 8 vs 16 positions
    assert torch.equal(long[:, :8], short) and (long[:, 8:] == 0).all()
    with torch.no_grad():
        e_short, enc_short, m_short = model.encode_text_tokens(short)
        e_long, enc_long, m_long = model.encode_text_tokens(long)
    torch.testing.assert_close(e_short, e_long)
    real = m_short  # encodings of the real tokens do not depend on how much PAD follows
    torch.testing.assert_close(enc_short[real], enc_long[:, :8][real])
    # A caption's embedding does not depend on the other (longer or shorter) captions in the batch.
    with torch.no_grad():
        alone = model.encode_text_tokens(long[2:3])[0]
    torch.testing.assert_close(alone, e_long[2:3])


def test_all_pad_row_is_finite():
    model, _ = tiny_clip()
    tokens = torch.zeros(2, 16, dtype=torch.long)
    tokens[0, :3] = torch.tensor([1, 200, 2])
    with torch.no_grad():
        emb, enc, _ = model.encode_text_tokens(tokens)
    assert torch.isfinite(emb).all() and torch.isfinite(enc).all()


def test_text_encoder_is_causal():
    model, tok = tiny_clip()
    tokens = tok(["a blue square on the left"])
    n_real = int((tokens != 0).sum())
    i = 3
    changed = tokens.clone()
    changed[0, i + 1:n_real - 1] = torch.randint(3, tok.vocab_size, (n_real - 2 - i,))  # keep EOS, mask equal
    assert not torch.equal(changed, tokens)
    with torch.no_grad():
        _, enc_a, _ = model.encode_text_tokens(tokens)
        e_b, enc_b, _ = model.encode_text_tokens(changed)
        e_a = model.encode_text(tokens)
    torch.testing.assert_close(enc_a[:, : i + 1], enc_b[:, : i + 1])
    assert not torch.allclose(enc_a[:, i + 1], enc_b[:, i + 1])  # later positions do see the change
    assert not torch.allclose(e_a, e_b)  # and the EOS-pooled embedding too


def test_logit_scale_init_and_clamp():
    model, tok = tiny_clip()
    torch.testing.assert_close(model.scale(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    torch.testing.assert_close(model.scale(), torch.tensor(100.0))
    x, tokens = images(4, 32), tok(CAPTIONS)
    with torch.no_grad():
        lpi, _ = model(x, tokens)
        cos = model.encode_image(x) @ model.encode_text(tokens).t()
    torch.testing.assert_close(lpi, 100.0 * cos)
    assert lpi.abs().max() <= 100.0 + 1e-4


def test_wrong_sizes_raise():
    model, tok = tiny_clip(32)
    with pytest.raises(ValueError, match="32"):
        model.encode_image(images(2, 64))
    with pytest.raises(ValueError):
        model.encode_image(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        CLIP(vocab_size=300, image_size=32, patch_size=5)
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text_tokens(torch.ones(2, 17, dtype=torch.long))


def test_soft_targets_equal_standard_loss_when_labels_distinct():
    torch.manual_seed(0)
    logits = torch.randn(6, 6) * 5
    ref = contrastive_loss(logits)
    torch.testing.assert_close(contrastive_loss(logits, torch.tensor([5, 1, 0, 3, 2, 4])), ref)
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(6))
                      + torch.nn.functional.cross_entropy(logits.t(), torch.arange(6)))
    torch.testing.assert_close(ref, expected)


def test_soft_targets_with_repeated_captions():
    labels = torch.tensor([0, 0, 1])  # images 0 and 1 share a caption
    same = labels[:, None] == labels[None, :]
    # Matching logits equal within the block: the soft loss is stationary there, the one-hot loss still pushes
    # image 0 towards text 0 and away from text 1 (its other true match).
    logits = torch.where(same, 5.0, -5.0).requires_grad_()
    soft = contrastive_loss(logits, labels)
    (g_soft,) = torch.autograd.grad(soft, logits)
    (g_hard,) = torch.autograd.grad(contrastive_loss(logits), logits)
    assert g_soft.abs().max() < 1e-3 and g_hard.abs().max() > 0.1
    # At this optimum the loss equals the mean target entropy: rows 0, 1 have log 2, row 2 has 0.
    torch.testing.assert_close(soft.detach(), torch.tensor(2 * math.log(2) / 3), atol=1e-3, rtol=0)
    # With exactly tied columns (identical captions) both targets give the same value and gradient.
    torch.manual_seed(0)
    img, txt = torch.randn(3, 8), torch.randn(2, 8)
    tied = (img @ txt[[0, 0, 1]].t()).requires_grad_()
    (ga,) = torch.autograd.grad(contrastive_loss(tied, labels), tied)
    (gb,) = torch.autograd.grad(contrastive_loss(tied), tied)
    torch.testing.assert_close(contrastive_loss(tied, labels), contrastive_loss(tied))
    torch.testing.assert_close(ga[:, 0] + ga[:, 1], gb[:, 0] + gb[:, 1])  # gradient wrt the shared text
    torch.testing.assert_close(ga[:, 2], gb[:, 2])
    torch.testing.assert_close(caption_labels(torch.tensor([[1, 5, 2], [1, 6, 2], [1, 5, 2]])),
                               torch.tensor([0, 1, 0]))


def test_loss_decreases_with_adamw():
    model, tok = tiny_clip()
    model.train()
    x = images(8, 32, seed=3)
    tokens = torch.tensor([[1, 3 + i, 3 + (i * 5) % 8, 2] + [0] * 4 for i in range(8)])  # 8 distinct rows
    assert len(caption_labels(tokens).unique()) == 8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = model.loss(x, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * min(losses[0], math.log(8)), losses


def test_build_clip_from_dict_and_dataclass():
    @dataclasses.dataclass
    class ModelCfg:
        embed_dim: int = 16
        vision_width: int = 32
        vision_layers: int = 1
        vision_heads: int = 2
        patch_size: int = 8
        text_width: int = 32
        text_layers: int = 1
        text_heads: int = 2
        context_length: int = 16
        dropout: float = 0.0

    a = build_clip(ModelCfg(), vocab_size=300, image_size=32)
    b = build_clip(dataclasses.asdict(ModelCfg()), vocab_size=300, image_size=64)
    assert a.visual.image_size == 32 and b.visual.image_size == 64
    assert a.text.token_embed.num_embeddings == 300 and a.embed_dim == 16
    with pytest.raises(ValueError, match="vocab_size"):
        build_clip({"vocab_size": 10}, vocab_size=300, image_size=32)


def test_logits_are_float32_under_bf16_autocast():
    # Defect 6: a bf16 matmul rounds logits near the clamp of 100 to steps of 0.5. Under CPU bf16
    # autocast the logits must be float32 and equal the fp32 computation from the same features.
    model, tok = tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # at the clamp, where bf16 rounding is coarsest
        x, tokens = images(8, 32), tok(CAPTIONS * 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, logits_t = model(x, tokens)
            img_feat, txt_feat = model.visual(x), model.text(tokens)[0]  # the same features, bf16
            bf16_logits = model.scale() * (F.normalize(img_feat, dim=-1) @ F.normalize(txt_feat, dim=-1).t())
        assert img_feat.dtype == torch.bfloat16  # autocast is really on for the encoders
        assert logits.dtype == logits_t.dtype == torch.float32
        ref = 100.0 * F.normalize(img_feat.float(), dim=-1) @ F.normalize(txt_feat.float(), dim=-1).t()
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(logits_t, ref.t(), rtol=0, atol=1e-4)
        # the check has teeth: the plain bf16 path is off by far more than the tolerance
        assert bf16_logits.dtype == torch.bfloat16 and (bf16_logits.float() - ref).abs().max() > 1e-2
