"""In-memory captioned image datasets: decode once, then sample batches by pure tensor indexing.

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

import hashlib
import json
import os
import re
import stat
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dalle2.core.files import atomic_write, clean_orphans

SPLITS = ("train", "test")
DATASETS = ("shapes", "cifar10", "folder")
CACHE_VERSION = 1  # bump when decoding changes, so old caches are rebuilt


class DatasetError(Exception):
    """Any problem with the data on disk: missing files, bad records, unreadable images."""


# ---------------------------------------------------------------------------------------------
# Captions and the flip rule.

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _swap_word(match: re.Match) -> str:
    word = match.group(0)
    new = "right" if word.lower() == "left" else "left"
    if word.isupper():
        return new.upper()
    if word[0].isupper():
        return new.capitalize()
    return new


def flip_caption(text: str) -> str:
    """The caption that is true of the horizontally mirrored image: "left" <-> "right".

    Whole words only ("leftover" is kept), case preserved ("Left" -> "Right", "LEFT" -> "RIGHT").
    Captions without those words are their own flip. Flipping twice gives the original back.
    """
    return _LEFT_RIGHT.sub(_swap_word, text)


def build_caption_table(variants: Sequence[Sequence[str]], flipped: Optional[Sequence[Sequence[str]]] = None):
    """Turn per-image caption lists into one table of captions plus index tensors.

    variants: for each image, its caption variants (>= 1; duplicates within an image are dropped).
    flipped: optionally, for each image, the caption true of its mirror image for each variant (parallel
      to variants); default flip_caption(c). Shapes positions need it: near the middle a mirrored box can
      change its position class, not just swap left/right (data/shapes.py `mirrored_caption`).
    Returns (captions, caption_ids (N, K), num_captions (N,), flip_ids (len(captions),)).
    The table also holds the flipped version of every caption, so a flip is one lookup in flip_ids.
    Each string appears once, except where images with the same caption have different true flips: an
    image whose flip is not flip_caption(c) gets an entry of its own for c (same string, its own flip id).
    Rows with fewer than K variants repeat theirs cyclically, so any column is a real variant.
    """
    # key: the caption string when its flip is flip_caption(string), else (string, its flip)
    index: dict = {}
    rows = []
    for i, vs in enumerate(variants):
        fs = [flip_caption(c) for c in vs] if flipped is None else list(flipped[i])
        if len(fs) != len(vs):
            raise ValueError(f"image {i}: {len(vs)} captions but {len(fs)} flipped captions")
        keys = (c if f == flip_caption(c) else (c, f) for c, f in zip(vs, fs))
        row = list(dict.fromkeys(index.setdefault(k, len(index)) for k in keys))
        if not row:
            raise ValueError("every image needs at least one caption")
        rows.append(row)
    flip_of = lambda k: flip_caption(k) if isinstance(k, str) else k[1]
    keys = list(index)
    for k in keys:  # grows while iterating: every flip becomes a (plain) entry too
        if flip_of(k) not in index:
            index[flip_of(k)] = len(index)
            keys.append(flip_of(k))
    captions = [k if isinstance(k, str) else k[0] for k in keys]
    flip_ids = torch.tensor([index[flip_of(k)] for k in keys], dtype=torch.long)
    k = max((len(r) for r in rows), default=1)
    caption_ids = torch.tensor([[r[j % len(r)] for j in range(k)] for r in rows], dtype=torch.long)
    caption_ids = caption_ids.view(len(rows), k)  # (N, K), also when N == 0
    num_captions = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return captions, caption_ids, num_captions, flip_ids


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) in [0, 255] -> float (N, 3, H, W) in [-1, 1], the models' range."""
    return images.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# The dataset container.

