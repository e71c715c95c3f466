"""DALLE2 and sample.py on the session's tiny run: shapes, determinism, guidance, the seed README's
call style, the manipulations, the files sample.py writes, and its error messages."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle2 import DALLE2
from dalle2.core.checkpoint import CheckpointError
from dalle2.diffusion import classifier_free_guidance

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tiny_run):
    return DALLE2.from_run(tiny_run[0]).val_mode()


def test_generate_shapes_range_and_determinism(model):
    images = model.generate(["a red circle", "a large gold pentagon"], n_per_text=3, seed=5, batch_size=4)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    again = model.generate(["a red circle", "a large gold pentagon"], n_per_text=3, seed=5, batch_size=4)
    assert torch.equal(images, again)
    other = model.generate(["a red circle", "a large gold pentagon"], n_per_text=3, seed=6, batch_size=4)
    assert not torch.equal(images, other)
    pil = model.to_pil(images)
    assert len(pil) == 6 and pil[0].size == (32, 32)


def test_seed_readme_call_style(model):
    image = model((3, 32, 32), text="a large gold pentagon and a small blue circle", cf_guidance_scale=2)
    assert image.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="32x32"):
        model((3, 64, 64), text="a red circle")


def test_guidance_scale_one_is_the_plain_conditional_prediction(model):
    unet = model.decoder.unet
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([10, 40])
    with torch.no_grad():
        _, enc, mask = model.clip.encode_text_tokens(model.tokenizer(["a red circle", "a blue square"]))
        kw = {"image_emb": torch.nn.functional.normalize(torch.randn(2, model.clip.embed_dim), dim=-1),
              **unet.text_inputs(model.tokenizer(["a red circle", "a blue square"]), enc, mask)}
        plain = unet(x, t, **kw)
        guided = classifier_free_guidance(unet, 1.0)(x, t, **kw)
        uncond = unet(x, t, **kw, cond_drop=torch.ones(2, dtype=torch.bool))
        strong = classifier_free_guidance(unet, 3.0)(x, t, **kw)
    assert torch.equal(plain, guided)
    torch.testing.assert_close(strong, uncond + 3.0 * (plain - uncond), rtol=1e-4, atol=1e-5)


def test_manipulations_run(model):
    image = model.generate(["a red circle"], seed=1)[0]
    assert model.variations(image, n=3).shape == (3, 3, 32, 32)
    other = model.generate(["a blue square"], seed=2)[0]
    frames = model.interpolate(image, other, steps=4)
    assert frames.shape == (4, 3, 32, 32)
    edits = model.text_diff(image, "a red circle", "a blue circle", amounts=(0.0, 0.5))
    assert edits.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="at least one caption"):
        model.generate([])


def test_sample_py_writes_the_specified_files(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na small navy square\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "sample.py", "a large gold pentagon", "--prompts", str(prompts), "--n", "2",
           "--checkpoints", str(tiny_run[0]), "--out", str(out), "--seed", "3", "--steps", "4", "--prior-steps", "4"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000_0.png", "0000_1.png", "0001_0.png", "0001_1.png", "0002_0.png", "0002_1.png", "grid.png",
                     "samples.jsonl"]
    first = (out / "0001_0.png").read_bytes()
    r = subprocess.run(cmd[:-8] + ["--out", str(tmp_path / "again"), "--seed", "3", "--steps", "4",
                                   "--prior-steps", "4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "again" / "0001_0.png").read_bytes() == first  # same seed, same image
    single = tmp_path / "single"
    subprocess.run([sys.executable, "sample.py", "a red circle", "--checkpoints", str(tiny_run[0]),
                    "--out", str(single), "--steps", "2", "--prior-steps", "2"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in single.iterdir()) == ["0000.png", "grid.png", "samples.jsonl"]


def test_sample_py_pngs_carry_their_settings(tiny_run, tmp_path):
    """Each PNG's "dalle2" text chunk and its samples.jsonl line hold the caption, the seed, the resolved
    settings and the weights' hashes; calling generate with them gives the same pixels back."""
    import json

    import numpy as np
    from PIL import Image
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "sample.py", "a red circle", "a small navy square", "--n", "2",
                        "--checkpoints", str(tiny_run[0]), "--out", str(out), "--seed", "7", "--steps", "3",
                        "--prior-steps", "2", "--guidance-scale", "2.5"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [l["file"] for l in lines] == ["0000_0.png", "0000_1.png", "0001_0.png", "0001_1.png"]
    model = DALLE2.from_run(tiny_run[0])
    hashes = {"clip": model.clip.checkpoint_hash, "prior": model.prior.checkpoint_hash,
              "decoder": model.decoder.checkpoint_hash}
    for i, line in enumerate(lines):
        with Image.open(out / line["file"]) as im:
            meta = json.loads(im.text["dalle2"])
            assert im.text["Description"] == meta["caption"]
        assert {**meta, "file": line["file"]} == line
        assert meta["caption"] == ["a red circle", "a small navy square"][i // 2] and meta["index"] == i
        # image m of a caption has seed 7 + m (per-image seeds)
        assert (meta["seed"], meta["guidance_scale"], meta["steps"], meta["prior_steps"]) == (7 + i % 2, 2.5, 3, 2)
        assert meta["sampler"] == model.sampling.sampler and meta["weights"] == hashes
    m = lines[3]
    # the record alone remakes its image: its caption and its own seed, no other caption, no batch
    remade = model.generate([m["caption"]], seed=m["seed"], guidance_scale=m["guidance_scale"], steps=m["steps"],
                            prior_steps=m["prior_steps"], sampler=m["sampler"])[0]
    with Image.open(out / m["file"]) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(model.to_pil(remade[None])[0]))


