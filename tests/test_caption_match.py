"""Caption match (CLIP score, R-precision) on features with known answers, and the sweep choosing by
it where no attribute reader exists."""
import math

import pytest
import torch

from dalle2.evaluation.metrics import caption_match
from dalle2.evaluation.sweep import recommend


def test_perfect_wrong_and_chance_matches():
    text = torch.eye(8)  # 8 orthogonal captions
    ids = torch.arange(8).repeat(3)  # 24 images, 3 per caption
    perfect = caption_match(text[ids], text, ids, distractors=5)
    assert perfect["clip_cosine"] == pytest.approx(1.0) and perfect["clip_score"] == pytest.approx(100.0)
    assert perfect["r_precision"] == 1.0 and perfect["retrieval_top1"] == 1.0
    assert perfect["n_distractors"] == 5 and perfect["n_captions"] == 8

    wrong = caption_match(text[(ids + 1) % 8], text, ids, distractors=7)  # each image shows the next caption
    assert wrong["clip_cosine"] == pytest.approx(0.0) and wrong["r_precision"] == 0.0
    assert wrong["retrieval_top1"] == 0.0

    # an image halfway between its caption and another: cosine 1/sqrt(2) with both
    mixed = caption_match(text[ids] + text[(ids + 1) % 8], text, ids, distractors=7)
    assert mixed["clip_cosine"] == pytest.approx(1 / math.sqrt(2))
    assert mixed["clip_score"] == pytest.approx(100 / math.sqrt(2))
    assert mixed["r_precision"] == 0.0  # a tie with a distractor is not a win


def test_r_precision_of_random_features_is_near_chance_and_seeded():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(50, 32, generator=g)
    ids = torch.randint(0, 50, (4000,), generator=g)
    images = torch.randn(4000, 32, generator=g)
    m = caption_match(images, text, ids, distractors=9, seed=1)
    assert m["r_precision"] == pytest.approx(0.1, abs=0.02)  # chance: 1 / (1 + 9)
    assert m["retrieval_top1"] == pytest.approx(1 / 50, abs=0.01)
    assert caption_match(images, text, ids, distractors=9, seed=1) == m
    # distractors are other captions, never the image's own: with 2 captions the one distractor is the other
    two = caption_match(torch.tensor([[1.0, 0.2]]), torch.eye(2), torch.tensor([0]), distractors=99)
    assert two["n_distractors"] == 1 and two["r_precision"] == 1.0


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="caption ids"):
        caption_match(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        caption_match(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 2]))


def test_sweep_recommends_by_caption_match_without_a_reader():
    def result(rp, score, fd):
        return {"sets": {"test": {"caption_match": {"r_precision": rp, "clip_score": score}}},
                "distance": {"clip_fd": fd}}
    # the lowest distance (index 0) ignores the captions; the highest R-precision wins
    results = [result(0.20, 20.0, 0.5), result(0.60, 25.0, 0.9), result(0.60, 24.0, 0.7)]
    assert recommend(results) == 1
    shapes = [{"sets": {"test": {"faithfulness": {"all": {"exact": e}}, "caption_match": {"r_precision": 1 - e}}},
               "distance": {"clip_fd": 1.0}} for e in (0.3, 0.5)]
    assert recommend(shapes) == 1  # with a reader, exact match decides
