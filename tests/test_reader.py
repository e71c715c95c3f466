"""Tests for the attribute reader (dalle2/evaluation/reader.py) and caption faithfulness
(dalle2/evaluation/faithfulness.py)."""

import random

import pytest
import torch

from dalle2.evaluation.faithfulness import aggregate, evaluate, prompt_sets, score
from dalle2.evaluation.reader import (
    VERSION,
    AttributeReader,
    label_components,
    match_boxes,
    reader_accuracy,
    render_scenes,
)
from data.captioned import to_float
from data.captions import HOLDOUT_PAIRS, is_heldout, make_caption, parse_caption
from data.decode import square_resize
from data.shapes import position_word, render, size_word


@pytest.fixture(scope="module")
def reader():
    # small but real: ~3 s on a laptop CPU; the default reader uses 12,000 scenes
    return AttributeReader.train(n_scenes=3000, seed=0, image_size=32, epochs=8, progress=False)


def obj(colour, shape, bbox, rotation=None):
    o = {"colour": colour, "shape": shape, "bbox": bbox, "size": size_word(bbox), "position": position_word(bbox)}
    if rotation is not None:
        o["rotation"] = rotation
    return o


def as_tensor(objects, size=32):
    """One scene rendered and resized exactly like the datasets -> (1, 3, size, size) uint8."""
    return torch.from_numpy(square_resize(render(objects), size).copy()).permute(2, 0, 1)[None].contiguous()


# ---------------------------------------------------------------------------------------------
# The reader.

def test_reader_accuracy_floors(reader):
    acc = reader_accuracy(reader, n=600, seed=7)
    assert acc["n_images"] == 600 and acc["n_objects"] == acc["all"]["n"] > 600
    for group in ("medium", "large"):
        assert acc[group]["colour"] >= 0.98, acc[group]
        assert acc[group]["shape"] >= 0.93, acc[group]
    assert acc["small"]["colour"] >= 0.97 and acc["small"]["shape"] >= 0.85, acc["small"]
    assert acc["all"]["size"] >= 0.97 and acc["all"]["position"] >= 0.97, acc["all"]
    assert acc["count"] >= 0.98
    assert acc["all"]["box_iou"] >= 0.95


def test_reads_known_scene_and_white_vs_silver(reader):
    # white and silver lie on the same line from gray: the reader must tell them apart by peak
    scene = [obj("white", "rectangle", [4, 6, 60, 40]), obj("silver", "circle", [70, 70, 120, 120])]
    (found,) = reader.read(as_tensor(scene))
    assert len(found) == 2
    got = sorted((o["colour"], o["shape"], o["size"], o["position"]) for o in found)
    want = sorted((o["colour"], o["shape"], o["size"], o["position"]) for o in scene)
    assert got == want
    for o in found:
        true = next(t for t in scene if t["colour"] == o["colour"])
        assert all(abs(a - b) <= 2 for a, b in zip(o["bbox"], true["bbox"])), (o["bbox"], true["bbox"])
        assert all(isinstance(v, int) for v in o["bbox"])


def test_two_colours_touching_are_two_objects(reader):
    # boxes one pixel apart at 128 px blur together at 32 px; the colours still separate them
    scene = [obj("red", "rectangle", [10, 10, 60, 100]), obj("blue", "rectangle", [62, 10, 110, 100])]
    (found,) = reader.read(as_tensor(scene))
    assert sorted(o["colour"] for o in found) == ["blue", "red"]


