"""Fault injection for the reliability tests: kill a process at a chosen point, a full disk, a
read-only folder, a torn file. Plain helpers, no fixtures, so any test can combine them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def env(**extra) -> dict:
    """The environment for a child python: this checkout first on the path, one thread, no bars."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **extra}


def run_py(args: list, timeout: float = 120, file_size_limit: int | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `python ARGS` from the repo root. `file_size_limit` (bytes) makes every write past that
    size fail with EFBIG, the way a full disk fails a write (SIGXFSZ is ignored so the write
    returns an error instead of killing the process)."""
    def limit():
        if file_size_limit is not None:
            import resource  # POSIX only
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env(), preexec_fn=limit if file_size_limit is not None else None, **kw)


@contextmanager
def file_size_limit(n_bytes: int):
    """In this process: every write past n_bytes fails with EFBIG, like a full disk (restored after)."""
    import resource  # POSIX only
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def cli(main, argv: list, capsys) -> tuple:
    """Run an entry point's main through main_wrapper in this process: (exit code, stderr lines)."""
    from dalle2.core.cli import main_wrapper
    capsys.readouterr()
    try:
        main_wrapper(main)([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, error_lines(capsys.readouterr().err)


def start_py(args: list, **kw) -> subprocess.Popen:
    """Start `python ARGS` from the repo root (stdout/stderr captured as text)."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), **kw)


def wait_for(predicate, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    """Poll until predicate() is true; fails early if `proc` exits first."""
    t0 = time.monotonic()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited with {proc.returncode} before the condition:\n{err[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def dead_pid() -> int:
    """The id of a process that has exited (for stale locks and orphan temporary files)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.strip()]


class ReadOnly:
    """`with ReadOnly(folder):` the folder cannot be written (mode restored afterwards)."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def __enter__(self):
        self.mode = self.folder.stat().st_mode
        self.folder.chmod(0o555)
        return self.folder

    def __exit__(self, *exc):
        self.folder.chmod(self.mode)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
