"""--init-from: a stage starts from earlier weights (a run folder or an exported safetensors folder) with a
fresh optimizer and schedule; mismatched settings are refused."""
import pytest
import torch

from dalle2.core.checkpoint import CheckpointError, load_checkpoint


def _weights(path):
    return load_checkpoint(path)["model"]


def test_prior_and_clip_continue_from_a_run_folder(tiny_run, tmp_path):
    from clip.train import main as train_clip
    from dalle2.train_prior import main as train_prior
    run, argv = tiny_run
    out = tmp_path / "more"
    # lr 0: the optimizer leaves the weights where --init-from put them, so the result equals the source
    train_prior([*argv, "--out", str(out), "--clip", str(run / "clip.pt"), "--init-from", str(run),
                 "--set", "prior.train.lr=0", "--set", "prior.train.steps=2", "--set", "prior.train.eval_every=0"])
    src, new = _weights(run / "prior.pt"), _weights(out / "prior.pt")
    assert src.keys() == new.keys() and all(torch.equal(src[k], new[k]) for k in src)
    train_clip([*argv, "--out", str(out), "--init-from", str(run / "clip.pt"), "--set", "clip.train.lr=0",
                "--set", "clip.train.steps=2"])
    src, new = _weights(run / "clip.pt"), _weights(out / "clip.pt")
    assert all(torch.equal(src[k], new[k]) for k in src)
    assert load_checkpoint(out / "clip.pt")["tokenizer"] == load_checkpoint(run / "clip.pt")["tokenizer"]


def test_decoder_from_an_exported_half_precision_folder_and_mismatch_refused(tiny_run, tmp_path):
    from dalle2 import DALLE2
    from dalle2.train_decoder import main as train_decoder
    run, argv = tiny_run
    ckpt = load_checkpoint(run / "decoder.pt")
    DALLE2.from_run(run).save_pretrained(tmp_path / "export", dtype=torch.float16)
    out = tmp_path / "more"
    train_decoder([*argv, "--out", str(out), "--clip", str(run / "clip.pt"), "--init-from", str(tmp_path / "export"),
                   "--set", "decoder.train.lr=0", "--set", "decoder.train.steps=1",
                   "--set", "decoder.train.ema_decay=0"])
    new = _weights(out / "decoder.pt")
    assert all(torch.equal(new[k], ckpt["model"][k].half().float()) for k in new)
    with pytest.raises(CheckpointError, match=r"other decoder.model settings \(clip_tokens: 4 vs 2\)"):
        train_decoder([*argv, "--out", str(tmp_path / "other"), "--clip", str(run / "clip.pt"),
                       "--init-from", str(run), "--set", "decoder.model.clip_tokens=2"])
