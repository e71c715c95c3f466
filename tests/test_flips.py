"""Horizontal flips keep captions true: on the positions variant a mirrored box
can change its position class (halves are <= 64 / > 64), so the flipped caption is recomputed from the
mirrored box, not only left <-> right swapped. Judged here from the metadata with the spec's rule."""
from types import SimpleNamespace

import pytest
import torch

from dalle2.evaluation.faithfulness import score
from data.captioned import build_caption_table, flip_caption
from data.captions import parse_caption
from data.datasets import load_dataset
from data.shapes import mirror_bbox, mirrored_caption


def spec_position(bbox):
    """SHAPES_SPEC.md, Positions: wholly in a half (rows / columns <= 64, or > 64), else none."""
    x1, y1, x2, y2 = bbox
    v = "top" if y2 <= 64 else "bottom" if y1 > 64 else None
    h = "left" if x2 <= 64 else "right" if x1 > 64 else None
    return " ".join(w for w in (v, h) if w) or "center"


def mirrored_objects(objects):
    out = []
    for o in objects:
        x1, y1, x2, y2 = o["bbox"]
        box = [127 - x2, y1, 127 - x1, y2]  # pixel column x -> 127 - x on the 128 canvas
        out.append({**o, "bbox": box, "position": spec_position(box)})
    return out


def true_of(caption, objects):
    return score(parse_caption(caption), objects)["exact"]


def test_mirrored_caption_recomputes_the_position_at_the_middle():
    assert mirror_bbox([10, 5, 63, 40]) == [64, 5, 117, 40]
    # right edge at 63: "top left"; mirrored left edge 64 is not > 64, so the mirror is just "top"
    obj = {"colour": "red", "shape": "rectangle", "bbox": [10, 5, 63, 40]}
    assert mirrored_caption("a red rectangle at the top left", [obj]) == "a red rectangle at the top"
    assert flip_caption("a red rectangle at the top left") == "a red rectangle at the top right"  # false
    # "center" horizontally, left edge 63: the mirror's right edge is 64, wholly in the left half
    obj = {"colour": "red", "shape": "rectangle", "bbox": [63, 80, 100, 120]}
    assert mirrored_caption("the red rectangle at the bottom", [obj]) == "the red rectangle at the bottom left"
    # away from the middle it is the plain swap; no position phrase: unchanged; unusable record: None
    obj = {"colour": "red", "shape": "rectangle", "bbox": [0, 0, 30, 30]}
    assert mirrored_caption("a red rectangle at the top left", [obj]) == "a red rectangle at the top right"
    assert mirrored_caption("a red rectangle and a blue circle", [obj, obj]) == "a red rectangle and a blue circle"
    assert mirrored_caption("a red rectangle at the top left", []) is None
    assert mirrored_caption("a red rectangle at the top left", [{"colour": "red"}]) is None


def test_caption_table_gives_an_image_its_own_flip():
    # two images with the same caption whose mirrors need different captions
    caps, ids, _, flip_ids = build_caption_table(
        [["x at the top left"], ["x at the top left"]], [["x at the top right"], ["x at the top"]])
    assert caps[ids[0, 0]] == caps[ids[1, 0]] == "x at the top left" and ids[0, 0] != ids[1, 0]
    assert caps[flip_ids[ids[0, 0]]] == "x at the top right" and caps[flip_ids[ids[1, 0]]] == "x at the top"
    assert caps[flip_ids[flip_ids[ids[1, 0]]]] == "x at the top"  # every flip is an entry with its own flip
    # the default is flip_caption, with the same table as without the argument
    plain = build_caption_table([["a at the left"], ["b"]])
    same = build_caption_table([["a at the left"], ["b"]], [["a at the right"], ["b"]])
    assert plain[0] == same[0] and all(torch.equal(p, s) for p, s in zip(plain[1:], same[1:]))
    with pytest.raises(ValueError, match="flipped"):
        build_caption_table([["a", "b"]], [["a"]])


@pytest.fixture(scope="module")
def positions_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("positions")
    cfg = SimpleNamespace(dataset="shapes", root=str(root), variant="positions", n_train=500, n_test=6, seed=0,
                          image_size=16)
    return load_dataset(cfg, "train", progress=False)


def test_every_flip_of_a_positions_split_is_true(positions_train):
    d = positions_train
    boundary = 0
    for i, rec in enumerate(d.metadata):
        caption = d.captions[int(d.caption_ids[i, 0])]
        flipped = d.captions[int(d.flip_ids[d.caption_ids[i, 0]])]
        assert true_of(caption, rec["objects"]), caption
        assert true_of(flipped, mirrored_objects(rec["objects"])), (caption, flipped, rec["objects"])
        boundary += not true_of(flip_caption(caption), mirrored_objects(rec["objects"]))
    assert boundary > 0  # the split has images where swapping left/right alone would be false


def test_sample_flips_only_into_true_captions(positions_train):
    """The contract of CaptionedImages.sample on shapes positions: every row's caption is true of the
    image it returns (mirrored when flipped), and flipped images are the mirrored originals. Any
    reimplementation of sample (device-side draws) must pass this."""
    d = positions_train
    idx = torch.arange(len(d)).repeat(4)
    images, cap, flipped = d.sample(idx, torch.Generator().manual_seed(0), flip=True)
    assert 0.4 < flipped.float().mean() < 0.6
    hit_boundary = 0
    for j, i in enumerate(idx.tolist()):
        caption, objects = d.captions[int(cap[j])], d.metadata[i]["objects"]
        if flipped[j]:
            assert torch.equal(images[j], d.images[i].flip(-1))
            assert true_of(caption, mirrored_objects(objects)), (caption, objects)
            hit_boundary += not true_of(flip_caption(d.metadata[i]["caption"]), mirrored_objects(objects))
        else:
            assert torch.equal(images[j], d.images[i])
            assert true_of(caption, objects), (caption, objects)
    assert hit_boundary > 0  # some flipped rows were images where the plain swap is false
