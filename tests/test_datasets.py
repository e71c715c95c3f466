"""Tests for the data sources: data/datasets.py (the dispatcher), data/captioned.py (the container, flips, batches),
data/decode.py (decoding and its cache) and data/cifar.py; tiny datasets written in tmp_path, CPU only."""

import json
import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data.decode as decode
import data.shapes as shapes
from data.captioned import CaptionedImages, DatasetError, StepBatches, build_caption_table, flip_caption
from data.cifar import CIFAR_TEMPLATES, class_captions, with_articles
from data.datasets import load_dataset


def cfg(**kw):
    base = dict(dataset="shapes", root="", variant="objects", n_train=4, n_test=2, seed=0, image_size=32,
                flip=True, captions_file="captions.jsonl", download=False)
    base.update(kw)
    return SimpleNamespace(**base)


def noise_image(seed, size=(128, 128)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_shapes_split(split_dir, captions):
    """A tiny shapes-format split: noise PNGs (128 px) and metadata.jsonl."""
    split_dir.mkdir(parents=True, exist_ok=True)
    with open(split_dir / "metadata.jsonl", "w") as f:
        for i, cap in enumerate(captions):
            name = f"{i:06d}.png"
            noise_image(i).save(split_dir / name)
            f.write(json.dumps({"file": name, "caption": cap,
                                "objects": [{"colour": "red", "shape": "circle"}]}) + "\n")


def expected_pixels(path, size):
    with Image.open(path) as im:
        return torch.from_numpy(
            np.asarray(im.convert("RGB").resize((size, size), Image.LANCZOS)).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Captions and flips.

def test_flip_caption():
    assert flip_caption("a red circle at the top left") == "a red circle at the top right"
    assert flip_caption("a red circle at the right") == "a red circle at the left"
    assert flip_caption("Left and RIGHT, left.") == "Right and LEFT, right."
    assert flip_caption("leftover brightness") == "leftover brightness"  # whole words only
    assert flip_caption("a blue square") == "a blue square"
    for s in ("top left and bottom right", "Right"):
        assert flip_caption(flip_caption(s)) == s


def test_caption_table_pads_and_maps_flips():
    captions, ids, num, flip_ids = build_caption_table([["a at the left"], ["x", "y", "x"], ["p", "q", "r"]])
    assert ids.shape == (3, 3)
    assert num.tolist() == [1, 2, 3]  # duplicate "x" dropped
    assert [captions[i] for i in ids[1]] == ["x", "y", "x"]  # padded by repeating real variants
    assert captions[flip_ids[ids[0, 0]]] == "a at the right"
    assert captions[flip_ids[ids[1, 1]]] == "y"
    assert all(flip_ids[flip_ids[i]] == i for i in range(len(captions)))


# ---------------------------------------------------------------------------------------------
# sample().

def toy_dataset(n=6):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    variants = [[f"img{i} at the left", f"img{i} variant b", f"img{i} right c"][: 1 + i % 3] for i in range(n)]
    return CaptionedImages(images, *build_caption_table(variants), name="toy")


def test_sample_flips_images_and_captions():
    d = toy_dataset()
    idx = torch.tensor([0, 1, 2, 3, 4, 5] * 20)
    x, cap, flipped = d.sample(idx, torch.Generator().manual_seed(1), flip=True)
    assert x.dtype == torch.uint8 and x.shape == (120, 3, 8, 8) and cap.shape == (120,) and flipped.dtype == torch.bool
    assert 0 < flipped.sum() < 120
    for j in range(120):
        i = int(idx[j])
        real = {d.captions[k] for k in d.caption_ids[i, : d.num_captions[i]].tolist()}
        if flipped[j]:
            assert torch.equal(x[j], d.images[i].flip(-1))
            assert flip_caption(d.captions[cap[j]]) in real
        else:
            assert torch.equal(x[j], d.images[i])
            assert d.captions[cap[j]] in real
    # a flipped "left" caption reads "right"
    rows = [j for j in range(120) if flipped[j] and "left" in flip_caption(d.captions[cap[j]])]
    assert rows and all("right" in d.captions[cap[j]] for j in rows)


def test_sample_deterministic_and_no_flip():
    d = toy_dataset()
    idx = torch.arange(6).repeat(10)
    a = d.sample(idx, torch.Generator().manual_seed(3), flip=True)
    b = d.sample(idx, torch.Generator().manual_seed(3), flip=True)
    c = d.sample(idx, torch.Generator().manual_seed(4), flip=True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    x, cap, flipped = d.sample(idx, torch.Generator().manual_seed(3), flip=False)
    assert not flipped.any() and torch.equal(x, d.images[idx])


def test_sample_draws_only_real_variants():
    d = toy_dataset()
    idx = torch.full((4000,), 4)  # image 4 has 2 real variants, padded to K=3
    assert d.num_captions[4] == 2 and d.caption_ids.shape[1] == 3
    _, cap, _ = d.sample(idx, torch.Generator().manual_seed(0), flip=False)
    assert set(cap.tolist()) == set(d.caption_ids[4, :2].tolist())
    counts = torch.bincount(cap)
    assert counts.max() < 0.55 * 4000  # both real variants drawn, roughly evenly


# ---------------------------------------------------------------------------------------------
# shapes.

def test_shapes_load_resize_and_metadata(tmp_path):
    caps = ["a red circle at the top left", "the small blue square", "a pink ellipse"]
    write_shapes_split(tmp_path / "s" / "test", caps)
    d = load_dataset(cfg(root=str(tmp_path / "s"), n_test=3), "test", generate_missing=False, progress=False)
    assert d.images.shape == (3, 3, 32, 32) and d.images.dtype == torch.uint8
    assert torch.equal(d.images[1], expected_pixels(tmp_path / "s" / "test" / "000001.png", 32))
    assert [d.caption_of(i) for i in range(3)] == caps
    assert d.caption_ids.shape == (3, 1) and d.num_captions.tolist() == [1, 1, 1]
    assert d.metadata[0]["objects"][0]["shape"] == "circle"
    assert d.name == "shapes/objects/test" and len(d) == 3
    d64 = load_dataset(cfg(root=str(tmp_path / "s"), image_size=64, n_test=3), "test", progress=False)
    assert d64.images.shape == (3, 3, 64, 64)


def test_shapes_root_relative_to_cwd(tmp_path, monkeypatch):
    write_shapes_split(tmp_path / "rel" / "train", ["a red circle"] * 2)
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset(cfg(root="rel", n_train=2), "train", generate_missing=False, progress=False)) == 2


def test_shapes_cache_created_reused_and_rebuilt(tmp_path, monkeypatch):
    root = tmp_path / "s"
    write_shapes_split(root / "train", ["a", "b"])
    c = cfg(root=str(root), n_train=2)
    calls = []
    real_decode = shapes.decode_images
    monkeypatch.setattr(shapes, "decode_images", lambda *a, **k: calls.append(1) or real_decode(*a, **k))

    first = load_dataset(c, "train", progress=False)
    cache = root / "train" / ".cache" / "images_32.npy"
    assert cache.is_file() and len(calls) == 1
    assert not [p for p in cache.parent.iterdir() if ".tmp" in p.name]  # atomic write left no temp file

    again = load_dataset(c, "train", progress=False)  # reused: no decoding
    assert len(calls) == 1 and torch.equal(first.images, again.images)

    # Stale: a new image appended to metadata.jsonl (size and mtime change) -> rebuilt, never reused.
    noise_image(99).save(root / "train" / "000002.png")
    with open(root / "train" / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file": "000002.png", "caption": "c"}) + "\n")
    grown = load_dataset(c, "train", progress=False)
    assert len(calls) == 2 and len(grown) == 3
    assert torch.equal(grown.images[2], expected_pixels(root / "train" / "000002.png", 32))

    # Same size, new mtime (an edit in place) -> rebuilt.
    st = os.stat(root / "train" / "metadata.jsonl")
    os.utime(root / "train" / "metadata.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_dataset(c, "train", progress=False)
    assert len(calls) == 3

    # A damaged cache file behind a matching key -> rebuilt.
    cache.write_bytes(b"garbage")
    fixed = load_dataset(c, "train", progress=False)
    assert len(calls) == 4 and torch.equal(fixed.images, grown.images)
    load_dataset(c, "train", progress=False)
    assert len(calls) == 4


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    split = tmp_path / "s" / "train"
    write_shapes_split(split, [f"caption {i}" for i in range(7)])
    paths = [split / f"{i:06d}.png" for i in range(7)]
    serial = decode.decode_images(paths, 32, "serial", progress=False)
    monkeypatch.setattr(decode, "PARALLEL_MIN", 2)  # force the worker processes on 7 files
    assert np.array_equal(decode.decode_images(paths, 32, "parallel", progress=False), serial)
    (split / "000005.png").write_bytes(b"truncated")
    with pytest.raises(DatasetError, match="000005.png"):  # a worker's error reaches the caller
        decode.decode_images(paths, 32, "parallel", progress=False)


def test_shapes_bad_metadata_and_missing_png(tmp_path):
    split = tmp_path / "s" / "train"
    write_shapes_split(split, ["a", "b"])
    lines = (split / "metadata.jsonl").read_text().splitlines()
    (split / "metadata.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"metadata\.jsonl, line 2"):
        load_dataset(cfg(root=str(tmp_path / "s")), "train", progress=False)
    (split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (split / "000001.png").unlink()
    with pytest.raises(DatasetError, match="000001.png"):
        load_dataset(cfg(root=str(tmp_path / "s")), "train", progress=False)


def test_shapes_missing_without_generation(tmp_path):
    with pytest.raises(DatasetError, match="metadata.jsonl"):
        load_dataset(cfg(root=str(tmp_path / "none")), "train", generate_missing=False, progress=False)


def test_shapes_generated_when_missing(tmp_path, capsys):
    pytest.importorskip("data.shapes", reason="data/shapes.py (the generator) is not available")
    root = tmp_path / "gen"
    d = load_dataset(cfg(root=str(root), variant="positions", n_train=5, n_test=3, seed=1), "test", progress=False)
    out = capsys.readouterr().out
    assert f"shapes dataset not found at {root}: generating it (5 train / 3 test, variant positions, seed 1)" in out
    assert len(d) == 3 and (root / "train" / "metadata.jsonl").is_file()
    assert d.images.shape == (3, 3, 32, 32) and d.name == "shapes/positions/test"
    assert all(" at the " in d.caption_of(i) for i in range(3))


# ---------------------------------------------------------------------------------------------
# CIFAR-10 in its real on-disk format.

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar(root, per_batch=3, n_test=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name, obj):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    dump("batches.meta", {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch})
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        dump(name, {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                    b"filenames": [f"{i}.png".encode() for i in range(n)]})
        written[name] = (data, labels)
    return written


def test_cifar_round_trip(tmp_path):
    written = write_fake_cifar(tmp_path)
    train = load_dataset(cfg(dataset="cifar10", root=str(tmp_path)), "train", progress=False)
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    # pixel (c, y, x) of image i is byte c*1024 + y*32 + x of its row
    assert int(train.images[7, 2, 5, 9]) == int(data[7, 2 * 1024 + 5 * 32 + 9])
    assert torch.equal(train.images.reshape(15, -1), torch.from_numpy(data))
    assert train.labels.tolist() == labels and train.class_names == CLASSES
    t = len(CIFAR_TEMPLATES)
    assert train.caption_ids.shape == (15, t) and (train.num_captions == t).all()
    name = CLASSES[labels[0]]
    assert {train.captions[k] for k in train.caption_ids[0].tolist()} == set(class_captions([name]))
    assert train.metadata is None and train.name == "cifar10/train"

    test = load_dataset(cfg(dataset="cifar10", root=str(tmp_path)), "test", progress=False)
    tdata, tlabels = written["test_batch"]
    assert torch.equal(test.images.reshape(4, -1), torch.from_numpy(tdata)) and test.labels.tolist() == tlabels
    assert test.caption_ids.shape == (4, 1)
    for i in range(4):  # one fixed template per test image
        assert test.caption_of(i) == with_articles(CIFAR_TEMPLATES[i % t].format(CLASSES[tlabels[i]]))

    big = load_dataset(cfg(dataset="cifar10", root=str(tmp_path), image_size=64), "test", progress=False)
    assert big.images.shape == (4, 3, 64, 64) and big.labels.tolist() == tlabels


def test_cifar_captions_articles():
    caps = class_captions(["airplane", "automobile", "cat"])
    assert "a photo of an airplane" in caps and "an automobile" in caps and "an image of an airplane" in caps
    assert "a photo of a cat" in caps and "an image of a cat" in caps
    assert len(set(caps)) == len(caps) == 3 * len(CIFAR_TEMPLATES)


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DatasetError, match="data.download=true") as err:
        load_dataset(cfg(dataset="cifar10", root=str(tmp_path / "nothing")), "train", progress=False)
    assert "cifar-10-batches-py" in str(err.value)


# ---------------------------------------------------------------------------------------------
# folder datasets.

def write_folder_images(root):
    root.mkdir(parents=True, exist_ok=True)
    # 60x40: red | green | blue bands; the centre square crop (x 10..50) is all green.
    bands = np.zeros((40, 60, 3), np.uint8)
    bands[:, :10] = (255, 0, 0)
    bands[:, 10:50] = (0, 200, 0)
    bands[:, 50:] = (0, 0, 255)
    Image.fromarray(bands).save(root / "wide.png")
    noise_image(1, (50, 50)).convert("RGB").save(root / "photo.jpg", quality=95)
    (root / "sub").mkdir(exist_ok=True)
    noise_image(2, (16, 16)).save(root / "sub" / "small.bmp")


def test_folder_csv_with_split(tmp_path):
    root = tmp_path / "f"
    write_folder_images(root)
    (root / "caps.csv").write_text(
        "id,image,caption,split\n"
        "1,wide.png,a green square at the left,train\n"
        "2,photo.jpg,some noise,train\n"
        "3,wide.png,\"green, mostly\",train\n"
        "4,sub/small.bmp,tiny noise,test\n")
    c = cfg(dataset="folder", root=str(root), captions_file="caps.csv")
    train = load_dataset(c, "train", progress=False)
    assert train.images.shape == (2, 3, 32, 32) and train.name == "folder/f/train"
    assert (train.images[0] == torch.tensor([0, 200, 0], dtype=torch.uint8).view(3, 1, 1)).all()  # centre crop
    assert train.num_captions.tolist() == [2, 1]
    assert [train.captions[k] for k in train.caption_ids[0].tolist()] == ["a green square at the left", "green, mostly"]
    assert "a green square at the right" in train.captions  # its flip is in the table
    test = load_dataset(c, "test", progress=False)
    assert len(test) == 1 and test.caption_of(0) == "tiny noise"
    assert torch.equal(test.images[0], expected_pixels(root / "sub" / "small.bmp", 32))


def test_folder_jsonl_seeded_split(tmp_path):
    root = tmp_path / "j"
    root.mkdir()
    lines = []
    for i in range(25):
        noise_image(i, (20, 20)).save(root / f"{i}.png")
        key = "file" if i % 2 else "image"
        lines.append(json.dumps({key: f"{i}.png", "caption": f"picture {i}"}))
    lines.append(json.dumps({"image": "0.png", "caption": "picture zero"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    c = cfg(dataset="folder", root=str(root), seed=3)
    train, test = load_dataset(c, "train", progress=False), load_dataset(c, "test", progress=False)
    assert len(train) == 24 and len(test) == 1  # 5% of 25, at least 1
    names = {train.caption_of(i) for i in range(24)} | {test.caption_of(0)}
    assert len(names) == 25  # disjoint, covering
    again = load_dataset(c, "test", progress=False)
    assert again.caption_of(0) == test.caption_of(0)  # deterministic
    held_out = {load_dataset(cfg(dataset="folder", root=str(root), seed=s), "test", progress=False).caption_of(0)
                for s in range(5)}
    assert len(held_out) > 1  # the seed picks the held-out images
    where = train if "picture 0" in {train.caption_of(i) for i in range(24)} else test
    row = [i for i in range(len(where)) if where.caption_of(i) == "picture 0"][0]
    assert where.num_captions[row] == 2  # two rows for 0.png: two variants
    assert {where.captions[k] for k in where.caption_ids[row].tolist()} == {"picture 0", "picture zero"}


def test_folder_errors(tmp_path):
    root = tmp_path / "e"
    write_folder_images(root)
    c = cfg(dataset="folder", root=str(root), captions_file="caps.csv")
    with pytest.raises(DatasetError, match="caps.csv"):
        load_dataset(c, "train", progress=False)  # missing captions file

    (root / "caps.csv").write_text("image,caption\nwide.png,ok\nphoto.jpg,   \n")
    with pytest.raises(DatasetError, match=r"caps\.csv, line 3"):
        load_dataset(c, "train", progress=False)  # empty caption

    (root / "caps.csv").write_text("image,caption\n")
    with pytest.raises(DatasetError, match=r"caps\.csv.*no rows"):
        load_dataset(c, "train", progress=False)

    (root / "broken.png").write_bytes(b"not an image at all")
    (root / "caps.csv").write_text("image,caption,split\nbroken.png,bad,train\nwide.png,ok,test\n")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset(c, "train", progress=False)  # unreadable image

    (root / "caps.csv").write_text("image,caption,split\ngone.png,bad,train\nwide.png,ok,test\n")
    with pytest.raises(DatasetError, match="gone.png"):
        load_dataset(c, "train", progress=False)  # missing image


def test_load_dataset_rejects_unknown(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset(cfg(dataset="imagenet", root=str(tmp_path)), "train")
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset(cfg(root=str(tmp_path)), "val")


# ---------------------------------------------------------------------------------------------
# StepBatches.

def test_step_batches_deterministic_and_resumable():
    a, b = StepBatches(10, 4, seed=5), StepBatches(10, 4, seed=5)
    steps = [a.indices(s) for s in range(12)]
    assert all(torch.equal(x, b.indices(s)) for s, x in enumerate(steps))
    resumed = StepBatches(10, 4, seed=5)
    assert torch.equal(resumed.indices(7), steps[7])  # resume at step 7, nothing replayed before
    assert not torch.equal(StepBatches(10, 4, seed=6).indices(0), steps[0])
    stream = torch.cat(steps)  # 48 positions = 4.8 epochs
    for e in range(4):
        assert sorted(stream[10 * e: 10 * (e + 1)].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])
    assert torch.equal(stream[10:20], a.permutation(1))


def test_step_batches_small_dataset_spans_epochs():
    sb = StepBatches(3, 8, seed=0)
    stream = torch.cat([sb.indices(0), sb.indices(1)])
    for e in range(5):
        assert sorted(stream[3 * e: 3 * (e + 1)].tolist()) == [0, 1, 2]


def test_step_batches_ranks_split_the_global_batch():
    world = StepBatches(37, 12, seed=1)
    ranks = [StepBatches(37, 12, seed=1, rank=r, world_size=3) for r in range(3)]
    for step in (0, 3, 10):
        parts = [r.indices(step) for r in ranks]
        assert all(p.shape == (4,) for p in parts)
        assert torch.equal(torch.cat(parts), world.indices(step))  # contiguous slices, covering
    with pytest.raises(ValueError):
        StepBatches(37, 10, seed=1, rank=0, world_size=3)


def test_step_generators():
    sb0, sb1 = StepBatches(10, 4, seed=2), StepBatches(10, 4, seed=2, rank=1, world_size=2)
    r = lambda g: torch.rand(4, generator=g)
    assert torch.equal(r(sb0.generator(3)), r(StepBatches(10, 4, seed=2).generator(3)))
    assert not torch.equal(r(sb0.generator(3)), r(sb0.generator(4)))
    assert not torch.equal(r(sb0.generator(3)), r(sb1.generator(3)))