@dataclass
class CaptionedImages:
    """A whole split in memory. Tensors may live on the GPU (`.to(device)`); images stay uint8.

    images: (N, 3, H, W) uint8. captions: caption strings (originals and their flips; a string repeats
      only where images sharing it have different true flips, see build_caption_table).
    caption_ids: (N, K) long, each image's K variants as indices into `captions`.
    num_captions: (N,) long, how many of the K variants are real (>= 1).
    flip_ids: (len(captions),) long, the caption that is true after a horizontal flip.
    metadata: shapes' metadata.jsonl records (they describe the unflipped image), else None.
    labels: (N,) long class ids and class_names (CIFAR-10, for zero-shot classification), else None.
    """
    images: torch.Tensor
    captions: list
    caption_ids: torch.Tensor
    num_captions: torch.Tensor
    flip_ids: torch.Tensor
    metadata: Optional[list] = None
    name: str = ""
    labels: Optional[torch.Tensor] = None
    class_names: Optional[list] = None

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.dim() != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.caption_ids.dim() != 2 or self.caption_ids.shape[0] != n or self.num_captions.shape != (n,):
            raise ValueError("caption_ids must be (N, K) and num_captions (N,) for N images")
        if self.flip_ids.shape != (len(self.captions),):
            raise ValueError("flip_ids must have one entry per caption")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def to(self, device) -> "CaptionedImages":
        """A copy with every tensor on `device` (images stay uint8: 4x less memory than float)."""
        moved = {f: getattr(self, f).to(device) for f in
                 ("images", "caption_ids", "num_captions", "flip_ids")}
        if self.labels is not None:
            moved["labels"] = self.labels.to(device)
        return replace(self, **moved)

    def sample(self, idx: torch.Tensor, generator: torch.Generator, flip: bool):
        """Gather a batch, flip half of it at random, and pick a random real caption variant per row.

        idx: (B,) long image indices. generator: the only randomness; on the images' device (e.g.
        `StepBatches.generator`), nothing here waits for the GPU: no host copy, no data-dependent
        shape. Returns images (B, 3, H, W) uint8, caption ids (B,) long and flipped (B,) bool, all on
        the images' device. A flipped row's image is mirrored left-right and its caption replaced by
        its flip (left <-> right), so image and caption still agree.
        """
        device = self.images.device
        idx = idx.to(device)  # a no-op for indices from StepBatches(device=...)
        b = idx.shape[0]
        # Two draws in a fixed order from one generator: the same batch for the same step on resume.
        u = torch.rand(b, generator=generator, device=generator.device).to(device)
        flipped = (torch.rand(b, generator=generator, device=generator.device) < 0.5).to(device)
        if not flip:
            flipped = torch.zeros_like(flipped)

        num = self.num_captions.index_select(0, idx)  # (B,)
        variant = torch.minimum((u * num).long(), num - 1)  # uniform over the real variants only
        cap = self.caption_ids.index_select(0, idx).gather(1, variant[:, None]).squeeze(1)  # (B,)
        cap = torch.where(flipped, self.flip_ids[cap], cap)
        # index_select copies whole rows (memcpy), far faster than advanced indexing of uint8; the
        # mirror is a select over the whole batch (finding the flipped rows first would be a sync).
        images = self.images.index_select(0, idx)  # (B, 3, H, W)
        if flip:  # a Python bool: no sync
            images = torch.where(flipped[:, None, None, None], images.flip(-1), images)  # (B, 3, H, W)
        return images, cap, flipped

    def caption_of(self, i: int) -> str:
        """The first caption variant of image i."""
        return self.captions[int(self.caption_ids[i, 0])]


# ---------------------------------------------------------------------------------------------
# Decoding images, once, with a disk cache.

def square_resize(im: Image.Image, size: int) -> np.ndarray:
    """PIL RGB image -> (size, size, 3) uint8: centre-cropped to a square, then resized with
    Pillow's antialiased LANCZOS filter (as SHAPES_SPEC.md prescribes)."""
    w, h = im.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (size, size):
        im = im.resize((size, size), Image.LANCZOS)
    return np.asarray(im)


