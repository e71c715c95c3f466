"""Evaluation figures with known answers: CLIP's i2t_top1_true (seen / held-out) and the prior's
oracle and retrieval, computed from hand-made embeddings where the right numbers are known."""
import pytest
import torch

from clip.evaluate import evaluate_clip
from data.captioned import CaptionedImages, build_caption_table


def obj(colour, shape, size, position="center"):
    return {"colour": colour, "shape": shape, "size": size, "position": position, "bbox": [0, 0, 20, 20]}


def captioned(captions, objects):
    """A CaptionedImages of len(captions) 4x4 images; image i's first pixel holds i (the fake encoders'
    way to know which image they see). objects[i]: its metadata objects."""
    n = len(captions)
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    table = build_caption_table([[c] for c in captions])
    metadata = [{"file": f"{i:06d}.png", "caption": c, "objects": o} for i, (c, o) in enumerate(zip(captions, objects))]
    return CaptionedImages(images, *table, metadata=metadata, name="fake")


class FakeCLIP(torch.nn.Module):
    """encode_image gives image i the embedding image_emb[i]; encode_text gives text t text_emb[t]."""

    def __init__(self, image_emb, text_emb: dict):
        super().__init__()
        self.image_emb, self.texts = image_emb, list(text_emb)
        self.text_emb = torch.stack(list(text_emb.values()))
        self.tokenizer = lambda texts: torch.tensor([[self.texts.index(t)] for t in texts])
        self.device = torch.device("cpu")

    def encode_image(self, x):  # x: (N, 3, 4, 4) in [-1, 1]
        i = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
        return self.image_emb[i]

    def encode_text(self, tokens):
        return self.text_emb[tokens[:, 0]]


def test_clip_i2t_top1_true_seen_and_heldout():
    captions = ["a small red circle", "a red circle", "a blue square", "a white rectangle", "a large white rectangle"]
    objects = [[obj("red", "circle", "small")], [obj("red", "circle", "large")], [obj("blue", "square", "medium")],
               [obj("white", "rectangle", "small")], [obj("white", "rectangle", "large")]]  # last two: held out
    ds = captioned(captions, objects)
    basis = torch.eye(8)
    text_emb = {c: basis[i] for i, c in enumerate(captions)}
    # what each image retrieves top-1, and whether that caption is true of it:
    retrieved = ["a red circle",             # true (size not stated), though not its own string
                 "a small red circle",       # false: the circle is large
                 "a blue square",            # true, and its own string
                 "a large white rectangle",  # false: small
                 "a white rectangle"]        # true
    image_emb = torch.stack([text_emb[c] for c in retrieved])
    out = evaluate_clip(FakeCLIP(image_emb, text_emb), ds)
    assert list(out)[0] == "i2t_top1_true"  # the headline is the first line of the table
    assert out["i2t_top1_true"] == pytest.approx(3 / 5)
    assert out["seen_i2t_top1_true"] == pytest.approx(2 / 3)
    assert out["heldout_i2t_top1_true"] == pytest.approx(1 / 2)
    assert out["i2t_top1"] == pytest.approx(1 / 5)  # exact string: only the blue square
    assert out["n_captions"] == 5


def test_clip_i2t_top1_true_counts_objects_and_positions():
    # a caption naming one object is not true of a two-object image; a wrong position word is false
    captions = ["a red circle", "a red circle and a blue square", "a green circle at the top left"]
    objects = [[obj("red", "circle", "small")],
               [obj("red", "circle", "small"), obj("blue", "square", "small")],
               [obj("green", "circle", "small", "top right")]]
    ds = captioned(captions, objects)
    basis = torch.eye(4)
    text_emb = {c: basis[i] for i, c in enumerate(captions)}
    image_emb = torch.stack([text_emb["a red circle and a blue square"], text_emb["a red circle"],
                             text_emb["a green circle at the top left"]])
    out = evaluate_clip(FakeCLIP(image_emb, text_emb), ds)
    assert out["i2t_top1_true"] == 0.0 and out["i2t_top1"] == pytest.approx(1 / 3)
    assert "heldout_i2t_top1_true" not in out  # no held-out pair in this split


