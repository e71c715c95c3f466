"""The "both" shapes variant: objects and positions scenes in one dataset, the
zero-shot pairs out of training, byte-identical for a seed, loaded through load_dataset."""
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from dalle2.evaluation.faithfulness import score
from data.captions import HOLDOUT_PAIRS, parse_caption
from data.datasets import load_dataset
from data.shapes import generate, render

N_TRAIN, N_TEST = 40, 20


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and ".cache" not in p.parts}


def read_split(root, split):
    return [json.loads(line) for line in (Path(root) / split / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("both")
    cfg = SimpleNamespace(dataset="shapes", root=str(root / "shapes"), variant="both", n_train=N_TRAIN,
                          n_test=N_TEST, seed=5, image_size=16, flip=True)
    return cfg, load_dataset(cfg, "train", progress=False), load_dataset(cfg, "test", progress=False)


def test_both_has_both_kinds_and_no_heldout_pair_in_train(both):
    cfg, train, test = both
    for split, ds, n in (("train", train, N_TRAIN), ("test", test, N_TEST)):
        records = read_split(cfg.root, split)
        assert len(ds) == len(records) == n and ds.metadata == records and "both" in ds.name
        kinds = [r["variant"] for r in records]
        assert kinds == ["objects", "positions"] * (n // 2)  # half each, in turn
        for r in records:
            assert list(r) == ["file", "variant", "caption", "objects"]
            assert score(parse_caption(r["caption"]), r["objects"])["exact"]  # the caption is true
            if r["variant"] == "positions":
                assert len(r["objects"]) == 1 and " at the " in r["caption"]
            else:
                assert 1 <= len(r["objects"]) <= 2 and " at the " not in r["caption"]
        for r in records[:4]:
            assert (Path(cfg.root) / split / r["file"]).read_bytes()  # the PNGs are there
    pairs = lambda recs, kind: {(o["colour"], o["shape"]) for r in recs if r["variant"] == kind for o in r["objects"]}
    train_records, test_records = read_split(cfg.root, "train"), read_split(cfg.root, "test")
    for kind in ("objects", "positions"):
        assert not pairs(train_records, kind) & HOLDOUT_PAIRS  # zero-shot pairs out of training
        assert HOLDOUT_PAIRS <= pairs(test_records, kind)  # and in the test split, in either kind


def test_both_is_byte_identical_for_a_seed(both, tmp_path):
    cfg, _, _ = both
    reference = tree_hashes(cfg.root)
    generate(tmp_path / "again", variant="both", n_train=N_TRAIN, n_test=N_TEST, seed=5, progress=False)
    assert tree_hashes(tmp_path / "again") == reference
    generate(tmp_path / "other", variant="both", n_train=N_TRAIN, n_test=N_TEST, seed=6, progress=False)
    assert tree_hashes(tmp_path / "other") != reference


def test_both_images_match_their_records_and_flips_are_true(both):
    from PIL import Image
    from test_flips import mirrored_objects
    cfg, train, test = both
    for r in read_split(cfg.root, "test")[:6]:  # the metadata alone re-renders the image exactly
        with Image.open(Path(cfg.root) / "test" / r["file"]) as im:
            assert im.tobytes() == render(r["objects"]).tobytes()
    for i, r in enumerate(train.metadata):  # the positions half gets mirrored position words
        flipped = train.captions[int(train.flip_ids[train.caption_ids[i, 0]])]
        assert score(parse_caption(flipped), mirrored_objects(r["objects"]))["exact"], (r, flipped)
    from dalle2.core.config import load_config  # the new value validates
    assert load_config(overrides=["data.variant=both"]).data.variant == "both"
