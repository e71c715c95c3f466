"""Loading a split of any source as a `CaptionedImages` (data/captioned.py): the dispatcher.

Every stage (CLIP, prior, decoder) trains on a `CaptionedImages`: all images as one uint8 tensor
(N, 3, H, W), every caption as an index into one table of unique strings. A batch is
`data.sample(idx, generator, flip)`: a gather, an optional horizontal flip and a caption pick, with
no Python loop over rows and no DataLoader workers, so data is never the bottleneck on small
datasets (the anti-pattern this replaces is per-sample decoding in `Dataset.__getitem__`).

Sources (`load_dataset(cfg, split)` dispatches on `cfg.dataset`):
- "shapes": the synthetic dataset of data/SHAPES_SPEC.md, generated on first use if missing.
- "cifar10": the python-format CIFAR-10 folder, captions from templates (data/cifar.py).
- "folder": your own images plus a captions file (CSV or JSONL), a Hugging Face ImageFolder
  metadata.jsonl, or a caption .txt beside each image.
Decoded, resized images are cached as .npy next to the data; a stale cache is rebuilt.

Batches for training come from `StepBatches`, a pure function of the step: resuming at step s
replays exactly the batches an uninterrupted run would have seen, on any number of ranks.

Horizontal flips swap the words "left" and "right" in the caption, so flipped pairs stay true
(an unflipped "a red circle at the top left" mirrored is a red circle at the top right); on shapes the
position word is recomputed from the mirrored box, since near the middle a mirror can change the class.
"""
from __future__ import annotations

from pathlib import Path

from dalle2.core.runtime import DistInfo, rank0_first
from data.captioned import SPLITS, CaptionedImages, DatasetError
from data.cifar import load_cifar10
from data.folder import load_folder
from data.shapes import load_shapes

DATASETS = ("shapes", "cifar10", "folder")


def load_dataset(cfg, split: str, generate_missing: bool = True, progress: bool = True) -> CaptionedImages:
    """Load one split as a CaptionedImages, from a DataConfig-like object.

    cfg attributes: dataset ("shapes" | "cifar10" | "folder"), root (relative to the working
    directory), image_size, seed; shapes: variant, n_train, n_test (used only to generate a
    missing dataset); folder: captions_file (relative to root); cifar10: download.
    n_train / n_test do not subset CIFAR-10 or folders: the whole split is loaded.
    cfg.flip is the trainer's concern (it is passed to `sample`), not read here.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}, expected one of {SPLITS}")
    size = int(cfg.image_size)
    if size < 1:
        raise DatasetError(f"image_size must be positive, got {size}")
    root = Path(cfg.root)
    kind = cfg.dataset
    if kind == "shapes":
        return load_shapes(root, split, size, variant=getattr(cfg, "variant", "objects"),
                           n_train=getattr(cfg, "n_train", 20000), n_test=getattr(cfg, "n_test", 2000),
                           seed=getattr(cfg, "seed", 0), generate_missing=generate_missing, progress=progress)
    if kind == "cifar10":
        return load_cifar10(root, split, size, download=getattr(cfg, "download", False), progress=progress)
    if kind == "folder":
        return load_folder(root, split, size, captions_file=getattr(cfg, "captions_file", "captions.jsonl"),
                           seed=getattr(cfg, "seed", 0), progress=progress)
    raise DatasetError(f"unknown dataset {kind!r}, expected one of {DATASETS}")


def load_data(data_cfg, dist_info: DistInfo):
    """(train, test) datasets; the shapes data is generated on first use (by rank 0 only)."""
    return rank0_first(lambda: (load_dataset(data_cfg, "train"), load_dataset(data_cfg, "test")), dist_info)