def test_sample_py_errors_are_one_line(tiny_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cases = [(["--prompts", str(empty), "--checkpoints", str(tiny_run[0])], "no captions"),
             (["a red circle", "--checkpoints", str(tmp_path / "nowhere")], "missing clip.pt, prior.pt, decoder.pt"),
             (["a red circle", "--checkpoints", str(tiny_run[0]), "--out", str(blocker / "sub")],
              "cannot create the output folder")]
    for args, words in cases:
        r = subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode != 0 and len(lines) == 1 and words in lines[0], r.stderr


def test_stages_from_different_clips_do_not_fit_together(tiny_run, tmp_path):
    from clip.model import CLIP
    from dalle2.decoder import Decoder
    from dalle2.prior import DiffusionPrior
    run = tiny_run[0]
    clip = CLIP.from_checkpoint(run / "clip.pt")
    clip.checkpoint_hash = "0123456789abcdef"  # as if another CLIP had been loaded
    with pytest.raises(CheckpointError, match="trained on CLIP"):
        DALLE2(clip, DiffusionPrior.from_checkpoint(run / "prior.pt"), Decoder.from_checkpoint(run / "decoder.pt"))


def test_compiled_sampling_matches_eager_and_compiles_once(tiny_run):
    """Compiled networks give eager's images, and once warm, further samples and steps reuse the
    compiled graphs: a recompilation per step or per sample would cost more than it saves (and on
    CUDA re-record the CUDA graphs)."""
    from torch._dynamo.utils import counters
    model = DALLE2.from_run(tiny_run[0]).val_mode()
    eager = model.generate(["a red circle"], steps=2, prior_steps=2, seed=0)
    compiled = model.compile().generate(["a red circle"], steps=2, prior_steps=2, seed=0)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    frames = counters["frames"]["ok"]
    model.generate(["a blue square", "the small teal triangle"], steps=4, prior_steps=3, seed=1)  # new rows too
    warm = counters["frames"]["ok"]
    model.generate(["a green circle", "a red square"], steps=5, prior_steps=4, seed=2)
    assert counters["frames"]["ok"] == warm, "a warm compiled pipeline recompiled"
    assert frames >= 2 and warm - frames <= 2  # compiled at all; at most one recompile per network (new batch size)
