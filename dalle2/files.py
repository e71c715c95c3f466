"""Writing files so that neither a reader nor a crash ever sees half of one.

Every artifact the project writes (checkpoints, caches, configs, reports, pictures) goes through
`atomic_write`: the bytes go to a temporary sibling, which is then renamed over the real name.
A rename within one folder is atomic, so the real name always holds either the old file or the new
one, and a failed write leaves nothing behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` with a temporary sibling of `path` open for binary writing, then rename it to
    `path`. Creates the folder; removes the temporary file if anything fails. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8) to `path`, atomically (see atomic_write)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
