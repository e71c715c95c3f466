"""CIFAR-10 as captioned images: the python-format folder, captions from prompt templates.

Reads root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} itself (pickled dicts:
b"data" uint8 (N, 3072) as R, G, B planes of 32x32 row-major, b"labels", b"label_names"), so a
folder is accepted without torchvision's md5 checks; torchvision is used only to download.
The pickles are read with a restricted unpickler that builds only what the format uses (dicts, lists,
bytes, str, numbers and numpy arrays); any other object in a file is refused with a message, so a
planted file cannot run code.

Captions follow CLIP's zero-shot prompts (Radford et al. 2021, sec. 3.1.4): "a photo of a {}".
Train images get every template as a caption variant (sample() draws one each time); test images
get one fixed template each (index % number of templates), so evaluation is deterministic.
The whole split is always loaded: the config's n_train / n_test do not apply to CIFAR-10.
"""

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from data.captioned import CaptionedImages, DatasetError
from data.decode import cached_images, file_stamp, resize_images

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
SPLIT_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

CIFAR_TEMPLATES = (
    "a photo of a {}",
    "a {}",
    "the photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a blurry photo of a {}",
    "a close-up photo of a {}",
    "a low resolution photo of a {}",
    "a good photo of a {}",
    "a small photo of a {}",
)

_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def with_articles(text: str) -> str:
    """Fix the indefinite article before a vowel: "a photo of a airplane" -> "a photo of an airplane"."""
    return _ARTICLE.sub(lambda m: m.group(1) + "n ", text)


def class_captions(class_names, templates=CIFAR_TEMPLATES) -> list:
    """Every (class, template) caption, class-major: caption of class c, template t is at c * T + t."""
    return [with_articles(t.format(name.replace("_", " "))) for name in class_names for t in templates]


def _get(d: dict, key: str):
    """The pickles were written by Python 2: keys are bytes; accept str keys too."""
    return d[key.encode()] if key.encode() in d else d[key]


# The only globals a CIFAR-10 batch refers to: numpy's array and dtype reconstruction (numpy 1 and 2
# module names; _frombuffer is what protocol-5 pickles of arrays use) and the codec Python 3 uses for
# bytes in protocol 2. Containers, bytes, str and numbers need no globals at all.
SAFE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class UnsafePickle(pickle.UnpicklingError):
    """A CIFAR-10 file asked for an object the format never contains."""


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SAFE_GLOBALS:
            raise UnsafePickle(f"it refers to {module}.{name}, which a CIFAR-10 batch never contains "
                               f"(refused: loading it could run code)")
        return super().find_class(module, name)


def safe_unpickle(f):
    """pickle.load restricted to SAFE_GLOBALS, with Python 2 strings read as bytes."""
    return _CifarUnpickler(f, encoding="bytes").load()


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = safe_unpickle(f)
    except UnsafePickle as e:
        raise DatasetError(f"CIFAR-10 file {path} is not a plain CIFAR batch: {e}") from None
    except Exception as e:
        raise DatasetError(f"cannot read CIFAR-10 file {path}: {e}") from e
    if not isinstance(d, dict):
        raise DatasetError(f"CIFAR-10 file {path}: expected a pickled dict, got {type(d).__name__}")
    return d


def missing_files(root, split: str) -> list:
    folder = Path(root) / FOLDER
    return [folder / name for name in SPLIT_FILES[split] + ("batches.meta",) if not (folder / name).is_file()]


def read_cifar10(root, split: str):
    """-> images (N, 3, 32, 32) uint8 numpy, labels (N,) int64 numpy, class_names list[str]."""
    folder = Path(root) / FOLDER
    try:
        names = _get(_unpickle(folder / "batches.meta"), "label_names")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except KeyError:
        raise DatasetError(f"CIFAR-10 file {folder / 'batches.meta'} has no label_names") from None
    images, labels = [], []
    for name in SPLIT_FILES[split]:
        path = folder / name
        d = _unpickle(path)
        try:
            data = np.asarray(_get(d, "data"), dtype=np.uint8)
            lab = np.asarray(_get(d, "labels"), dtype=np.int64)
        except KeyError as e:
            raise DatasetError(f"CIFAR-10 file {path} has no {e.args[0]!r} entry") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or lab.shape != (data.shape[0],):
            raise DatasetError(f"CIFAR-10 file {path}: expected data (N, 3072) and N labels, got "
                               f"{data.shape} and {lab.shape}")
        if lab.size and (lab.min() < 0 or lab.max() >= len(class_names)):
            raise DatasetError(f"CIFAR-10 file {path}: labels outside 0..{len(class_names) - 1}")
        images.append(data.reshape(-1, 3, 32, 32))  # (N, 3, 32, 32): the rows are R, G, B planes
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels), class_names


def download_cifar10(root) -> None:
    """Download and extract CIFAR-10 into root with torchvision (the only use of torchvision)."""
    import torchvision  # lazy: slow to import and only needed here
    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as e:
        raise DatasetError(f"downloading CIFAR-10 into {root} failed ({e}); download {CIFAR_URL} "
                           f"yourself and extract it into {root}") from e


def load_cifar10(root, split: str, image_size: int = 32, download: bool = False,
                 progress: bool = True) -> CaptionedImages:
    """CIFAR-10 split as CaptionedImages with labels and class_names. 32 px natively; another
    image_size is a Pillow LANCZOS resize, cached next to the data like the shapes dataset."""
    root = Path(root)
    missing = missing_files(root, split)
    if missing and download:
        download_cifar10(root)
        missing = missing_files(root, split)
    if missing:
        raise DatasetError(
            f"CIFAR-10 not found: looked in {root / FOLDER} and {missing[0].name} is missing. "
            f"Get it with `--set data.download=true` (torchvision.datasets.CIFAR10(root, download=True)), "
            f"or download {CIFAR_URL} and extract it into {root}")
    images, labels, class_names = read_cifar10(root, split)
    n = len(labels)

    if image_size != 32:
        folder = root / FOLDER
        key = {"files": {f: file_stamp(folder / f) for f in SPLIT_FILES[split]}, "image_size": image_size}

        def resize():
            return resize_images(images, image_size, f"resizing CIFAR-10 {split} to {image_size} px", progress)

        images = cached_images(folder / ".cache" / f"{split}_{image_size}.npy", key, (n, 3, image_size, image_size),
                               resize)

    templates = CIFAR_TEMPLATES
    t = len(templates)
    captions = class_captions(class_names, templates)
    label_t = torch.from_numpy(labels)
    if split == "train":
        caption_ids = label_t[:, None] * t + torch.arange(t)  # (N, T): every template is a variant
        num_captions = torch.full((n,), t, dtype=torch.long)
    else:
        caption_ids = (label_t * t + torch.arange(n) % t)[:, None]  # (N, 1): one fixed template each
        num_captions = torch.ones(n, dtype=torch.long)
    flip_ids = torch.arange(len(captions))  # no left/right in CIFAR captions: each is its own flip
    return CaptionedImages(torch.from_numpy(np.ascontiguousarray(images)), captions, caption_ids,
                           num_captions, flip_ids, name=f"cifar10/{split}", labels=label_t,
                           class_names=class_names)