def test_prior_oracle_and_caption_retrieval(monkeypatch):
    import dalle2.prior.evaluate as ep
    from dalle2.embeddings import Embeddings
    captions = ["a red circle"] * 3 + ["a blue square", "a white rectangle", "a white rectangle", "a small blue square"]
    objects = [[obj("red", "circle", s)] for s in ("small", "large", "medium")] + [[obj("blue", "square", "small")]] \
        + [[obj("white", "rectangle", s)] for s in ("small", "large")] + [[obj("blue", "square", "small")]]
    ds = captioned(captions, objects)  # images 4, 5 hold a zero-shot pair
    d = torch.eye(8)
    true_img = torch.stack([d[0], .6 * d[0] + .8 * d[1], .6 * d[0] + .8 * d[2],  # red circles
                            d[3],                                                # the only "a blue square"
                            d[4], .8 * d[4] + .6 * d[5],                         # white rectangles
                            d[6]])                                               # the only "a small blue square"
    assert ds.captions[:4] == ["a red circle", "a blue square", "a white rectangle", "a small blue square"]
    text_emb = torch.stack([d[0], d[3], d[4], d[6]])  # one per caption of the table
    emb = Embeddings(torch.stack([true_img, true_img], 1), text_emb, torch.zeros(4, 2, 4),
                     torch.ones(4, 2, dtype=torch.bool), torch.zeros(4, 2, dtype=torch.long), "clip", "data")
    sampled = torch.stack([d[0], d[3], d[0], d[3], d[0], d[4], d[3]])
    # retrieves: red ok, blue WRONG, red ok, blue ok, red WRONG, white ok, "a blue square": not its own
    # string but true of the small blue square
    monkeypatch.setattr(ep, "sample_embeddings", lambda *a, **k: sampled)
    out = ep.evaluate_prior(torch.nn.Identity(), emb, ds)
    keys = list(out)
    assert keys[keys.index("cos_true_image") + 1] == "oracle_cos_same_caption"  # printed beside it
    # pairs: red circles .6, .6, .36; white rectangles .8; the singletons give none
    assert out["oracle_pairs"] == 4 and out["oracle_cos_same_caption"] == pytest.approx((.6 + .6 + .36 + .8) / 4)
    assert out["seen_oracle_pairs"] == 3 and out["seen_oracle_cos_same_caption"] == pytest.approx(1.56 / 3)
    assert out["heldout_oracle_pairs"] == 1 and out["heldout_oracle_cos_same_caption"] == pytest.approx(.8)
    expected = {"i2t_top1_sampled": 4 / 7, "i2t_top1_real": 1.0, "i2t_top1_true_sampled": 5 / 7,
                "i2t_top1_true_real": 1.0, "seen_i2t_top1_sampled": 3 / 5, "seen_i2t_top1_true_sampled": 4 / 5,
                "heldout_i2t_top1_sampled": 1 / 2, "heldout_i2t_top1_true_sampled": 1 / 2,
                "seen_i2t_top1_true_real": 1.0, "heldout_i2t_top1_real": 1.0}
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key
    assert keys.index("i2t_top1_real") == keys.index("i2t_top1_sampled") + 1  # sampled beside real


def test_same_caption_oracle_equals_brute_force():
    from dalle2.prior.evaluate import same_caption_oracle
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 6, generator=g), dim=-1)
    caption = torch.randint(0, 15, (40,), generator=g)
    pairs = [(i, j) for i in range(40) for j in range(i + 1, 40) if caption[i] == caption[j]]
    mean, n = same_caption_oracle(x, caption)
    assert n == len(pairs) > 0
    assert mean == pytest.approx(sum(float(x[i] @ x[j]) for i, j in pairs) / len(pairs), abs=1e-6)
    assert same_caption_oracle(x[:3], torch.tensor([0, 1, 2]))[1] == 0  # all singletons: no pair
