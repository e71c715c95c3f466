"""Command-line plumbing shared by every entry point: the common arguments, config loading with
one-line errors, and the 'error: ...' exit for every known kind of bad input."""
from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Callable

from dalle2.core.config import add_config_args, config_from_args
from dalle2.core.errors import Dalle2Error


def known_errors() -> tuple:
    """Exceptions that mean bad input (a file, a key, a value): shown as one line, no traceback."""
    # Dalle2Error: ConfigError, CheckpointError, DatasetError, TrainingError, LockError, ...
    # OSError: a missing or unreadable file, a full disk, a read-only folder: the message names the file
    # FloatingPointError: sampling produced NaN pixels (DALLE2.generate refuses to return them)
    return (Dalle2Error, OSError, FloatingPointError)


def main_wrapper(main: Callable[[list[str] | None], object]):
    """Run `main(argv)`; known errors end with `error: <message>` and exit status 2, Ctrl-C with 130."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except KeyboardInterrupt as e:
            terminated = type(e).__name__ == "Terminated"  # SIGTERM, see training.sigterm_as_interrupt
            print("terminated" if terminated else "interrupted", file=sys.stderr)
            raise SystemExit(143 if terminated else 130)
        except known_errors() as e:
            msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
            print(f"error: {msg}", file=sys.stderr)
            raise SystemExit(2)
    return run


def _minutes(text: str) -> float:
    """--time-limit: a finite number of minutes >= 0 (nan would never stop, a negative one at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of minutes >= 0, got {text!r}")
    return value


def training_parser(description: str, stage: str) -> argparse.ArgumentParser:
    """The arguments every training script takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", default="runs", help="run folder shared by all stages (default: runs/); "
                   f"writes OUT/{stage}.pt and OUT/{stage}/")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{stage}/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help=f"delete an earlier {stage} run in OUT "
                   f"({stage}.pt, {stage}/checkpoint.pt, its metrics) and train from scratch")
    p.add_argument("--device", default="auto", help="auto (CUDA, else mps, else CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--quiet", action="store_true", help="do not print the resolved config")
    p.add_argument("--time-limit", type=_minutes, default=None, metavar="MINUTES",
                   help="stop after this many minutes as if training had finished (final checkpoint, evaluation)")
    p.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help=f"size the run to this many minutes of training (sets {stage}.train.budget_minutes): "
                   "the step count is fixed from the measured speed, the LR schedule completes")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help=f"start from the {stage} weights of a run folder or exported folder (fresh optimizer and "
                   "schedule; ignored when --resume finds a checkpoint, but a CLIP run started with it takes its "
                   "vocabulary from it: give it again to resume that run)")
    p.set_defaults(stage=stage)
    if stage != "clip":
        p.add_argument("--clip", default=None, help="CLIP checkpoint (default: OUT/clip.pt)")
    return p


def load_and_print_config(args: argparse.Namespace, is_main: bool = True):
    if getattr(args, "budget", None) is not None:  # --budget MIN is --set <stage>.train.budget_minutes=MIN
        args.overrides = [*args.overrides, f"{args.stage}.train.budget_minutes={args.budget}"]
    cfg = config_from_args(args)
    if is_main and not getattr(args, "quiet", False):
        print(f"# resolved config (preset {cfg.preset})\n{cfg.to_yaml()}", end="")
    return cfg


def read_prompts(path: str) -> list[str]:
    """Captions from a text file, one per line (blank lines skipped); an unreadable or empty file
    is one clear error naming it."""
    from pathlib import Path
    p = Path(path)
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {p}: cannot read the prompt file "
                         f"({getattr(e, 'strerror', None) or type(e).__name__})")
    prompts = [line for line in lines if line]
    if not prompts:
        raise SystemExit(f"error: {p}: the prompt file has no captions (one caption per line)")
    return prompts