def load_image(path: Path, size: int) -> np.ndarray:
    """Read one image file (any format Pillow reads) -> (size, size, 3) uint8, see square_resize."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # forces the full decode inside the try
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except Exception as e:  # Pillow raises several types for truncated / foreign files
        raise DatasetError(f"cannot read image file {path}: {e}") from e
    return square_resize(im, size)


PARALLEL_MIN = 2048  # below this many files, starting worker processes costs more than it saves


def _fill(n: int, size: int, make: Callable[[int], np.ndarray], desc: str, progress: bool) -> np.ndarray:
    """Build (N, 3, size, size) uint8 from make(i) -> (size, size, 3), with a progress bar."""
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in tqdm(range(n), desc=desc, unit="img", disable=not progress, mininterval=0.5):
        out[i] = make(i)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # (N, 3, H, W)


def _decode_chunk(paths: list, size: int) -> np.ndarray:
    """Worker: decode a run of files -> (n, size, size, 3) uint8."""
    return np.stack([load_image(Path(p), size) for p in paths])


def decode_images(paths: Sequence[Path], size: int, desc: str, progress: bool = True) -> np.ndarray:
    """Decode and resize image files -> (N, 3, size, size) uint8, in file order.

    Many files are decoded by forked worker processes (like a DataLoader's), in chunks: threads do
    not help, the decode + resize holds the GIL for most of its time. Elsewhere (no fork, one core,
    few files) the files are decoded here, one by one.
    """
    n = len(paths)
    workers = min(os.cpu_count() or 1, 32)
    if n < PARALLEL_MIN or workers < 2 or "fork" not in mp.get_all_start_methods():
        return _fill(n, size, lambda i: load_image(paths[i], size), desc, progress)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    step = max(32, -(-n // (workers * 8)))  # ~8 chunks per worker: even load, frequent progress
    starts = range(0, n, step)
    chunks = [[str(p) for p in paths[s:s + step]] for s in starts]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool, \
            tqdm(total=n, desc=desc, unit="img", disable=not progress, mininterval=0.5) as bar:
        for s, arr in zip(starts, pool.map(_decode_chunk, chunks, [size] * len(chunks))):
            out[s:s + len(arr)] = arr
            bar.update(len(arr))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # (N, 3, H, W)


def resize_images(images: np.ndarray, size: int, desc: str, progress: bool = True) -> np.ndarray:
    """Resize a uint8 (N, 3, h, w) array -> (N, 3, size, size) with the same Pillow path as files."""
    def make(i):
        return square_resize(Image.fromarray(np.ascontiguousarray(images[i].transpose(1, 2, 0))), size)
    return _fill(len(images), size, make, desc, progress)


def cached_images(cache_file: Path, key: dict, shape: tuple, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Load a decoded uint8 array from `cache_file` if its key file matches `key`, else build and
    save it. A stale, unreadable or wrongly shaped cache is rebuilt, never used. A read-only data
    folder only costs the cache (a note is printed)."""
    key = {"version": CACHE_VERSION, **key}
    key_file = cache_file.with_name(cache_file.stem + ".key.json")
    try:
        if json.loads(key_file.read_text()) == key:
            arr = np.load(cache_file)
            if arr.shape == tuple(shape) and arr.dtype == np.uint8:
                return arr
    except (OSError, ValueError, EOFError):
        pass  # no cache, or a damaged one: rebuild
    arr = build()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        clean_orphans(cache_file.parent)  # temporary files of a rebuild that was killed
        # Array first, key second: a key only ever describes an array that is already complete.
        atomic_write(cache_file, lambda f: np.save(f, arr))
        atomic_write(key_file, lambda f: f.write(json.dumps(key, sort_keys=True).encode()))
    except OSError as e:
        print(f"note: could not write the image cache {cache_file}: {e}")
    return arr


def inside_folder(root: Path, name: str, listed_in: Path) -> Path:
    """`root / name` if it is a regular file inside `root` once symlinks are resolved, else a
    DatasetError. Absolute paths, `..` and symlinks out of the folder are refused before anything
    outside is looked at (so the message never tells whether some other file exists); FIFOs,
    devices and folders are refused without being opened (reading a FIFO would hang)."""
    base = root.resolve()
    try:
        path = (base / name).resolve()
    except (ValueError, OSError):  # a NUL byte, a symlink loop
        raise DatasetError(f"{listed_in} lists {name!r}, which is not a usable file name") from None
    if os.path.isabs(name) or path != base and base not in path.parents:
        raise DatasetError(f"{listed_in} lists {name!r}, which is outside the dataset folder {root}: image "
                           f"paths must be relative and stay inside it (symlinks out of it are refused)")
    try:
        st = path.stat()
    except OSError:
        raise DatasetError(f"image file not found: {root / name} (listed in {listed_in})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DatasetError(f"{root / name} (listed in {listed_in}) is not a regular file")
    return path


def files_digest(paths: list, entries: Optional[dict] = None) -> str:
    """sha1 of every file's name, size and mtime (ns), in order: what changes when any source image
    is replaced, edited or touched. `entries` ({name: os.DirEntry}) saves a stat call per file."""
    digest = hashlib.sha1()
    for p in paths:
        e = entries.get(p.name) if entries else None
        st = e.stat(follow_symlinks=False) if e is not None and Path(e.path) == p else p.stat()
        digest.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---------------------------------------------------------------------------------------------
# shapes (data/SHAPES_SPEC.md): DIR/<split>/metadata.jsonl + PNGs.

def jsonl_objects(path: Path):
    """Yield (line number, object) for each non-blank line of a JSONL file; a line that is not a
    JSON object is a DatasetError naming the file and line."""
    if path.exists() and not path.is_file():  # a FIFO would block the read forever
        raise DatasetError(f"{path} is not a regular file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DatasetError(f"{path}, line {lineno}: expected a JSON object")
        yield lineno, rec


def read_metadata(path: Path) -> list:
    """Read a shapes metadata.jsonl: one JSON object per line with at least "file" and "caption"."""
    records = []
    for lineno, rec in jsonl_objects(path):
        if not isinstance(rec.get("file"), str) or not isinstance(rec.get("caption"), str) \
                or not rec["caption"].strip():
            raise DatasetError(f"{path}, line {lineno}: expected an object with a \"file\" and a "
                               f"non-empty \"caption\" string")
        records.append(rec)
    return records


def load_shapes(root, split: str, image_size: int = 32, variant: str = "objects", n_train: int = 20000,
                n_test: int = 2000, seed: int = 0, generate_missing: bool = True,
                progress: bool = True) -> CaptionedImages:
    """Load root/<split> of the shapes dataset, generating the dataset first if it is missing.

    Files already on disk are used as they are (the generation arguments only matter when the
    dataset is generated); delete the folder to regenerate with other arguments.
    """
    root = Path(root)
    split_dir = root / split
    meta = split_dir / "metadata.jsonl"
    if not meta.exists():
        if not generate_missing:
            raise DatasetError(f"shapes dataset not found: {meta} does not exist (generate it with "
                               f"`python data/shapes.py --out {root}`)")
        from dalle2.core.files import LockError
        from data.shapes import NotOurFolder, check_output_folder, generate  # lazy: only needed on first use
        try:
            check_output_folder(root)
        except NotOurFolder as e:
            raise DatasetError(f"shapes dataset not found: {meta} does not exist, and {e}") from None
        print(f"shapes dataset not found at {root}: generating it ({n_train} train / {n_test} test, "
              f"variant {variant}, seed {seed})")
        try:
            generate(root, variant=variant, n_train=n_train, n_test=n_test, seed=seed, progress=progress)
        except (NotOurFolder, LockError) as e:
            raise DatasetError(str(e)) from None
        if not meta.exists():
            raise DatasetError(f"generating the shapes dataset did not create {meta}")

    records = read_metadata(meta)
    if not records:
        raise DatasetError(f"{meta} has no records: the {split} split is empty")
    # One directory listing instead of 20k stat calls: it checks every listed PNG exists (naming a
    # missing one before any decoding starts) and counts the files for the cache key.
    present = {e.name: e for e in os.scandir(split_dir) if e.is_file(follow_symlinks=False)}
    for r in records:
        if r["file"] not in present:  # not a plain file in the folder: a path, a symlink, a FIFO, missing
            inside_folder(split_dir, r["file"], meta)
    n_png = sum(1 for name in present if name.endswith(".png"))
    paths = [split_dir / r["file"] for r in records]
    expected = n_train if split == "train" else n_test
    if progress and len(records) != expected:
        print(f"note: {split_dir} has {len(records)} images (config asks for {expected}); "
              f"using the files on disk")

    key = {"n_files": n_png, "n_records": len(records), "metadata": file_stamp(meta), "image_size": image_size,
           "files": files_digest(paths, present)}  # a PNG replaced in place changes its size or mtime
    images = cached_images(split_dir / ".cache" / f"images_{image_size}.npy", key,
                           (len(records), 3, image_size, image_size),
                           lambda: decode_images(paths, image_size, f"decoding {split_dir}", progress))
    captions, caption_ids, num_captions, flip_ids = build_caption_table([[r["caption"]] for r in records],
                                                                        shapes_flipped_captions(records))
    return CaptionedImages(torch.from_numpy(images), captions, caption_ids, num_captions, flip_ids,
                           metadata=records, name=f"shapes/{variant}/{split}")


def shapes_flipped_captions(records: list) -> list:
    """For each shapes record, [the caption true of its mirror image]: position words recomputed from
    the mirrored boxes (data/shapes.py `mirrored_caption`), flip_caption where a record lacks boxes."""
    from data.shapes import mirrored_caption
    return [[mirrored_caption(r["caption"], r.get("objects")) or flip_caption(r["caption"])] for r in records]


# ---------------------------------------------------------------------------------------------
# Entry point used by every stage.

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
        from data.cifar import load_cifar10  # lazy: cifar.py imports this module
        return load_cifar10(root, split, size, download=getattr(cfg, "download", False), progress=progress)
    if kind == "folder":
        from data.folder import load_folder  # lazy, like cifar: folder.py imports this module
        return load_folder(root, split, size, captions_file=getattr(cfg, "captions_file", "captions.jsonl"),
                           seed=getattr(cfg, "seed", 0), progress=progress)
    raise DatasetError(f"unknown dataset {kind!r}, expected one of {DATASETS}")


# ---------------------------------------------------------------------------------------------
# Deterministic batches for exact resume and DDP.

def _mix(*parts) -> int:
    """A stable 63-bit seed from a few values (Python's hash() is salted for strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class StepBatches:
    """The batch of every step as a pure function of the step.

    The data is an endless stream of epoch permutations (epoch e shuffled by a generator seeded
    from (seed, e)); the global batch at `step` is stream positions [step*B, (step+1)*B), and rank r
    of world_size gets its contiguous slice of B // world_size. No state: resuming at step s gives
    exactly the batches of an uninterrupted run. A batch that straddles an epoch boundary takes
    the end of one permutation and the start of the next (it may repeat an image).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device="cpu"):
        if n < 1:
            raise ValueError(f"StepBatches needs a non-empty dataset, got n={n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        # Permutations, indices and the augmentation generator live on `device` (the GPU in training), so
        # a step's batch is drawn without a host-to-device copy. The same device gives the same batches.
        self.device = torch.device(device)
        self._perms: dict = {}  # a small cache of recent permutations; results never depend on it

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch `epoch`: a permutation of range(n), (n,) long on `device`."""
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator(device=self.device).manual_seed(_mix("epoch", self.seed, epoch))
            perm = torch.randperm(self.n, generator=g, device=self.device)
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def indices(self, step: int) -> torch.Tensor:
        """This rank's image indices for `step`: (batch_size // world_size,) long, on `device`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b = self.local_batch_size
        start = step * self.batch_size + self.rank * b  # stream positions [start, start + b)
        parts = []
        for e in range(start // self.n, (start + b - 1) // self.n + 1):  # python ints: no device sync
            lo, hi = max(start, e * self.n) - e * self.n, min(start + b, (e + 1) * self.n) - e * self.n
            parts.append(self.permutation(e)[lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def generator(self, step: int) -> torch.Generator:
        """A generator on `device` for this step's augmentation randomness (flips, caption variants),
        seeded from (seed, step, rank): reproducible on resume, different on each rank."""
        return torch.Generator(device=self.device).manual_seed(_mix("step", self.seed, step, self.rank))
