"""DALLE2.generate on the session's tiny run: per-image seeds (batch-size and caption-list independence,
seed lists), the per-step progress bar, bf16 networks, new samplers and options through sample.py."""
import copy

import pytest
import torch

import dalle2.unclip as unclip
from dalle2 import DALLE2
from dalle2.unclip import image_seeds

KW = dict(steps=3, prior_steps=3)


@pytest.fixture(scope="module")
def model(tiny_run):
    return DALLE2.from_run(tiny_run[0]).val_mode()


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # float differences between batch shapes only


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_an_image_does_not_depend_on_the_batch_size_or_the_other_captions(model, sampler):
    """The image of caption A with seed s is the same alone, with other captions before and after it, and
    at batch sizes 1 and 4 (DDPM: the per-step noise too)."""
    kw = dict(KW, sampler=sampler, seed=7)
    alone = model.generate(["a red circle"], n_per_text=2, batch_size=1, **kw)
    mixed = model.generate(["a blue square", "a red circle", "a large gold pentagon"], n_per_text=2, batch_size=4, **kw)
    close(mixed[2:4], alone)
    mixed_bs1 = model.generate(["a blue square", "a red circle", "a large gold pentagon"], n_per_text=2,
                               batch_size=1, **kw)
    close(mixed_bs1, mixed)
    assert not torch.allclose(mixed[0], mixed[1])  # an image per sample, not one noise per caption
    assert not torch.allclose(mixed[0], mixed[2])  # and different captions do not share noise


def test_seed_lists_and_image_seeds(model):
    """Image m of a caption with seed s has seed s + m, counted per caption; a list gives one per image."""
    assert image_seeds(["a", "b", "a", "a"], 5) == [5, 5, 6, 7]
    assert image_seeds(["a", "b"], [3, 9]) == [3, 9]
    with pytest.raises(ValueError, match="2 seeds given for 3 images"):
        image_seeds(["a", "b", "c"], [1, 2])
    with pytest.raises(ValueError, match="seed"):
        image_seeds(["a"], 1.5)
    three = model.generate(["a red circle"], n_per_text=3, seed=4, **KW)
    close(model.generate(["a red circle"], seed=6, **KW)[0], three[2])
    listed = model.generate(["a blue square", "a red circle"], seed=[11, 5], **KW)
    close(listed[1], three[1])
    close(listed[0], model.generate(["a blue square"], seed=11, **KW)[0])
    with pytest.raises(ValueError, match="seeds given"):
        model.generate(["a red circle"], n_per_text=2, seed=[1], **KW)


def test_guidance_interval_defaults_to_the_whole_schedule(model):
    plain = model.generate(["a red circle"], seed=1, **KW)
    close(model.generate(["a red circle"], seed=1, guidance_interval=[0.0, 1.0], **KW), plain)
    unguided = model.generate(["a red circle"], seed=1, guidance_scale=1.0, **KW)
    close(model.generate(["a red circle"], seed=1, guidance_interval=[0.9, 0.95], **KW), unguided)


def test_progress_counts_every_prior_and_decoder_step(model, monkeypatch):
    bars = []

    class Recorder:
        def __init__(self, total=None, **kwargs):
            self.total, self.n, self.kwargs = total, 0, kwargs
            bars.append(self)

        def update(self, k):
            self.n += k

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(unclip, "tqdm", Recorder)
    model.generate(["a red circle", "a blue square", "a green circle"], batch_size=2, steps=4, prior_steps=3,
                   progress=True)
    (bar,) = bars
    assert bar.total == 2 * (3 + 4) and bar.n == bar.total and bar.kwargs["unit"] == "step"
    assert bar.kwargs["disable"] is None  # tqdm's own rule: on for a terminal, off in logs
    model.generate(["a red circle"], **KW)
    assert bars[1].kwargs["disable"] is True


def test_bf16_networks_sample_close_to_fp32(model):
    """lean(bf16) casts the prior network and the UNet (not CLIP), sampling runs on them without autocast
    and stays close to float32; lean() on the CPU is float32 again."""
    lean = copy.deepcopy(model)
    fp32, emb32 = model.generate(["a red circle", "a blue square"], seed=3, return_embeddings=True, **KW)
    lean.lean(torch.bfloat16)
    assert next(lean.prior.net.parameters()).dtype == torch.bfloat16
    assert next(lean.decoder.unet.parameters()).dtype == torch.bfloat16
    assert next(lean.clip.parameters()).dtype == torch.float32
    bf16, emb16 = lean.generate(["a red circle", "a blue square"], seed=3, return_embeddings=True, **KW)
    assert bf16.dtype == torch.float32 and not torch.equal(emb16, emb32)  # computed in bf16 indeed
    torch.testing.assert_close(emb16, emb32, atol=0.05, rtol=0)
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)
    lean.lean()
    assert next(lean.decoder.unet.parameters()).dtype == torch.float32


def test_sample_py_takes_the_new_sampler_and_seed_lists(tiny_run, tmp_path):
    from sample import main, seeds
    assert seeds("3") == 3 and seeds("3,8") == [3, 8]
    with pytest.raises(SystemExit):
        main(["a red circle", "--n", "2", "--seed", "1,2,3", "--out", str(tmp_path / "x")])
    out = main(["a red circle", "a blue square", "--checkpoints", str(tiny_run[0]), "--out", str(tmp_path / "s"),
                "--sampler", "dpmpp2m", "--steps", "3", "--prior-steps", "3", "--seed", "4,9", "--device", "cpu"])
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "grid.png", "samples.jsonl"]
    import json
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [4, 9]  # each image's own seed, as the list gave it
    assert records[0]["guidance_interval"] == [0.0, 1.0]  # the config's: every step guided
    narrow = main(["a red circle", "--checkpoints", str(tiny_run[0]), "--out", str(tmp_path / "g"), "--steps", "3",
                   "--prior-steps", "3", "--seed", "4", "--device", "cpu", "--guidance-interval", "0.5", "1"])
    assert json.loads((narrow / "samples.jsonl").read_text())["guidance_interval"] == [0.5, 1.0]
    with pytest.raises(SystemExit, match="--guidance-interval"):
        main(["a red circle", "--guidance-interval", "0.8", "0.2", "--out", str(tmp_path / "x")])


def test_given_image_embeddings_are_decoded_instead_of_the_prior_samples(model, monkeypatch):
    """generate(image_embeds=E) decodes E with the captions from the same decoder noise: given the
    embeddings the prior drew, it draws the pipeline's own images, and the prior never runs."""
    captions = ["a red circle", "a blue square"]
    images, emb = model.generate(captions, n_per_text=2, seed=5, return_embeddings=True, **KW)

    def no_prior(*args, **kwargs):
        raise AssertionError("the prior ran although image embeddings were given")
    monkeypatch.setattr(model.prior, "sample", no_prior)
    again, emb_again = model.generate(captions, n_per_text=2, seed=5, return_embeddings=True, image_embeds=emb, **KW)
    close(again, images)
    assert torch.equal(emb_again, emb)
    other = model.generate(captions, n_per_text=2, seed=5, image_embeds=emb.flip(0), **KW)
    assert not torch.allclose(other[0], images[0])  # the embedding, not only the caption, steers the decoder
    with pytest.raises(ValueError, match=r"image_embeds must be \(4, "):
        model.generate(captions, n_per_text=2, image_embeds=emb[:3], **KW)
