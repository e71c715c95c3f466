"""The tokenizer: any UTF-8 text, no crash on unseen words, deterministic, truncation warns."""
import functools

import pytest
import torch

from dalle2.core.tokenizer import Tokenizer

CAPTIONS = ["a large gold pentagon and the small navy square", "an orange circle",
            "a small teal triangle at the bottom right"]


def test_round_trip_and_layout():
    tok = Tokenizer.build(CAPTIONS, context_length=16)
    tokens = tok(CAPTIONS)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long
    for row, text in zip(tokens, CAPTIONS):
        n = int((row != tok.PAD).sum())
        assert row[0] == tok.BOS and row[n - 1] == tok.EOS and (row[n:] == tok.PAD).all()
        assert tok.decode(row[1:]) == text
    # known words are single tokens: the shapes vocabulary gives short sequences
    assert len(tok.encode("an orange circle")) == 3


def test_unseen_words_and_any_utf8_never_fail():
    tok = Tokenizer.build(CAPTIONS, context_length=64)
    for text in ["a purple hexagon", "ünïcödé 🐱 emoji", "Mixed CASE, punctuation!", "", "   "]:
        ids = tok.encode(text)
        assert all(0 < i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == " ".join(text.lower().split()).replace(",", " ,").replace("!", " !")
    assert tok.encode("A  Large GOLD") == tok.encode("a large gold")


def test_deterministic_and_order_independent():
    a = Tokenizer.build(CAPTIONS)
    b = Tokenizer.build(list(reversed(CAPTIONS)))
    assert a == b and torch.equal(a(CAPTIONS), b(CAPTIONS))


def test_truncation_warns_and_keeps_eos():
    tok = Tokenizer.build(CAPTIONS, context_length=6)
    with pytest.warns(UserWarning, match="truncated"):
        tokens = tok(["a large gold pentagon and the small navy square"])
    assert tokens[0, 0] == tok.BOS and tokens[0, -1] == tok.EOS and (tokens != 0).all()


def test_state_dict_round_trip_is_plain_data(tmp_path):
    tok = Tokenizer.build(CAPTIONS, context_length=20)
    path = tmp_path / "tok.pt"
    torch.save({"tokenizer": tok.state_dict()}, path)
    loaded = Tokenizer.from_state_dict(torch.load(path, weights_only=True)["tokenizer"])
    assert loaded == tok and torch.equal(loaded(CAPTIONS), tok(CAPTIONS))
    with pytest.raises(ValueError):
        Tokenizer.from_state_dict({"words": []})


@functools.lru_cache(maxsize=None)
def shapes_captions(variant, n=3000):
    from data.shapes import sample_scene, split_rng
    captions = []
    for split, allow_holdout in (("train", False), ("test", True)):
        rng = split_rng(0, split)
        captions += [sample_scene(rng, variant, allow_holdout)["caption"] for _ in range(n)]
    return tuple(captions)


@pytest.mark.parametrize("preset", ["shapes32", "positions", "shapes64", "tiny"])
def test_shapes_context_length_fits_every_caption_and_prompt(preset):
    # Defect 5: context_length is sized to the data (16; longest caption 11 tokens), and the
    # evaluation's prompts fit too with the vocabulary clip/train.py builds for shapes.
    from clip.train import check_caption_lengths, vocabulary_texts
    from dalle2.core.config import load_config
    from dalle2.evaluation.faithfulness import prompt_sets
    cfg = load_config(preset=preset)
    assert cfg.clip.model.context_length == 16
    captions = list(shapes_captions("objects") + shapes_captions("positions"))
    tok = Tokenizer.build(vocabulary_texts(cfg.data, captions), cfg.clip.model.context_length)
    assert check_caption_lengths(tok, captions) <= 12  # 11 measured on 20k + 20k; a margin of >= 4
    prompts = [p for ps in prompt_sets().values() for p in ps]
    assert max(len(tok.encode(p)) + 2 for p in prompts) <= 16
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is truncated
        tok(captions[:200] + prompts)


def test_caption_over_the_context_length_warns_and_is_truncated(capsys):
    from clip.train import check_caption_lengths
    tok = Tokenizer.build(CAPTIONS, context_length=16)
    long = "a large gold pentagon and the small navy square and a small teal triangle at the bottom right"
    assert len(tok.encode(long)) + 2 == 20
    with pytest.warns(UserWarning, match="truncated"):
        tokens = tok([long])
    assert tokens.shape == (1, 16) and tokens[0, -1] == tok.EOS and (tokens != 0).all()
    assert tok.decode(tokens[0, 1:]) == "a large gold pentagon and the small navy square and a small teal triangle"
    assert check_caption_lengths(tok, [long, CAPTIONS[1]]) == 20
    assert "1 of 2 training captions are longer than clip.model.context_length=16" in capsys.readouterr().out
