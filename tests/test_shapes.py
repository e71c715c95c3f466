"""Tests for the shapes dataset generator (data/shapes.py) against data/SHAPES_SPEC.md,
and for the image utilities it uses (dalle2/core/images.py)."""

import collections
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from dalle2.core.images import captioned_grid, save_image_atomic
from data import shapes
from data.captions import COLOURS, HOLDOUT_PAIRS, SHAPES, make_caption
from data.shapes import BACKGROUND, CANVAS, MIN_LEN, generate, position_word, render, sample_scene, size_word

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "shapes.py"

# The spec, restated independently of the implementation.
SPEC_COLOURS = {
    "black": (0, 0, 0), "white": (255, 255, 255), "red": (255, 0, 0), "green": (0, 128, 0),
    "blue": (0, 0, 255), "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255),
    "silver": (192, 192, 192), "maroon": (128, 0, 0), "olive": (128, 128, 0), "purple": (128, 0, 128),
    "teal": (0, 128, 128), "navy": (0, 0, 128), "orange": (255, 165, 0), "gold": (255, 215, 0),
    "pink": (255, 192, 203),
}
SPEC_SHAPES = ["rectangle", "square", "ellipse", "circle", "triangle", "pentagon"]
SPEC_HOLDOUT = {("white", "rectangle"), ("gold", "triangle"), ("blue", "circle"), ("red", "pentagon"),
                ("green", "square"), ("yellow", "ellipse")}
POSITIONS = ["top left", "top right", "bottom left", "bottom right", "top", "bottom", "left", "right", "center"]
OBJECT_RE = re.compile(
    r"(?:(?P<det>the|an|a) )?(?:(?P<size>small|medium|large) )?"
    rf"(?P<colour>{'|'.join(SPEC_COLOURS)}) (?P<shape>{'|'.join(SPEC_SHAPES)})"
    rf"(?: at the (?P<position>{'|'.join(POSITIONS)}))?"
)
CAPTION_RE = re.compile(rf"{OBJECT_RE.pattern}(?: and {OBJECT_RE.pattern.replace('?P<', '?P<x_')})*")


def spec_size(bbox):
    x1, y1, x2, y2 = bbox
    area = (x2 - x1) * (y2 - y1) / (128 * 128)
    return "small" if area < 0.05 else "medium" if area < 0.15 else "large"


def spec_position(bbox):
    x1, y1, x2, y2 = bbox
    v = "top" if y2 <= 64 else "bottom" if y1 > 64 else None
    h = "left" if x2 <= 64 else "right" if x1 > 64 else None
    return " ".join(w for w in (v, h) if w) or "center"


def scenes(variant, allow_holdout, n, seed=0):
    rng = random.Random(seed)
    return [sample_scene(rng, variant, allow_holdout) for _ in range(n)]


@pytest.fixture(scope="module")
def objects_train():
    return scenes("objects", False, 3000, seed=1)


@pytest.fixture(scope="module")
def positions_test():
    return scenes("positions", True, 1500, seed=2)


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


# --- constants and word rules ------------------------------------------------------------------

def test_constants_match_spec():
    assert COLOURS == SPEC_COLOURS and list(COLOURS) == list(SPEC_COLOURS)  # spec order too
    assert list(SHAPES) == SPEC_SHAPES
    assert HOLDOUT_PAIRS == SPEC_HOLDOUT
    assert (CANVAS, BACKGROUND, MIN_LEN) == (128, (128, 128, 128), 20)
    assert BACKGROUND not in COLOURS.values()


@pytest.mark.parametrize("bbox,size", [
    ([0, 0, 28, 29], "small"),       # 812 px < 0.05 * 16384 = 819.2
    ([0, 0, 29, 29], "medium"),      # 841
    ([10, 10, 59, 60], "medium"),    # 2450 < 0.15 * 16384 = 2457.6
    ([10, 10, 60, 60], "large"),     # 2500
    ([0, 0, 127, 127], "large"),
])
def test_size_word_thresholds(bbox, size):
    assert size_word(bbox) == size


@pytest.mark.parametrize("bbox,position", [
    ([0, 0, 64, 64], "top left"), ([65, 0, 127, 64], "top right"), ([0, 65, 64, 127], "bottom left"),
    ([65, 65, 127, 127], "bottom right"), ([40, 0, 90, 64], "top"), ([40, 65, 90, 127], "bottom"),
    ([0, 40, 64, 90], "left"), ([65, 40, 127, 90], "right"), ([0, 0, 127, 127], "center"),
    ([0, 0, 65, 65], "center"), ([64, 64, 100, 100], "center"),
])
def test_position_word(bbox, position):
    assert position_word(bbox) == position


