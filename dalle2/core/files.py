"""Writing files so that neither a reader nor a crash ever sees half of one.

Every artifact the project writes (checkpoints, caches, configs, reports, pictures) goes through
`atomic_write`: the bytes go to a temporary sibling, which is then renamed over the real name.
A rename within one folder is atomic, so the real name always holds either the old file or the new
one, and a failed write leaves nothing behind.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import time
from pathlib import Path
from typing import BinaryIO, Callable

from dalle2.core.errors import Dalle2Error


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` with a temporary sibling of `path` open for binary writing, then rename it to
    `path`. Creates the folder; removes the temporary file if anything fails. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)  # a leftover (or a planted symlink) is removed, never written through
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save may wrap the OSError of a full disk
        err = _write_error(e, path)
        if err is e:
            raise
        raise err from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


FULL = {getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT") if hasattr(errno, n)}


def _write_error(e: BaseException, path: Path) -> BaseException:
    """An OSError that names `path` (a write through a file object has no filename of its own)."""
    cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
    if not isinstance(cause, OSError):
        return e
    if cause.filename and Path(cause.filename).name != f".{path.name}.tmp-{os.getpid()}":
        return cause  # about another file (e.g. a folder that cannot be created): keep it
    why = cause.strerror or str(cause)
    if cause.errno in FULL:
        why += ": the disk is full or the file is over a size limit; nothing was replaced"
    return type(cause)(cause.errno, f"cannot write ({why})", str(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8) to `path`, atomically (see atomic_write)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# --- locks and leftovers ----------------------------------------------------------------------

LOCK_NAME = ".lock"
_TMP_PID = re.compile(r"^\..+\.tmp-(\d+)$")  # atomic_write's temporary names: .<name>.tmp-<pid>


class LockError(Dalle2Error):
    """Another live process holds a folder's lock; the message names the folder and the pid."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 checks without sending)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        import ctypes
        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if handle:
            ctypes.windll.kernel32.CloseHandle(handle)
        return bool(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class FolderLock:
    """`folder/.lock`, holding the holder's pid and host, so two processes never write one folder.

    The lock file appears complete or not at all (written under a temporary name, then hard-linked
    to `.lock`, which fails if it exists). A lock whose pid is dead on this host is stale (its holder
    was killed) and is taken over; a live holder, or one on another host, is a LockError naming the
    folder and the pid. A holder with our own pid is an earlier use in this very process: taken over.
    Use as a context manager, or acquire() / release()."""

    def __init__(self, folder, what: str = "this folder"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.held = False

    def _holder(self):
        """(pid, host) of the lock file; (None, "") if there is none; pid 0 (never alive) for a file
        that holds no pid (not written by this class, whose lock files appear complete)."""
        try:
            pid, host = (self.path.read_text(errors="replace").split() + ["", ""])[:2]
        except FileNotFoundError:
            return None, ""
        except OSError:
            return 0, socket.gethostname()
        try:
            return int(pid), host or socket.gethostname()
        except ValueError:  # being written by an exclusive create (no hard links), or junk once it is old
            try:
                young = time.time() - self.path.stat().st_mtime < 5
            except OSError:
                young = True
            return (None, "") if young else (0, socket.gethostname())

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = socket.gethostname()
        tmp = self.folder / f".lock.tmp-{os.getpid()}"
        tmp.write_text(f"{os.getpid()} {me}\n")
        try:
            for _ in range(5):
                try:
                    try:
                        os.link(tmp, self.path)
                    except FileExistsError:
                        raise
                    except OSError:  # a filesystem without hard links: exclusive create instead
                        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                        with os.fdopen(fd, "w") as f:
                            f.write(f"{os.getpid()} {me}\n")
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                pid, host = self._holder()
                if pid is None:  # vanished between link and read, or still being written: try again
                    time.sleep(0.2)
                    continue
                if host == me and (pid == os.getpid() or not pid_alive(pid)):
                    self.path.unlink(missing_ok=True)  # stale: its holder is gone
                    continue
                where = "" if host == me else f" on host {host}"
                raise LockError(f"{self.folder} is in use: {self.what} is locked by process {pid}{where} "
                                f"({self.path}). Wait for it to finish or stop it; if no such process is "
                                f"running, delete {self.path}")
            raise LockError(f"{self.folder}: could not take the lock {self.path}")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.held = False
            if self._holder()[0] == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_orphans(folder) -> list:
    """Delete temporary files that killed atomic writes left in `folder` (`.<name>.tmp-<pid>` whose
    process is gone); files of live processes are left alone. Returns the deleted paths."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TMP_PID.match(e.name)
        if m and e.is_file(follow_symlinks=False) and not pid_alive(int(m.group(1))):
            try:
                os.unlink(e.path)
                removed.append(Path(e.path))
            except OSError:
                pass
    return removed
