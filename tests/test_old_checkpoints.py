"""Checkpoints written before the code moved (commit cf43c73: the flat dalle2/ layout, the decoder's own
text encoder with its old parameter names) still load and draw exactly what they drew then.

tests/data/run_cf43c73/ is a tiny run (2 steps per stage, decoder.model.text_encoder=own) trained with
that commit; expected.pt holds the images it generated there with the call below."""
from pathlib import Path

import torch

from dalle2 import DALLE2

RUN = Path(__file__).resolve().parent / "data" / "run_cf43c73"


def test_a_run_from_before_the_layout_change_loads_and_draws_the_same_images():
    model = DALLE2.from_run(RUN)
    assert [k for k in torch.load(RUN / "decoder.pt", weights_only=True)["model"] if "positional_embedding" in k]
    images = model.generate(["a red circle", "a large gold pentagon"], seed=0, steps=4, prior_steps=4)
    expected = torch.load(RUN / "expected.pt", weights_only=True)["images"]
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-4)