# --- sampled scenes ------------------------------------------------------------------------------

def check_scene_geometry(scene):
    for obj in scene["objects"]:
        x1, y1, x2, y2 = obj["bbox"]
        assert all(isinstance(v, int) for v in obj["bbox"])
        assert 0 <= x1 < x2 <= 127 and 0 <= y1 < y2 <= 127
        assert x2 - x1 >= MIN_LEN and y2 - y1 >= MIN_LEN
        if obj["shape"] in ("square", "circle", "triangle", "pentagon"):
            assert x2 - x1 == y2 - y1
        if obj["shape"] in ("triangle", "pentagon"):
            assert 0 <= obj["rotation"] < 360 and (x2 - x1) % 2 == 0
        else:
            assert "rotation" not in obj
        assert obj["size"] == spec_size(obj["bbox"])
        assert obj["position"] == spec_position(obj["bbox"])
    objs = scene["objects"]
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i]["bbox"], objs[j]["bbox"]
            # inclusive pixel boxes: they must be separated by at least one free row or column
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (a, b)


def check_caption(scene, with_position):
    caption = scene["caption"]
    assert CAPTION_RE.fullmatch(caption), caption
    parts = caption.split(" and ")
    assert len(parts) == len(scene["objects"])
    for part, obj in zip(parts, scene["objects"]):
        m = OBJECT_RE.fullmatch(part)
        assert m, part
        assert (m["colour"], m["shape"]) == (obj["colour"], obj["shape"])
        assert m["size"] in (None, obj["size"])
        assert m["det"] is not None  # the generator always writes a determiner
        if m["det"] != "the":
            next_word = m["size"] or m["colour"]
            assert m["det"] == ("an" if next_word[0] in "aeiou" else "a"), part
        if with_position:
            assert m["position"] == obj["position"]
        else:
            assert m["position"] is None
    return [OBJECT_RE.fullmatch(p) for p in parts]


def test_objects_variant(objects_train):
    counts = collections.Counter(len(s["objects"]) for s in objects_train)
    assert set(counts) == {1, 2}
    assert 0.45 < counts[1] / len(objects_train) < 0.55  # uniform, also with the hold-out rejected
    dets, sizes, colours, kinds = (collections.Counter(), collections.Counter(), collections.Counter(),
                                   collections.Counter())
    for scene in objects_train:
        assert list(scene) == ["caption", "objects"]
        check_scene_geometry(scene)
        for m, obj in zip(check_caption(scene, with_position=False), scene["objects"]):
            assert list(obj)[:5] == ["colour", "shape", "size", "position", "bbox"]
            assert (obj["colour"], obj["shape"]) not in SPEC_HOLDOUT
            dets[m["det"] == "the"] += 1
            sizes[m["size"] is None] += 1
            colours[obj["colour"]] += 1
            kinds[obj["shape"]] += 1
    n = sum(dets.values())
    assert 0.17 < dets[True] / n < 0.23, dets
    assert 0.27 < sizes[True] / n < 0.33, sizes
    assert set(colours) == set(SPEC_COLOURS) and set(kinds) == set(SPEC_SHAPES)
    assert max(colours.values()) < 1.5 * min(colours.values())
    assert max(kinds.values()) < 1.3 * min(kinds.values())


def test_positions_variant(positions_test):
    positions = collections.Counter()
    holdout = 0
    for scene in positions_test:
        assert len(scene["objects"]) == 1
        check_scene_geometry(scene)
        check_caption(scene, with_position=True)
        assert " at the " in scene["caption"]
        obj = scene["objects"][0]
        positions[obj["position"]] += 1
        holdout += (obj["colour"], obj["shape"]) in SPEC_HOLDOUT
    assert set(positions) == set(POSITIONS)
    assert holdout > 0  # allow_holdout=True draws from all pairs


def test_make_caption_examples():
    objs = [{"colour": "gold", "shape": "pentagon", "size": "large", "position": "top left"},
            {"colour": "orange", "shape": "circle", "size": "small", "position": "center"}]
    captions = {make_caption(objs, random.Random(i), with_position=True) for i in range(2000)}
    assert "a large gold pentagon at the top left and an orange circle at the center" in captions
    assert "the gold pentagon at the top left and the small orange circle at the center" in captions
    assert all(" at the " not in make_caption(objs, random.Random(i), False) for i in range(20))


