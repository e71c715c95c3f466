"""Folder datasets in the layouts people already have: a Hugging Face ImageFolder metadata.jsonl
(file_name + text, in the root or in train/ and test/) and a caption .txt beside each image."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data.captioned import DatasetError
from data.datasets import load_dataset


def cfg(root, **kw):
    return SimpleNamespace(dataset="folder", root=str(root), image_size=16, seed=0, captions_file="captions.jsonl",
                           **kw)


def image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), value, dtype=np.uint8)).save(path)


def captions_by_pixel(dataset):
    """{first pixel value: sorted captions} so tests do not depend on the image order."""
    out = {}
    for i in range(len(dataset)):
        caps = {dataset.captions[k] for k in dataset.caption_ids[i, :int(dataset.num_captions[i])].tolist()}
        out[int(dataset.images[i, 0, 0, 0])] = sorted(caps)
    return out


def test_hugging_face_metadata_in_split_folders(tmp_path):
    for split, values in (("train", (10, 20, 30)), ("test", (40,))):
        lines = []
        for v in values:
            image(tmp_path / split / "imgs" / f"{v}.png", v)
            lines.append(json.dumps({"file_name": f"imgs/{v}.png", "text": f"grey level {v}"}))
        (tmp_path / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    train, test = (load_dataset(cfg(tmp_path), s, progress=False) for s in ("train", "test"))
    assert captions_by_pixel(train) == {10: ["grey level 10"], 20: ["grey level 20"], 30: ["grey level 30"]}
    assert captions_by_pixel(test) == {40: ["grey level 40"]}


def test_hugging_face_metadata_in_the_root_with_caption_lists(tmp_path):
    lines = []
    for v in range(0, 200, 10):  # 20 images: a seeded 5% (one) becomes the test split
        image(tmp_path / f"{v}.png", v)
        lines.append(json.dumps({"file_name": f"{v}.png",
                                 "text": [f"level {v}", f"grey {v}"] if v == 0 else f"level {v}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    train, test = (load_dataset(cfg(tmp_path), s, progress=False) for s in ("train", "test"))
    both = {**captions_by_pixel(train), **captions_by_pixel(test)}
    assert len(train) == 19 and len(test) == 1 and len(both) == 20
    assert both[0] == ["grey 0", "level 0"] and both[120] == ["level 120"]
    # naming it explicitly reads it the same way
    explicit = load_dataset(SimpleNamespace(**{**vars(cfg(tmp_path)), "captions_file": "metadata.jsonl"}), "train",
                            progress=False)
    assert captions_by_pixel(explicit) == captions_by_pixel(train)


def test_caption_txt_files_beside_the_images(tmp_path, capsys):
    for v in (10, 20, 30):
        image(tmp_path / "train" / f"{v}.png", v)
        (tmp_path / "train" / f"{v}.txt").write_text(f"a photo at {v}\n\nanother caption {v}\n")
    image(tmp_path / "test" / "40.png", 40)
    (tmp_path / "test" / "40.txt").write_text("held out\n")
    image(tmp_path / "train" / "50.png", 50)  # no caption: left out, with a note
    train, test = (load_dataset(cfg(tmp_path), s, progress=False) for s in ("train", "test"))
    assert captions_by_pixel(train) == {v: [f"a photo at {v}", f"another caption {v}"] for v in (10, 20, 30)}
    assert captions_by_pixel(test) == {40: ["held out"]}
    assert "1 images have no caption .txt" in capsys.readouterr().out


def test_conventions_report_bad_input_by_file(tmp_path):
    with pytest.raises(DatasetError, match="metadata.jsonl with file_name,text"):
        load_dataset(cfg(tmp_path), "train", progress=False)  # nothing to read: every convention is named
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ""}) + "\n")
    with pytest.raises(DatasetError, match=r"metadata\.jsonl, line 1: expected a non-empty \"text\""):
        load_dataset(cfg(tmp_path), "train", progress=False)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"text": "no file"}) + "\n")
    with pytest.raises(DatasetError, match="file_name"):
        load_dataset(cfg(tmp_path), "train", progress=False)
    (tmp_path / "metadata.jsonl").unlink()
    image(tmp_path / "x.png", 5)
    (tmp_path / "x.txt").write_text("  \n")
    with pytest.raises(DatasetError, match=r"x\.txt, line 1: the caption file is empty"):
        load_dataset(cfg(tmp_path), "train", progress=False)