def test_robust_to_pixel_noise(reader):
    # generated images are never exactly gray + palette: moderate noise must not break reading
    images, scenes = render_scenes(200, random.Random(8))
    g = torch.Generator().manual_seed(0)
    noisy = (images + 8.0 * torch.randn(images.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    found = reader.read(noisy)
    assert sum(len(f) == len(s) for f, s in zip(found, scenes)) / 200 >= 0.95
    right = total = 0
    for objs, truth in zip(found, scenes):
        matched = {t: p for p, t in match_boxes([o["bbox"] for o in objs], [o["bbox"] for o in truth])}
        total += len(truth)
        right += sum(objs[p]["colour"] == truth[t]["colour"] for t, p in matched.items())
    assert right / total >= 0.97


def test_reader_at_64px():
    r64 = AttributeReader.train(n_scenes=400, seed=0, image_size=64, epochs=2, progress=False)
    scene = [obj("navy", "rectangle", [4, 6, 60, 40]), obj("pink", "ellipse", [70, 70, 120, 120])]
    (found,) = r64.read(as_tensor(scene, 64))
    # the analytic parts (colour, box, words) need no training worth the name
    got = sorted((o["colour"], o["size"], o["position"]) for o in found)
    assert got == sorted((o["colour"], o["size"], o["position"]) for o in scene)
    with pytest.raises(ValueError, match="64x64"):
        r64.read(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_input_formats_and_errors(reader):
    images, _ = render_scenes(8, random.Random(3))
    as_uint8 = reader.read(images)
    assert reader.read(to_float(images)) == as_uint8  # [-1, 1] floats, the models' range
    assert reader.read(torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)) == [[], []]  # blank canvas
    assert reader.read(torch.zeros(0, 3, 32, 32, dtype=torch.uint8)) == []
    with pytest.raises(ValueError, match="32x32"):
        reader.read(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError):
        reader.read(torch.zeros(1, 32, 32, dtype=torch.uint8))


def test_save_load_and_default_cache(reader, tmp_path, monkeypatch):
    images, _ = render_scenes(16, random.Random(4))
    path = reader.save(tmp_path / "r.pt")
    loaded = AttributeReader.load(path)
    assert loaded.read(images) == reader.read(images)
    # default() finds its cache file and does not retrain (training would take far longer)
    reader.save(tmp_path / f"reader_v{VERSION}_32.pt")
    calls = []
    monkeypatch.setattr(AttributeReader, "train", classmethod(lambda cls, **kw: calls.append(kw)))
    cached = AttributeReader.default(image_size=32, cache_dir=tmp_path)
    assert not calls and cached.read(images) == reader.read(images)
    # a file from another format version is not trusted: it is rebuilt (here: train is called)
    torch.save({"version": -1}, tmp_path / f"reader_v{VERSION}_32.pt")
    monkeypatch.setattr(AttributeReader, "train", classmethod(lambda cls, **kw: calls.append(kw) or reader))
    AttributeReader.default(image_size=32, cache_dir=tmp_path)
    assert len(calls) == 1
    assert AttributeReader.load(tmp_path / f"reader_v{VERSION}_32.pt").read(images) == reader.read(images)


def test_train_is_deterministic():
    a = AttributeReader.train(n_scenes=200, seed=5, epochs=1, progress=False)
    b = AttributeReader.train(n_scenes=200, seed=5, epochs=1, progress=False)
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a.extent_coef, b.extent_coef)


def test_label_components():
    fg = torch.zeros(2, 6, 6, dtype=torch.bool)
    fg[0, 0:2, 0:2] = True       # blob A
    fg[0, 2, 2] = True           # touches A diagonally: same component (8-connected)
    fg[0, 4:6, 4:6] = True       # blob B, separate
    fg[1, 0, 0:6] = True         # a row: two colours -> two components
    group = torch.zeros(int(fg.sum()), dtype=torch.long)
    group[-3:] = 1               # the last three pixels of the row (flat order) are another colour
    comp = label_components(fg, group)
    ids = torch.full(fg.shape, -1, dtype=torch.long)
    ids[fg] = comp
    assert ids[0, 0, 0] == ids[0, 1, 1] == ids[0, 2, 2] != ids[0, 4, 4]
    assert ids[1, 0, 0] == ids[1, 0, 2] != ids[1, 0, 3] == ids[1, 0, 5]
    assert len(set(comp.tolist())) == 4


def test_match_boxes():
    pred = [[0, 0, 10, 10], [50, 50, 60, 60]]
    truth = [[49, 49, 61, 61], [1, 1, 9, 9], [100, 100, 110, 110]]
    assert sorted(match_boxes(pred, truth)) == [(0, 1), (1, 0)]
    assert match_boxes([[0, 0, 5, 5]], [[100, 100, 110, 110]]) == []


# ---------------------------------------------------------------------------------------------
# Captions.

def O(colour=None, shape=None, size=None, position=None):
    return {"colour": colour, "shape": shape, "size": size, "position": position}


def test_parse_spec_examples():
    assert parse_caption("a large gold pentagon and the small navy square") == [
        O("gold", "pentagon", "large"), O("navy", "square", "small")]
    assert parse_caption("an orange circle") == [O("orange", "circle")]
    assert parse_caption("a small teal triangle at the bottom right") == [
        O("teal", "triangle", "small", "bottom right")]
    assert parse_caption("The red circle at the centre.") == [O("red", "circle", position="center")]


def test_parse_rephrased_and_partial():
    assert parse_caption("a rectangle that is gold") == [O("gold", "rectangle")]
    assert parse_caption("a large rectangle that is gold at the top") == [O("gold", "rectangle", "large", "top")]
    assert parse_caption("a large circle") == [O(shape="circle", size="large")]
    assert parse_caption("green") == [O("green")]
    assert parse_caption("a square") == [O(shape="square")]
    assert parse_caption("a gold shape and a circle that is blue") == [O("gold"), O("blue", "circle")]


@pytest.mark.parametrize("text, word", [("a purple dog", "'dog'"), ("a large", "the end"),
                                        ("circle red", "'red'"), ("a red circle at top", "'top'"),
                                        ("a rectangle that gold", "'gold'"), ("", "empty"),
                                        ("a red circle and", "missing")])
def test_parse_errors_name_the_word(text, word):
    with pytest.raises(ValueError, match=word):
        parse_caption(text)


def test_prompt_sets_deterministic_and_parseable():
    sets = prompt_sets(seed=0, n=60)
    assert sets == prompt_sets(seed=0, n=60) and sets != prompt_sets(seed=1, n=60)
    assert set(sets) == {"rephrased", "partial"} and all(len(v) == 60 for v in sets.values())
    rephrased = [parse_caption(c) for c in sets["rephrased"]]
    assert all("that is" in c for c in sets["rephrased"])
    named = {(o["colour"], o["shape"]) for objs in rephrased for o in objs}
    assert HOLDOUT_PAIRS <= named  # every zero-shot pair is asked for
    assert 0.3 <= sum(map(is_heldout, rephrased)) / 60 <= 0.6
    partial = [parse_caption(c) for c in sets["partial"]]
    assert all(len(p) == 1 and (p[0]["colour"] is None or p[0]["shape"] is None) for p in partial)


# ---------------------------------------------------------------------------------------------
# Scoring.

def D(colour, shape, size="medium", position="center"):
    return {"colour": colour, "shape": shape, "size": size, "position": position, "bbox": [0, 0, 1, 1]}


def test_score_exact_match_in_any_order():
    cap = parse_caption("a large gold pentagon and the small navy square")
    row = score(cap, [D("navy", "square", "small"), D("gold", "pentagon", "large")])
    assert row["exact"] and row["binding"] and row["count"]
    assert row["colour"] == [2, 2] and row["shape"] == [2, 2] and row["size"] == [2, 2]
    assert row["position"] == [0, 0]  # not stated, not counted


def test_score_swapped_colours_break_binding_only():
    cap = parse_caption("a red circle and a blue square")
    row = score(cap, [D("blue", "circle"), D("red", "square")])
    # binding-free attribute scores: both colours and both shapes are drawn
    assert row["colour"] == [2, 2] and row["shape"] == [2, 2]
    assert row["binding"] is False and row["exact"] is False and row["count"] is True


def test_score_wrong_size_extra_object_and_missing_object():
    cap = parse_caption("a large red circle")
    row = score(cap, [D("red", "circle", "small")])
    assert row["size"] == [0, 1] and row["colour"] == [1, 1] and not row["exact"] and row["binding"] is None
    row = score(cap, [D("red", "circle", "large"), D("blue", "square")])
    assert row["colour"] == [1, 1] and not row["count"] and not row["exact"]
    row = score(parse_caption("a red circle and a red square"), [D("red", "circle")])
    assert row["colour"] == [1, 2] and row["shape"] == [1, 2] and row["binding"] is False and not row["count"]
    assert score(cap, [])["colour"] == [0, 1]


def test_score_partial_and_position():
    row = score(parse_caption("green"), [D("green", "triangle")])
    assert row["exact"] and row["shape"] == [0, 0] and row["colour"] == [1, 1]
    row = score(parse_caption("a red circle at the top left"), [D("red", "circle", position="top")])
    assert row["position"] == [0, 1] and not row["exact"]


def test_aggregate_splits_seen_and_heldout():
    captions = ["a gold triangle", "a gold pentagon", "a red circle and a blue square"]
    parsed = [parse_caption(c) for c in captions]
    heldout = [is_heldout(p) for p in parsed]
    assert heldout == [True, False, False]
    rows = [score(parsed[0], [D("gold", "pentagon")]),       # zero-shot: wrong shape
            score(parsed[1], [D("gold", "pentagon")]),       # right
            score(parsed[2], [D("blue", "circle"), D("red", "square")])]  # binding error
    summary = aggregate(rows, heldout)
    assert summary["all"]["n"] == 3 and summary["seen"]["n"] == 2 and summary["heldout"]["n"] == 1
    assert summary["heldout"]["shape"] == 0.0 and summary["heldout"]["colour"] == 1.0
    assert summary["heldout"]["binding"] is None and summary["heldout"]["exact"] == 0.0
    assert summary["seen"]["exact"] == 0.5 and summary["seen"]["binding"] == 0.0
    assert summary["all"]["shape"] == pytest.approx(3 / 4) and summary["all"]["size"] is None
    with pytest.raises(ValueError):
        aggregate(rows, heldout[:2])


def test_evaluate_rendered_scenes_end_to_end(reader):
    # the dataset's own captions on its own (resized) images: nearly everything must be right
    rng = random.Random(11)
    images, scenes = render_scenes(40, rng)
    captions = [make_caption(objs, rng, with_position=True) for objs in scenes]
    result = evaluate(reader, images, captions)
    assert len(result["rows"]) == 40
    assert result["summary"]["all"]["exact"] >= 0.85
    assert result["summary"]["all"]["colour"] >= 0.97
