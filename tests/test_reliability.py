"""Reliability and security: nothing the user owns is lost, nothing loaded runs code, every bad
input is one clear line. Each test names the red-team item it covers."""
import json
import os
import pickle
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import faults
import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from data.captioned import DatasetError
from data.datasets import load_dataset


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
    with pytest.raises(DatasetError,
                       match=r"mine already holds files the shapes generator did not write.*data.dataset=folder"):
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
    r = faults.run_py(["data/shapes.py", "--out", tmp_path / "mine", "--n-train", "3", "--n-test", "2",
                       "--no-progress"])
    lines = faults.error_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1 and "did not write" in lines[0], r.stderr
    assert {p: p.read_bytes() for p in files} == files


# --- 2. re-running a stage never destroys the finished model ----------------------------------

def test_rerun_without_resume_is_refused_and_overwrite_starts_a_fresh_log(tmp_path):
    from test_training import get_batch, make_trainer

    from dalle2.core.training import TrainingError
    make_trainer(tmp_path, steps=4).fit(get_batch)
    before = (tmp_path / "clip.pt").read_bytes(), (tmp_path / "clip" / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingError, match=r"already holds a clip run.*--resume.*--overwrite"):
        make_trainer(tmp_path, steps=4).fit(get_batch)
    assert ((tmp_path / "clip.pt").read_bytes(), (tmp_path / "clip" / "checkpoint.pt").read_bytes()) == before
    make_trainer(tmp_path, steps=3).fit(get_batch, overwrite=True)
    steps = [json.loads(l)["step"] for l in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one run's log, not the old one with the new one appended


def test_training_cli_refuses_a_rerun_in_one_line(tiny_run, capsys):
    from clip.train import main as train_clip
    run, argv = tiny_run
    before = (run / "clip.pt").read_bytes()
    code, lines = faults.cli(train_clip, argv, capsys)
    assert code == 2 and len(lines) == 1 and "--resume" in lines[0] and "--overwrite" in lines[0], lines
    assert (run / "clip.pt").read_bytes() == before


# --- 5. locks on run folders and on dataset generation ----------------------------------------

HOLD_LOCK = ("import sys, time; from dalle2.core.files import FolderLock; FolderLock(sys.argv[1]).acquire(); "
             "print('held', flush=True); time.sleep(60)")


def test_second_training_into_one_folder_is_refused_and_stale_locks_are_taken_over(tmp_path):
    from test_training import get_batch, make_trainer

    from dalle2.core.files import LockError
    holder = faults.start_py(["-c", HOLD_LOCK, tmp_path / "clip"])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"{tmp_path / 'clip'} is in use.*process {holder.pid}"):
            make_trainer(tmp_path, steps=2).fit(get_batch)
        assert not (tmp_path / "clip.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is stale and is taken over, then released at the end
    assert (tmp_path / "clip" / ".lock").read_text().split()[0] == str(holder.pid)
    make_trainer(tmp_path, steps=2).fit(get_batch)
    assert (tmp_path / "clip.pt").is_file() and not (tmp_path / "clip" / ".lock").exists()
    (tmp_path / "clip" / ".lock").write_text("")  # an empty lock file (no pid), not new: stale too
    os.utime(tmp_path / "clip" / ".lock", (1e9, 1e9))
    make_trainer(tmp_path, steps=2).fit(get_batch, overwrite=True)
    assert not (tmp_path / "clip" / ".lock").exists()


def test_generating_one_shapes_root_twice_at_once_is_refused(tmp_path):
    root = tmp_path / "gen"
    root.mkdir()
    (root / ".shapes-dataset").write_text("x")  # a folder the generator is writing right now
    holder = faults.start_py(["-c", HOLD_LOCK, root])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DatasetError,
                           match=rf"{root} is in use: shapes generation is locked by process {holder.pid}"):
            load_dataset(data_cfg(root), "train", progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert len(load_dataset(data_cfg(root), "train", progress=False)) == 4


# --- 10. SIGTERM, orphan temporary files ------------------------------------------------------

SLOW_TRAINING = """
import sys, time
sys.path.insert(0, 'tests')
from test_training import get_batch, make_trainer
from dalle2.core.cli import main_wrapper
out, flag = sys.argv[1], sys.argv[2]
def slow(step):
    if step == 3:
        open(flag, 'w').close()
    time.sleep(0.05)
    return get_batch(step)
main_wrapper(lambda argv: make_trainer(out, steps=100000).fit(slow))([])
"""


@pytest.mark.e2e
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_like_ctrl_c(tmp_path):
    from dalle2.core.checkpoint import load_checkpoint
    flag = tmp_path / "started"
    proc = faults.start_py(["-c", SLOW_TRAINING, tmp_path / "run", flag])
    faults.wait_for(flag.exists, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated" in err, err[-2000:]
    ckpt = load_checkpoint(tmp_path / "run" / "clip" / "checkpoint.pt")
    assert ckpt["step"] >= 3  # saved where it stopped, not at the last save_every
    assert not (tmp_path / "run" / "clip" / ".lock").exists()


def test_orphan_temporary_files_of_killed_writes_are_removed_at_start(tmp_path):
    from test_training import get_batch, make_trainer
    dead, live = faults.dead_pid(), os.getpid()
    (tmp_path / "clip").mkdir(parents=True)
    orphans = [tmp_path / f".clip.pt.tmp-{dead}", tmp_path / "clip" / f".checkpoint.pt.tmp-{dead}"]
    kept = tmp_path / f".prior.pt.tmp-{live}"  # a live process's write in progress
    for p in (*orphans, kept):
        p.write_bytes(b"x" * 1000)
    make_trainer(tmp_path, steps=2).fit(get_batch)
    assert not any(p.exists() for p in orphans) and kept.exists()
    # a killed image-cache rebuild: cleaned by the next rebuild
    from test_datasets import write_shapes_split
    write_shapes_split(tmp_path / "s" / "train", ["a"])
    orphan = tmp_path / "s" / "train" / ".cache" / f".images_16.npy.tmp-{dead}"
    orphan.parent.mkdir()
    orphan.write_bytes(b"x" * 1000)
    load_dataset(data_cfg(tmp_path / "s"), "train", progress=False)
    assert not orphan.exists()


# --- 3. nothing a user loads runs code; data locations come from the user ----------------------

class Planted:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("victim", ["batches.meta", "test_batch"])
def test_cifar_reader_refuses_a_planted_pickle(tmp_path, victim, monkeypatch):
    from test_datasets import write_fake_cifar
    write_fake_cifar(tmp_path / "cifar", per_batch=2, n_test=3)
    path = tmp_path / "cifar" / "cifar-10-batches-py" / victim
    with open(path, "wb") as f:
        pickle.dump({b"label_names": [b"cat"], b"data": Planted(), b"labels": [0]}, f, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=rf"{victim} is not a plain CIFAR batch: it refers to (posix|os)\.system"):
        load_dataset(data_cfg(tmp_path / "cifar", dataset="cifar10", image_size=32), "test", progress=False)
    assert not (tmp_path / "PWNED").exists()


def test_cifar_reader_still_reads_numpy_pickled_with_any_protocol(tmp_path):
    from test_datasets import write_fake_cifar

    from data.cifar import read_cifar10
    written = write_fake_cifar(tmp_path / "cifar", per_batch=2, n_test=3)
    data, labels = written["test_batch"]
    with open(tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": np.asarray(labels), b"batch_label": "test"}, f, protocol=5)
    images, got, names = read_cifar10(tmp_path / "cifar", "test")
    assert np.array_equal(images.reshape(3, -1), data) and got.tolist() == labels and len(names) == 10


def test_evaluation_takes_the_data_location_from_the_user_never_the_checkpoint(tiny_run, tmp_path, monkeypatch):
    from test_datasets import write_fake_cifar

    from clip.evaluate import main as eval_clip
    from dalle2.core.checkpoint import atomic_torch_save, load_checkpoint
    run, argv = tiny_run
    root = argv[argv.index("--set") + 1].split("=", 1)[1]
    # a checkpoint whose saved config points at a planted "CIFAR" folder
    write_fake_cifar(tmp_path / "trap", per_batch=2, n_test=3)
    with open(tmp_path / "trap" / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump(Planted(), f, protocol=2)
    ckpt = load_checkpoint(run / "clip.pt")
    ckpt["config"]["data"].update(dataset="cifar10", root=str(tmp_path / "trap"))
    atomic_torch_save(ckpt, tmp_path / "clip.pt")
    monkeypatch.chdir(tmp_path)
    # without --set the location is the user's own config (the tiny preset's data/shapes_tiny here)
    with pytest.raises(DatasetError, match="shapes_tiny"):
        eval_clip(["--checkpoint", str(tmp_path / "clip.pt")])
    result = eval_clip(["--checkpoint", str(tmp_path / "clip.pt"), "--set", f"data.root={root}"])
    assert result["n_images"] == 16 and not (tmp_path / "PWNED").exists()


# --- 4. a torn metrics.jsonl line never blocks --resume ----------------------------------------

def test_resume_survives_a_torn_last_metrics_line(tmp_path):
    from test_training import get_batch, losses, make_trainer

    def interrupting(step):
        if step == 5:
            raise KeyboardInterrupt
        return get_batch(step)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, steps=8).fit(interrupting)
    with open(tmp_path / "clip" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.12')  # the disk filled up in the middle of a line
    make_trainer(tmp_path, steps=8).fit(get_batch, resume=True)
    lines = (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(l) for l in lines) and sorted(losses(tmp_path)) == list(range(1, 9))


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE")
def test_the_resume_rewrite_of_metrics_is_atomic_on_a_full_disk(tmp_path, capsys):
    from test_training import get_batch, make_trainer
    make_trainer(tmp_path, steps=4).fit(get_batch)
    metrics = tmp_path / "clip" / "metrics.jsonl"
    padding = "".join(json.dumps({"step": 1, "note": "x" * 200}) + "\n" for _ in range(600))  # ~130 kB
    metrics.write_text(padding + metrics.read_text())
    before = metrics.read_bytes()
    with faults.file_size_limit(64_000):  # writes past 64 kB fail
        code, lines = faults.cli(lambda argv: make_trainer(tmp_path, steps=6).fit(get_batch, resume=True), [], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {metrics}: cannot write") and "disk is full" in lines[0], lines[0]
    assert metrics.read_bytes() == before  # nothing already written is lost
    assert not list((tmp_path / "clip").glob(".*.tmp-*"))


# --- 6. paths never escape the dataset folder; only regular files are read --------------------

def shapes_with(tmp_path, names):
    from test_datasets import write_shapes_split
    split = tmp_path / "shapes" / "train"
    write_shapes_split(split, ["a red circle"])
    with open(split / "metadata.jsonl", "a") as f:
        for name in names:
            f.write(json.dumps({"file": name, "caption": "a blue square"}) + "\n")
    return tmp_path / "shapes"


def test_a_file_name_with_a_nul_byte_is_a_dataset_error(tmp_path):
    root = shapes_with(tmp_path, ["bad\u0000name.png"])
    with pytest.raises(DatasetError, match="not a usable file name"):
        load_dataset(data_cfg(root), "train", generate_missing=False, progress=False)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_shapes_metadata_cannot_point_outside_the_folder(tmp_path, kind):
    from test_datasets import noise_image
    secret = tmp_path / "secret.png"
    noise_image(0).save(secret)
    name = {"dotdot": "../../secret.png", "absolute": str(secret), "symlink": "link.png"}[kind]
    root = shapes_with(tmp_path, [name])
    if kind == "symlink":
        (root / "train" / "link.png").symlink_to(secret)
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        load_dataset(data_cfg(root), "train", generate_missing=False, progress=False)


def test_folder_captions_cannot_point_outside_and_do_not_reveal_files(tmp_path):
    from test_datasets import noise_image, write_folder_images
    root = tmp_path / "f"
    write_folder_images(root)
    noise_image(0).save(tmp_path / "exists.png")
    messages = []
    for name in ("../exists.png", "../missing.png", str(tmp_path / "exists.png")):
        (root / "caps.csv").write_text(f"image,caption,split\nwide.png,a,train\n{name},b,train\n")
        with pytest.raises(DatasetError, match="outside the dataset folder") as e:
            load_dataset(data_cfg(root, dataset="folder", captions_file="caps.csv"), "train", progress=False)
        messages.append(str(e.value).replace(name, "NAME"))
    assert messages[0] == messages[1] == messages[2]  # an existing and a missing file look the same
    (root / "out").symlink_to(tmp_path, target_is_directory=True)  # a symlinked folder out of root
    (root / "caps.csv").write_text("image,caption,split\nwide.png,a,train\nout/exists.png,b,train\n")
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        load_dataset(data_cfg(root, dataset="folder", captions_file="caps.csv"), "train", progress=False)


LOAD_FOLDER = """
import sys
from types import SimpleNamespace
from data.datasets import DatasetError, load_dataset
cfg = SimpleNamespace(dataset=sys.argv[2], root=sys.argv[1], image_size=16, seed=0, captions_file="caps.csv")
try:
    load_dataset(cfg, "train", generate_missing=False, progress=False)
except DatasetError as e:
    print(e)
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_listed_as_an_image_is_refused_not_read(tmp_path):
    from test_datasets import write_folder_images
    root = tmp_path / "f"
    write_folder_images(root)
    os.mkfifo(root / "pipe.png")
    (root / "caps.csv").write_text("image,caption,split\nwide.png,a,train\npipe.png,b,train\n")
    r = faults.run_py(["-c", LOAD_FOLDER, root, "folder"], timeout=60)  # reading the FIFO would block forever
    assert "pipe.png" in r.stdout and "is not a regular file" in r.stdout, r.stdout + r.stderr
    (tmp_path / "m" / "train").mkdir(parents=True)
    os.mkfifo(tmp_path / "m" / "train" / "metadata.jsonl")  # the metadata itself a FIFO
    r = faults.run_py(["-c", LOAD_FOLDER, tmp_path / "m", "shapes"], timeout=60)
    assert "metadata.jsonl is not a regular file" in r.stdout, r.stdout + r.stderr
    root = shapes_with(tmp_path, ["pipe.png"])
    os.mkfifo(root / "train" / "pipe.png")
    with pytest.raises(DatasetError, match="pipe.png .* is not a regular file"):
        load_dataset(data_cfg(root), "train", generate_missing=False, progress=False)


# --- 7. a replaced image never keeps its old pixels --------------------------------------------

def test_a_png_replaced_in_place_rebuilds_the_image_cache(tmp_path):
    from test_datasets import expected_pixels, noise_image, write_shapes_split
    root = tmp_path / "s"
    write_shapes_split(root / "train", ["a", "b"])
    first = load_dataset(data_cfg(root, image_size=32), "train", progress=False)
    png = root / "train" / "000001.png"
    st = png.stat()
    noise_image(7).save(png)  # same name, same count, same metadata.jsonl
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    again = load_dataset(data_cfg(root, image_size=32), "train", progress=False)
    assert torch.equal(again.images[1], expected_pixels(png, 32))
    assert not torch.equal(again.images[1], first.images[1])
    from dalle2.embeddings import data_key
    assert data_key(again) != data_key(first)  # so the CLIP embedding cache is rebuilt too


# --- 8. no silent bad output: finite numbers, no NaN images, no runaway --n --------------------

@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf", "1e999"])
def test_config_refuses_non_finite_numbers(value):
    from dalle2.core.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"sampling.guidance_scale: expected a finite number"):
        load_config(overrides=[f"sampling.guidance_scale={value}"])


def load_sample_py():
    import importlib.util
    spec = importlib.util.spec_from_file_location("sample_cli", faults.REPO / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, words", [
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--prior-guidance-scale", "inf"], "--prior-guidance-scale must be a finite number"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--prior-steps", "-3"], "--prior-steps must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--seed", "-1"], "--seed must be between 0 and"),
    (["--seed", str(2 ** 70)], "--seed must be between 0 and"),
    (["--n", "100000"], "100000 images asked for"),
])
def test_sample_py_refuses_bad_arguments_before_any_work(tmp_path, args, words):
    sample = load_sample_py()
    with pytest.raises(SystemExit, match=words) as e:
        sample.main(["a red circle", "--checkpoints", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *args])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()  # refused before anything was made


def test_sampling_refuses_nan_images(tiny_run, monkeypatch):
    from dalle2 import DALLE2
    model = DALLE2.from_run(tiny_run[0])
    monkeypatch.setattr(model.decoder, "sample", lambda emb, *a, **k: torch.full((len(emb), 3, 32, 32), float("nan")))
    with pytest.raises(FloatingPointError, match="NaN"):
        model.generate(["a red circle"], steps=2, prior_steps=2)


def test_many_images_need_yes_and_are_streamed_with_a_capped_grid(tiny_run, tmp_path, monkeypatch):
    from PIL import Image
    sample = load_sample_py()
    monkeypatch.setattr(sample, "MAX_IMAGES", 3)
    monkeypatch.setattr(sample, "GRID_MAX", 2)
    # the caption repeats: its m-th image has seed m across the whole call, not per streamed chunk
    argv = ["a red circle", "a red circle", "--n", "2", "--steps", "2", "--prior-steps", "2", "--batch-size", "2",
            "--checkpoints", str(tiny_run[0]), "--out", str(tmp_path / "o"), "--device", "cpu"]
    with pytest.raises(SystemExit, match="add --yes"):
        sample.main(argv)
    sample.main(argv + ["--yes"])
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0000_0.png", "0000_1.png", "0001_0.png",
                                                                 "0001_1.png", "grid.png", "samples.jsonl"]
    # streamed a caption at a time, the files are those of one call: the same seeds and pixels
    one = tmp_path / "one"
    monkeypatch.setattr(sample, "MAX_IMAGES", 1024)
    sample.main([str(one) if a == str(tmp_path / "o") else a for a in argv])
    for name in ("0000_0.png", "0001_0.png", "0001_1.png"):
        with Image.open(tmp_path / "o" / name) as a, Image.open(one / name) as b:
            assert a.text["dalle2"] == b.text["dalle2"]
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    from dalle2.core.images import captioned_grid
    tiles = [Image.open(tmp_path / "o" / name).convert("RGB") for name in ("0000_0.png", "0000_1.png")]
    expected = captioned_grid(tiles, ["a red circle"] * 2, cols=2)
    with Image.open(tmp_path / "o" / "grid.png") as grid:
        assert grid.size == expected.size  # the first two tiles, not all four
        assert np.array_equal(np.asarray(grid.convert("RGB")), np.asarray(expected))


# --- 9. one line, not a traceback -------------------------------------------------------------

def test_config_file_and_set_problems_are_config_errors(tmp_path):
    from dalle2.core.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"--set clip.train.lr=\[1,: the value is not valid YAML"):
        load_config(overrides=["clip.train.lr=[1,"])
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)
    latin = tmp_path / "latin1.yml"
    latin.write_bytes("data: {root: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yml: not a text \(UTF-8\) file"):
        load_config(latin)


def test_training_cli_config_errors_are_one_line(tmp_path, capsys):
    from clip.train import main as train_clip
    code, lines = faults.cli(train_clip, ["--config", tmp_path, "--out", tmp_path / "run"], capsys)
    assert code == 2 and len(lines) == 1 and "is a folder" in lines[0], lines


def test_a_read_only_run_folder_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import errno

    from test_training import get_batch, make_trainer

    import dalle2.core.files as files
    from dalle2.core.cli import main_wrapper

    def read_only(path, mode="r", *a, **k):
        if any(c in mode for c in "wxa+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open(path, mode, *a, **k)
    monkeypatch.setattr(files, "open", read_only, raising=False)  # every atomic write fails like a read-only mount
    with pytest.raises(SystemExit) as e:
        main_wrapper(lambda argv: make_trainer(tmp_path, steps=2).fit(get_batch))([])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0] == f"error: {tmp_path / 'clip' / 'config.yml'}: cannot write (Read-only file system)"


def test_a_final_model_as_resume_checkpoint_and_other_vocabulary_are_refused(tmp_path):
    import shutil

    from test_training import Toy, get_batch, make_trainer

    from dalle2.core.config import load_config
    from dalle2.core.tokenizer import Tokenizer
    from dalle2.core.training import Trainer, TrainingError
    make_trainer(tmp_path, steps=2).fit(get_batch)
    shutil.copy(tmp_path / "clip.pt", tmp_path / "clip" / "checkpoint.pt")
    with pytest.raises(TrainingError, match="not a resume checkpoint.*final model"):
        make_trainer(tmp_path, steps=4).fit(get_batch, resume=True)
    make_trainer(tmp_path, steps=2).fit(get_batch, overwrite=True)
    cfg = load_config(preset="tiny",
                      overrides=["clip.train.steps=4", "clip.train.batch_size=8", "clip.train.ema_decay=0.9"])
    other = Trainer("clip", cfg, cfg.clip.train, Toy(), tmp_path, tokenizer=Tokenizer.build(["a blue square"]))
    with pytest.raises(TrainingError, match="vocabulary"):
        other.fit(get_batch, resume=True)


# --- 10. the last good checkpoint is sane; two fresh runs start from the same weights ------------

def test_diverged_weights_never_replace_the_last_good_checkpoint(tmp_path):
    from test_training import get_batch, make_trainer

    from dalle2.core.checkpoint import load_checkpoint
    from dalle2.core.training import TrainingError
    trainer = make_trainer(tmp_path, steps=10, ema=0.0)  # saves at steps 2, 4, 6, ...
    real_step, calls = trainer.optimizer.step, []

    def exploding_step(*a, **k):  # the 4th update (step index 3) blows the weights up; its loss was finite
        real_step(*a, **k)
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                trainer.model.net[0].weight.mul_(1e32)
    trainer.optimizer.step = exploding_step
    with pytest.raises(TrainingError, match=r"weights diverged before step 4 \(max \|net.0.weight\| = .*e\+3\d\): "
                                            r"not saved; the last good checkpoint .* step 2\) is kept"):
        trainer.fit(get_batch)
    ckpt = load_checkpoint(tmp_path / "clip" / "checkpoint.pt")
    assert ckpt["step"] == 2 and max(v.abs().max().item() for v in ckpt["raw_model"].values()) < 1e3
    assert not (tmp_path / "clip.pt").exists()


def test_two_fresh_runs_start_from_the_same_weights(tmp_path):
    from clip.train import main as train_clip
    from dalle2.core.checkpoint import load_checkpoint
    from dalle2.train_prior import main as train_prior
    common = ["--preset", "tiny", "--quiet", *tiny_overrides(tmp_path / "shapes", n_train=32, n_test=8, steps=1)]
    for run in ("a", "b"):
        torch.manual_seed(1234 if run == "a" else 99)  # whatever the process did before must not matter
        train_clip(common + ["--out", str(tmp_path / run)])
        train_prior(common + ["--out", str(tmp_path / run), "--clip", str(tmp_path / "a" / "clip.pt")])
    for stage in ("clip", "prior"):
        a, b = (load_checkpoint(tmp_path / run / f"{stage}.pt")["model"] for run in ("a", "b"))
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_folder_lock_works_without_hard_links(tmp_path, monkeypatch):
    from dalle2.core.files import FolderLock, LockError
    def no_links(*a):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    with FolderLock(tmp_path, "a test"):
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(f"{os.getppid()} {__import__('socket').gethostname()}\n")  # a live process
    with pytest.raises(LockError, match=f"locked by process {os.getppid()}"):
        FolderLock(tmp_path, "a test").acquire()


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_time_limit_must_be_a_finite_number_of_minutes(value, capsys):
    from dalle2.core.cli import training_parser
    with pytest.raises(SystemExit):
        training_parser("x", "clip").parse_args(["--time-limit", value])
    assert "--time-limit: must be a finite number of minutes >= 0" in capsys.readouterr().err


def test_atomic_write_never_writes_through_a_planted_temporary_symlink(tmp_path):
    from dalle2.core.files import atomic_write_text
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / f".config.yml.tmp-{os.getpid()}").symlink_to(victim)
    atomic_write_text(tmp_path / "run" / "config.yml", "new")
    assert victim.read_text() == "precious" and (tmp_path / "run" / "config.yml").read_text() == "new"
