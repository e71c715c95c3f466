"""The training entry points end to end on a tiny run (trained once per session by `tiny_run`),
their evaluations, the embedding cache and the errors users see."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from clip.model import CLIP
from dalle2.core.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint
from dalle2.decoder import Decoder
from dalle2.embeddings import load_or_compute
from dalle2.prior import DiffusionPrior

REPO = Path(__file__).resolve().parent.parent


def test_run_folder_has_every_stage(tiny_run):
    run, _ = tiny_run
    for stage in ("clip", "prior", "decoder"):
        assert (run / f"{stage}.pt").is_file()
        for name in ("config.yml", "metrics.jsonl", "checkpoint.pt"):
            assert (run / stage / name).is_file(), (stage, name)
    assert list((run / "decoder" / "samples").glob("step_*.png"))
    assert len(list((run / "cache").glob("*.pt"))) == 2  # train and test embeddings of one CLIP
    clip_eval = [json.loads(l) for l in (run / "clip" / "metrics.jsonl").read_text().splitlines() if "eval" in l]
    assert {"i2t_top1", "t2i_top1", "cos_matched", "heldout_i2t_top1"} <= set(clip_eval[-1]["eval"])


def test_checkpoints_round_trip_to_identical_outputs(tiny_run):
    run, _ = tiny_run
    a, b = CLIP.from_checkpoint(run / "clip.pt"), CLIP.from_checkpoint(run / "clip.pt")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(a.encode_image(images), b.encode_image(images), rtol=0, atol=0)
    assert torch.equal(a.encode_text(["a red circle"]), b.encode_text(["a red circle"]))
    prior, decoder = DiffusionPrior.from_checkpoint(run / "prior.pt"), Decoder.from_checkpoint(run / "decoder.pt")
    assert prior.extra["clip_hash"] == decoder.extra["clip_hash"] == a.checkpoint_hash
    assert prior.tokenizer == decoder.tokenizer == a.tokenizer  # the tokenizer travels with every model


def test_evaluate_scripts_on_tiny_checkpoints(tiny_run, capsys):
    from clip.evaluate import main as eval_clip
    from dalle2.prior.evaluate import main as eval_prior
    run, argv = tiny_run
    root = argv[argv.index("--set") + 1].split("=", 1)[1]  # data.root of the tiny run
    result = eval_clip(["--checkpoint", str(run / "clip.pt"), "--set", f"data.root={root}"])
    assert 0.0 <= result["i2t_top1"] <= 1.0 and result["n_images"] == 16
    result = eval_prior(["--checkpoint", str(run / "prior.pt"), "--steps", "4", "--set", f"data.root={root}"])
    for key in ("cos_true_image", "cos_text", "cos_other_text", "baseline_cos_text_image", "retrieval_top1"):
        assert -1.0 <= result[key] <= 1.0
    out = capsys.readouterr().out
    assert "i2t_top1" in out and "cos_true_image" in out


def test_wrong_stage_and_mismatched_clip_are_one_line_errors(tiny_run, tmp_path):
    from dalle2.prior.evaluate import main as eval_prior
    run, _ = tiny_run
    with pytest.raises(CheckpointError, match="is a 'prior' checkpoint, expected a 'clip'"):
        CLIP.from_checkpoint(run / "prior.pt")
    # a CLIP with other weights: the prior must refuse it
    other = load_checkpoint(run / "clip.pt")
    other["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in other["model"].items()}
    atomic_torch_save(other, tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match="was trained on CLIP"):
        eval_prior(["--checkpoint", str(run / "prior.pt"), "--clip", str(tmp_path / "clip.pt")])
    # a checkpoint whose weights contradict its config
    bad = load_checkpoint(run / "clip.pt")
    bad["config"]["clip"]["model"]["embed_dim"] = 48
    atomic_torch_save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: the weights do not fit"):
        CLIP.from_checkpoint(tmp_path / "bad.pt")


def test_cli_errors_are_one_line(tiny_run, tmp_path):
    truncated = tmp_path / "clip.pt"
    truncated.write_bytes((tiny_run[0] / "clip.pt").read_bytes()[:1000])
    cases = [([sys.executable, "clip/evaluate.py", "--checkpoint", str(truncated)], "not a readable checkpoint"),
             ([sys.executable, "clip/train.py", "--set", "clip.train.lr=fast"], "clip.train.lr"),
             ([sys.executable, "dalle2/train_prior.py", "--out", str(tmp_path / "empty"), "--preset", "tiny"],
              "no CLIP checkpoint here")]
    for cmd, words in cases:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: ") and words in lines[0], lines[0]


def test_embedding_cache_is_reused_and_rebuilt_when_stale(tiny_run, tmp_path):
    from data.datasets import load_dataset
    run, argv = tiny_run
    clip = CLIP.from_checkpoint(run / "clip.pt")
    cfg = clip.config
    ds = load_dataset(cfg.data, "test", generate_missing=False)
    messages = []
    first = load_or_compute(clip, clip.checkpoint_hash, ds, tmp_path, "test", progress=False, log=messages.append)
    again = load_or_compute(clip, clip.checkpoint_hash, ds, tmp_path, "test", progress=False, log=messages.append)
    assert torch.equal(first.image_emb, again.image_emb) and not messages
    # plain and flipped views are both cached, and they differ
    assert not torch.equal(first.image_emb[:, 0], first.image_emb[:, 1])
    ds.images[0] = 255 - ds.images[0]  # other data under the same name: must not be used
    rebuilt = load_or_compute(clip, clip.checkpoint_hash, ds, tmp_path, "test", progress=False, log=messages.append)
    assert messages and "rebuilding" in messages[0]
    assert not torch.equal(rebuilt.image_emb[0], first.image_emb[0])


@pytest.mark.e2e
@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on CPU")
def test_ddp_two_processes_on_cpu(tmp_path):
    import socket
    with socket.socket() as sock:  # a free port, so parallel or leftover runs cannot collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "clip/train.py", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "run"),
           *tiny_overrides(tmp_path / "shapes", steps=4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "run" / "clip.pt", "clip")
    assert ckpt["step"] == 4
    lines = (tmp_path / "run" / "clip" / "metrics.jsonl").read_text().splitlines()
    assert len([l for l in lines if '"loss"' in l]) == 4  # rank 0 alone logs


@pytest.mark.e2e
def test_clip_on_a_fake_cifar10_folder_reports_zero_shot_accuracy(tmp_path):
    from test_datasets import write_fake_cifar

    from clip.evaluate import main as eval_clip
    from clip.train import main as train_clip
    write_fake_cifar(tmp_path / "cifar", per_batch=6, n_test=12)
    sets = ["data.dataset=cifar10", f"data.root={tmp_path / 'cifar'}", "clip.train.steps=3",
            "clip.train.batch_size=8", "clip.train.warmup_steps=1", "clip.model.embed_dim=32",
            "clip.model.vision_width=32", "clip.model.text_width=32"]
    train_clip(["--preset", "tiny", "--quiet", "--out", str(tmp_path / "run"),
                *[x for s in sets for x in ("--set", s)]])
    result = eval_clip(["--checkpoint", str(tmp_path / "run" / "clip.pt"), "--set", "data.dataset=cifar10",
                        "--set", f"data.root={tmp_path / 'cifar'}"])  # the data's location is the user's to give
    assert 0.0 <= result["zero_shot_accuracy"] <= 1.0 and result["n_images"] == 12
