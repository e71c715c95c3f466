"""variations, interpolate and text_diff (paper section 3) on batches: every image of a batch is used
(they once silently kept only the first), and image i of a batch gets what the single call gives it."""
import pytest
import torch

from dalle2 import DALLE2


@pytest.fixture(scope="module")
def model_and_images(tiny_run):
    model = DALLE2.from_run(tiny_run[0]).val_mode()
    images = model.generate(["a red circle", "a large blue square"], seed=1, steps=2, prior_steps=2)  # (2, 3, 32, 32)
    return model, images


def test_variations_decode_every_image_of_a_batch(model_and_images, monkeypatch):
    model, images = model_and_images
    seen = {}
    decode = model._decode

    def spy(z, tokens, **kw):
        seen["z"] = z
        return decode(z, tokens, **kw)
    monkeypatch.setattr(model, "_decode", spy)
    out = model.variations(images, n=3, steps=2)
    assert out.shape == (6, 3, 32, 32)
    want = model.encode_image(images).repeat_interleave(3, dim=0)  # rows: image 0 three times, then image 1
    torch.testing.assert_close(seen["z"], want)
    assert not torch.allclose(want[0], want[3])  # the two images really differ in CLIP space


def test_interpolate_and_text_diff_batches_match_single_calls(model_and_images):
    model, images = model_and_images
    a, b = images, images.flip(0)
    frames = model.interpolate(a, b, steps=3, seed=4)
    assert frames.shape == (6, 3, 32, 32)
    for i in range(2):
        single = model.interpolate(a[i], b[i], steps=3, seed=4 + i)
        torch.testing.assert_close(frames[3 * i:3 * i + 3], single, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="same number"):
        model.interpolate(a, b[:1])

    edits = model.text_diff(images, "a red circle", "a blue circle", amounts=(0.0, 0.5), steps=3)
    assert edits.shape == (4, 3, 32, 32)
    for i in range(2):
        single = model.text_diff(images[i], "a red circle", "a blue circle", amounts=(0.0, 0.5), steps=3)
        torch.testing.assert_close(edits[2 * i:2 * i + 2], single, rtol=0, atol=2e-3)
    assert not torch.allclose(edits[0], edits[2])  # image 1's edits are its own, not image 0's
