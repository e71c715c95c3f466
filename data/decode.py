"""Image files to one uint8 array, once: decoding (in parallel for large folders), resizing, the
.npy cache kept next to the data (rebuilt when the files change), and the metadata-file readers the
sources share.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from dalle2.core.files import atomic_write, clean_orphans
from data.captioned import DatasetError

CACHE_VERSION = 1  # bump when decoding changes, so old caches are rebuilt


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

