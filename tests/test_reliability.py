"""Reliability and security: nothing the user owns is lost, nothing loaded runs code, every bad
input is one clear line. Each test names the red-team item (issue 14) it covers."""
import json
import os
import pickle
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import faults
from conftest import tiny_overrides
from data.datasets import DatasetError, load_dataset


def data_cfg(root, **kw):
    base = dict(dataset="shapes", root=str(root), variant="objects", n_train=4, n_test=2, seed=0, image_size=16,
                flip=True, captions_file="captions.jsonl", download=False)
    base.update(kw)
    return SimpleNamespace(**base)


def user_folder(root: Path) -> dict:
    """A user's own data: train/ and test/ with files, no shapes metadata. Returns {path: bytes}."""
    files = {root / "train" / "holiday.jpg": b"my photo", root / "test" / "notes.txt": b"my notes",
             root / "captions.csv": b"image,caption\n"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


# --- 1. the shapes loader never deletes user data ---------------------------------------------

def test_shapes_loader_refuses_a_folder_it_did_not_make(tmp_path):
    files = user_folder(tmp_path / "mine")
    with pytest.raises(DatasetError, match=r"mine already holds files the shapes generator did not write.*data.dataset=folder"):
        load_dataset(data_cfg(tmp_path / "mine"), "train", progress=False)
    assert {p: p.read_bytes() for p in files} == files  # untouched
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["captions.csv", "test", "train"]


def test_shapes_loader_regenerates_only_its_own_folder(tmp_path):
    root = tmp_path / "gen"
    load_dataset(data_cfg(root), "train", progress=False)  # a new folder: generated, with its marker
    (root / "test" / "metadata.jsonl").unlink()  # a split of a generated dataset lost its metadata
    d = load_dataset(data_cfg(root), "test", progress=False)
    assert len(d) == 2 and (root / ".shapes-dataset").is_file() and not (root / ".lock").exists()
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    assert len(load_dataset(data_cfg(tmp_path / "empty"), "test", progress=False)) == 2


def test_shapes_cli_refuses_a_nonempty_foreign_out(tmp_path):
    files = user_folder(tmp_path / "mine")
    r = faults.run_py(["data/shapes.py", "--out", tmp_path / "mine", "--n-train", "3", "--n-test", "2", "--no-progress"])
    lines = faults.error_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1 and "did not write" in lines[0], r.stderr
    assert {p: p.read_bytes() for p in files} == files
