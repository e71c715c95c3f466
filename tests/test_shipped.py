"""The weights shipped in checkpoints/ (dalle2.pretrained.SHIPPED): they load with no pickle, fit the
size limits, and draw the stated colour and shape at the rate they were measured to reach when they
were shipped. Skipped in a copy of the repo without them."""
import pytest
import torch

from dalle2 import DALLE2, pretrained
from dalle2.evaluation import faithfulness
from dalle2.evaluation.reader import AttributeReader

pytestmark = pytest.mark.skipif(not pretrained.SHIPPED.is_dir(), reason="no shipped weights in this copy")

# Seen one-object captions, every shape and a spread of colours (none is a held-out pair).
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow rectangle", "an orange ellipse",
            "a purple pentagon", "a large white circle", "a large black square", "a large navy rectangle",
            "a large teal ellipse", "a large pink triangle", "a large gold pentagon", "a magenta circle",
            "a cyan rectangle", "an olive square", "a maroon ellipse"]
# Set from what the shipped weights reach on these captions with the settings below (their defaults),
# well above what models that draw blobs reach (the tiny preset: shape 0.30 on test captions).
FLOORS = {"colour": 0.8, "shape": 0.4}  # measured: colour 1.000, shape 0.5625 (18 of 32), at both DDIM 20/20
# (the defaults shipped first) and DPM-Solver++(2M) 8/8 (the defaults since)
SETTINGS = dict(n_per_text=2, seed=0)


def test_shipped_folder_loads_with_no_pickle_and_fits_the_size_limits(forbid_pickle):
    model = DALLE2.from_pretrained()
    forbid_pickle.undo()
    sizes = {s: (pretrained.SHIPPED / s / "model.safetensors").stat().st_size for s in pretrained.STAGES}
    assert all(b <= 16 * 2 ** 20 for b in sizes.values()) and sum(sizes.values()) <= 48 * 2 ** 20, sizes
    assert all(p.dtype == torch.float32 for p in model.parameters())  # half on disk, upcast at load


def test_shipped_model_draws_the_stated_colour_and_shape():
    model = DALLE2.from_pretrained().val_mode()
    images = model.generate(CAPTIONS, **SETTINGS) * 2 - 1  # [0, 1] -> the reader's [-1, 1]
    captions = [c for c in CAPTIONS for _ in range(SETTINGS["n_per_text"])]
    reader = AttributeReader.default(model.decoder.config.data.image_size)
    seen = faithfulness.evaluate(reader, images, captions)["summary"]["seen"]
    for key, floor in FLOORS.items():
        assert seen[key] >= floor, (key, seen)