def test_forced_first_object():
    rng = random.Random(0)
    for pair in sorted(SPEC_HOLDOUT):
        scene = sample_scene(rng, "objects", allow_holdout=True, first=pair)
        assert (scene["objects"][0]["colour"], scene["objects"][0]["shape"]) == pair


def test_bad_variant():
    with pytest.raises(ValueError):
        sample_scene(random.Random(0), "colours", False)


# --- rendering -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SPEC_SHAPES)
def test_render_single_object_colours(shape):
    rng = random.Random(SPEC_SHAPES.index(shape))
    for colour, rgb in SPEC_COLOURS.items():
        scene = sample_scene(rng, "positions", allow_holdout=True, first=(colour, shape))
        obj = scene["objects"][0]
        img = render(scene["objects"])
        assert img.size == (128, 128) and img.mode == "RGB"
        assert {c for _, c in img.getcolors()} == {BACKGROUND, rgb}  # no antialiasing, exact palette
        x1, y1, x2, y2 = obj["bbox"]
        left, top, right, bottom = ImageChops.difference(img, Image.new("RGB", img.size, BACKGROUND)).getbbox()
        assert x1 <= left and y1 <= top and right - 1 <= x2 and bottom - 1 <= y2  # drawn inside its bbox
        if shape in ("rectangle", "square"):
            assert (left, top, right - 1, bottom - 1) == (x1, y1, x2, y2)
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        assert img.getpixel((cx, cy)) == rgb  # a regular polygon's centroid is its circumcentre


@pytest.mark.parametrize("shape", ["triangle", "pentagon"])
def test_render_uses_rotation(shape):
    obj = {"colour": "red", "shape": shape, "bbox": [20, 20, 80, 80], "rotation": 0.0}
    turned = dict(obj, rotation=17.5)
    assert render([obj]).tobytes() != render([turned]).tobytes()
    assert render([turned]).tobytes() == render([dict(turned)]).tobytes()


# --- on disk -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root / "a", n_train=150, n_test=50, seed=3, progress=False)
    return root / "a"


def read_split(root, split):
    with open(Path(root) / split / "metadata.jsonl") as f:
        return [json.loads(line) for line in f]


def test_generate_layout_and_metadata(small_dataset):
    # no temp folders or lock left; the marker says the generator owns this folder
    assert sorted(p.name for p in small_dataset.iterdir()) == [".shapes-dataset", "test", "train"]
    for split, n in (("train", 150), ("test", 50)):
        records = read_split(small_dataset, split)
        assert len(records) == n
        pngs = sorted(p.name for p in (small_dataset / split).glob("*.png"))
        assert pngs == [f"{i:06d}.png" for i in range(n)] == [r["file"] for r in records]
        for rec in records:
            assert list(rec) == ["file", "caption", "objects"]
            assert 1 <= len(rec["objects"]) <= 2
            check_scene_geometry(rec)
            check_caption(rec, with_position=False)
            for obj in rec["objects"]:
                assert {"colour", "shape", "size", "position", "bbox"} <= set(obj)
        for rec in records[:10]:  # the metadata alone re-renders the image exactly
            with Image.open(small_dataset / split / rec["file"]) as im:
                assert im.size == (128, 128) and im.mode == "RGB"
                assert im.tobytes() == render(rec["objects"]).tobytes()
    train_pairs = {(o["colour"], o["shape"]) for r in read_split(small_dataset, "train") for o in r["objects"]}
    test_pairs = {(o["colour"], o["shape"]) for r in read_split(small_dataset, "test") for o in r["objects"]}
    assert not train_pairs & SPEC_HOLDOUT
    assert SPEC_HOLDOUT <= test_pairs


def test_generate_reproducible(small_dataset, tmp_path):
    reference = tree_hashes(small_dataset)
    generate(tmp_path / "b", n_train=150, n_test=50, seed=3, progress=False)
    assert tree_hashes(tmp_path / "b") == reference
    generate(tmp_path / "c", n_train=150, n_test=50, seed=4, progress=False)
    other = tree_hashes(tmp_path / "c")
    assert other.keys() == reference.keys()
    assert sum(other[k] != reference[k] for k in reference) > 0.9 * len(reference)
    # train and test come from independent generators derived from (seed, split)
    draws = {(seed, split): shapes.split_rng(seed, split).random() for seed in (0, 1) for split in ("train", "test")}
    assert len(set(draws.values())) == 4
    assert shapes.split_rng(0, "test").random() == draws[0, "test"]


def test_generate_replaces_atomically(tmp_path, monkeypatch):
    root = generate(tmp_path / "d", variant="positions", n_train=20, n_test=10, seed=0, progress=False)
    before = tree_hashes(root)
    calls = {"n": 0}
    real_render = shapes.render

    def failing_render(objects, canvas=128):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("crash in the middle of a split")
        return real_render(objects, canvas)

    monkeypatch.setattr(shapes, "render", failing_render)
    with pytest.raises(RuntimeError):
        generate(root, variant="objects", n_train=20, n_test=10, seed=1, progress=False)
    assert tree_hashes(root) == before  # the old splits are untouched, no half-written one
    assert sorted(p.name for p in root.iterdir()) == [".shapes-dataset", "test", "train"]
    monkeypatch.setattr(shapes, "render", real_render)
    generate(root, variant="objects", n_train=8, n_test=6, seed=1, progress=False)
    assert sorted(p.name for p in root.iterdir()) == [".shapes-dataset", "test", "train"]
    assert len(list((root / "train").glob("*.png"))) == 8  # the old 20 were replaced, not merged


# --- command line --------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def test_cli_matches_api(tmp_path):
    result = run_cli("--variant", "positions", "--out", tmp_path / "cli", "--n-train", 12, "--n-test", 8,
                     "--seed", 5, "--preview", tmp_path / "p" / "preview.png")
    assert result.returncode == 0, result.stderr
    generate(tmp_path / "api", variant="positions", n_train=12, n_test=8, seed=5, progress=False)
    assert tree_hashes(tmp_path / "cli") == tree_hashes(tmp_path / "api")
    assert all("at the" in r["caption"] for r in read_split(tmp_path / "cli", "test"))
    with Image.open(tmp_path / "p" / "preview.png") as im:
        assert im.width > 128 and im.height > 128


@pytest.mark.parametrize("args", [["--n-train", "-5"], ["--variant", "colours"], ["--n-test", "many"], []])
def test_cli_bad_arguments(tmp_path, args):
    if args:
        args = ["--out", tmp_path / "x"] + args
    result = run_cli(*args)
    assert result.returncode == 2
    assert "error" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_cli_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("--out", blocker / "sub", "--n-train", 2, "--n-test", 2)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- preview and image utilities ----------------------------------------------------------------

def test_preview_and_grid(small_dataset, tmp_path):
    out = shapes.preview(small_dataset, tmp_path / "prev" / "grid.png", n=6, image_size=32)
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.width >= 3 * 128  # 32 px tiles upscaled x4, 3 columns
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temp file left

    tiles = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    grid = captioned_grid(tiles, ["a red square", "a very long caption " * 5], cols=2, scale=3)
    assert grid.getpixel((4 + 1, 4 + 1)) == (255, 0, 0)  # tile upscaled with NEAREST at the pad offset
    assert grid.getpixel((4 + 24 + 4 + 23, 4 + 23)) == (0, 0, 255)
    assert grid.height > 4 + 24 + 4 * 12  # the long caption wrapped onto several lines
    assert grid.getpixel((grid.width - 1, grid.height - 1)) == (255, 255, 255)
    with pytest.raises(ValueError):
        captioned_grid(tiles, ["one caption"])

    path = save_image_atomic(grid, tmp_path / "g" / "grid.png")
    with Image.open(path) as im:
        assert im.tobytes() == grid.tobytes()


def test_to_pil():
    torch = pytest.importorskip("torch")
    from dalle2.core.images import to_pil

    x = torch.zeros(3, 4, 5)
    x[0] = 1.0
    x[1, 0, 0] = 2.0  # clipped
    img = to_pil(x)
    assert img.size == (5, 4) and img.getpixel((1, 1)) == (255, 0, 0) and img.getpixel((0, 0)) == (255, 255, 0)
    u = torch.full((3, 2, 2), 7, dtype=torch.uint8)
    assert to_pil(u).getpixel((1, 1)) == (7, 7, 7)
    with pytest.raises(ValueError):
        to_pil(torch.zeros(4, 4))
