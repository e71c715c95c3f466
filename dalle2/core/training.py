"""The training loop every stage uses (CLIP, prior, decoder): one place for the optimizer, the LR
schedule, EMA, mixed precision, DDP, checkpoints, exact resume, logging and Ctrl-C handling.

A stage supplies the model, a `get_batch(step) -> dict` (a pure function of the step, so resuming at
step s sees the same batches as an uninterrupted run) and optional evaluation / sampling callbacks;
the model's `loss(**batch)` returns a scalar loss. Run folder layout (`--out DIR`, shared by stages):

    DIR/<stage>.pt                 final checkpoint (EMA weights when EMA is on)
    DIR/<stage>/config.yml         resolved config
    DIR/<stage>/metrics.jsonl      one JSON object per log step / evaluation
    DIR/<stage>/loss.png           loss and learning rate against the step (each evaluation, the end)
    DIR/<stage>/checkpoint.pt      resume state (model, EMA, optimizer, step, RNG)
    DIR/<stage>/samples/           pictures written by the stage's callbacks
"""
from __future__ import annotations

import copy
import functools
import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from dalle2.core.checkpoint import FORMAT, CheckpointError, atomic_torch_save, load_checkpoint
from dalle2.core.config import Config, TrainConfig, save_config
from dalle2.core.errors import Dalle2Error
from dalle2.core.files import FolderLock, atomic_write_text, clean_orphans
from dalle2.core.optim import EMA, lr_at, make_optimizer, split_batch, training_flops
from dalle2.core.plots import training_curves
from dalle2.core.report import format_table
from dalle2.core.runtime import (
    DistInfo,
    _sync,
    autocast,
    bf16_peak_tflops,
    eval_mode,
    make_grad_scaler,
    resolve_precision,
)

MAX_SANE_WEIGHT = 1e6  # no weight of a working model gets near this; a diverged one passes it before going inf


def init_seed(tc: TrainConfig) -> None:
    """Seed the global RNG before a stage builds its model, so the same config gives the same
    initial weights (the step seeds take over once training starts)."""
    torch.manual_seed(_step_seed(tc.seed, -1, 0))


class TrainingError(Dalle2Error):
    """Training cannot go on (non-finite loss, resume mismatch); the message says why."""


class _Objective(nn.Module):
    """Calls model.loss(**batch) through forward(), so DDP's gradient hooks and torch.compile see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.loss(**batch)


# A budget-sized run (train.budget_minutes > 0) times steps PROBE_SKIP .. PROBE_SKIP + PROBE_STEPS of
# this process (the first ones compile, benchmark cuDNN and grow the allocator) and keeps a margin for
# checkpoint writes and timing noise. When the warm-up is longer than that, the count is provisional and
# is sized again, from all steps since PROBE_SKIP, at the last warm-up step: the warm-up LR does not
# depend on the step count, so the run's schedule is the one it would have had if sized there at once.
PROBE_SKIP, PROBE_STEPS, BUDGET_MARGIN = 5, 20, 0.96


def _step_seed(seed: int, step: int, rank: int) -> int:
    # Reseeding the global RNG from (seed, step, rank) every step makes dropout and diffusion noise a
    # function of the step, so a resumed run draws exactly what the uninterrupted run drew.
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2 ** 63)


def trim_metrics(path: Path, step: int, say: Callable[[str], None] = print) -> None:
    """Keep the metrics.jsonl lines up to `step` (a resumed run logs the rest again). A line that is
    not JSON (torn by a crash or a full disk) is dropped with a note; the rewrite is atomic."""
    kept, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if torn:
        say(f"note: {path}: dropped {torn} unreadable line(s) (a write cut short)")
    atomic_write_text(path, "".join(l + "\n" for l in kept))


# --- guarding a run folder ---------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM (a preempted or killed job), handled exactly like Ctrl-C: save, then exit."""


@contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM raises Terminated (a KeyboardInterrupt), so the Ctrl-C path saves."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def guarded(fit):
    """Wraps Trainer.fit with what must hold around any training run, on rank 0:

    - a lock on OUT/<stage>/ (holder's pid inside; a dead holder's lock is taken over), so a second
      run into the same folder is refused with a message naming the folder and the pid;
    - temporary files left by killed atomic writes are deleted;
    - without `resume`, a folder that already holds this stage (final model or resume checkpoint)
      is refused: say --resume, or `overwrite=True` (--overwrite) to delete them and start a fresh log;
    - SIGTERM is treated like Ctrl-C (save, then exit)."""
    @functools.wraps(fit)
    def run(self, *args, overwrite: bool = False, **kwargs):
        lock = FolderLock(self.run_dir, f"the {self.stage} training") if self.dist.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            if lock is not None:
                self._prepare_run_folder(bool(kwargs.get("resume")), overwrite)
            with sigterm_as_interrupt():
                return fit(self, *args, **kwargs)
        finally:
            if lock is not None:
                lock.release()
    return run


# --- the loop --------------------------------------------------------------------------------

@dataclass
class _Window:
    """What run_loop carries from step to step: the loss since the last log line (on the device, so no
    step syncs), whether any of it was non-finite, and the clocks (the run's start, the last log line, the
    steady-state speed probe shared by the budget and the speed report)."""
    bad: torch.Tensor
    loss_sum: torch.Tensor
    n: int
    t_start: float
    t_last: float
    speed: dict

    @classmethod
    def open(cls, device: torch.device, step: int) -> _Window:
        now = time.perf_counter()
        return cls(bad=torch.zeros((), dtype=torch.bool, device=device), loss_sum=torch.zeros((), device=device),
                   n=0, t_start=now, t_last=now, speed={"start_step": step, "flops": None})


class Trainer:
    """Trains `model` (which has `.loss(**batch)`) for `train_cfg.steps` steps, writing the run folder."""

    def __init__(self, stage: str, cfg: Config, train_cfg: TrainConfig, model: nn.Module, out: str | Path,
                 *, tokenizer=None, extra: Optional[dict] = None, dist_info: Optional[DistInfo] = None):
        self.stage, self.cfg, self.tc = stage, cfg, train_cfg
        self.dist = dist_info or DistInfo()
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.extra = dict(extra or {})
        self.out = Path(out)
        self.run_dir = self.out / stage
        self.final_path = self.out / f"{stage}.pt"
        self.resume_path = self.run_dir / "checkpoint.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.optimizer = make_optimizer(self.model, train_cfg)
        self.precision = resolve_precision(self.device, train_cfg.precision)
        self.scaler = make_grad_scaler(self.precision, self.device)
        if self.precision == "fp16" and train_cfg.precision == "bf16":
            self.print(f"[{stage}] this GPU has no native bf16: training in fp16 with a gradient scaler")
        self.ema = EMA(self.model, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None
        self.step = 0
        # The step count the LR schedule runs to: train.steps, or what fits in train.budget_minutes
        # (sized after the throughput probe, final by the end of warm-up, saved in the checkpoint so a
        # resume continues the same schedule). budget_spent: seconds of earlier processes of this run.
        self.total_steps = train_cfg.steps
        self.sized = train_cfg.budget_minutes <= 0  # the step count is final
        self.provisional = False  # a budget count is set but may still be re-sized before warm-up ends
        self.budget_spent, self._t_loop = 0.0, None
        objective = _Objective(self.model)
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            objective = DDP(objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._ddp = objective if self.dist.world_size > 1 else None
        # compiled on CUDA only: on the CPU compilation costs more than it saves at these sizes
        self.objective = torch.compile(objective) if train_cfg.compile and self.device.type == "cuda" else objective

    # the weights that evaluation and sampling use
    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    # -- checkpoints --
    def _payload(self, final: bool) -> dict:
        budgeted = self.tc.budget_minutes > 0 and (self.sized or self.provisional)  # a budget count is set
        payload = {
            "stage": self.stage, "format": FORMAT, "step": self.step, "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer.state_dict() if self.tokenizer is not None else None,
            "model": self.eval_model.state_dict(), "extra": self.extra,
            "budget_steps": self.total_steps if budgeted else None,
            "budget_final": self.sized,
            "budget_spent_s": self.budget_spent + (time.perf_counter() - self._t_loop if self._t_loop else 0.0),
        }
        if not final:
            payload.update({
                "raw_model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),  # fp16 loss scale ({} when not fp16)
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            })
        return payload

    def save(self, final: bool = False) -> None:
        if not self.dist.is_main:
            return
        self._check_sane_weights()  # never replace the last good checkpoint with diverged weights
        atomic_torch_save(self._payload(final=False), self.resume_path)
        if final:
            atomic_torch_save(self._payload(final=True), self.final_path)

    def try_resume(self) -> bool:
        """Load DIR/<stage>/checkpoint.pt if present; refuse one whose model config differs."""
        if not self.resume_path.exists():
            return False
        ckpt = load_checkpoint(self.resume_path, stage=self.stage)
        self._check_resumable(ckpt)
        saved, now = ckpt["config"], asdict(self.cfg)
        checks = [(f"{self.stage}.model", now[self.stage]["model"], saved.get(self.stage, {}).get("model")),
                  ("data.image_size", now["data"]["image_size"], saved.get("data", {}).get("image_size")),
                  ("the CLIP it was built on", self.extra.get("clip_hash"), (ckpt.get("extra") or {}).get("clip_hash"))]
        for what, current, then in checks:
            if current != then:
                raise TrainingError(f"{self.resume_path}: the checkpoint has {what} = {then}, the current run has "
                                    f"{current}; use the same --preset/--set/--clip, or another --out")
        self.model.load_state_dict(ckpt["raw_model"])
        if self.ema is not None:
            self.ema.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.step = int(ckpt["step"])
        if self.tc.budget_minutes > 0 and ckpt.get("budget_steps"):  # keep the schedule the run was sized to
            self.total_steps = int(ckpt["budget_steps"])
            # Saved during the warm-up before its final sizing: sized again at the warm-up's last step if a
            # whole probe of this process fits before it, else the saved count is final.
            self.sized = ckpt.get("budget_final", True) or self.step + PROBE_SKIP + PROBE_STEPS > self.tc.warmup_steps
            self.provisional = not self.sized
            self.budget_spent = float(ckpt.get("budget_spent_s", 0.0))
        self.extra = {**(ckpt.get("extra") or {}), **self.extra}
        if self.dist.is_main and self.metrics_path.exists():  # drop lines logged after the saved step
            trim_metrics(self.metrics_path, self.step, self.print)
        return True

    def _check_resumable(self, ckpt: dict) -> None:
        """A resume checkpoint must hold the training state, and the vocabulary of this run."""
        missing = [k for k in ("raw_model", "optimizer", "rng", "config") if k not in ckpt]
        if missing:
            raise TrainingError(f"{self.resume_path}: not a resume checkpoint (no {', '.join(missing)}): a final model "
                                f"file such as {self.final_path.name} cannot be resumed; "
                                "use --overwrite to train again")
        mine = self.tokenizer.state_dict() if self.tokenizer is not None else None
        if ckpt.get("tokenizer") is not None and mine is not None and ckpt["tokenizer"] != mine:
            raise TrainingError(f"{self.resume_path}: the checkpoint's vocabulary (tokenizer) differs from this run's: "
                                "the training captions changed; resume on the same data, "
                                "or use --overwrite or another --out")

    # -- logging --
    def log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot_curves(self) -> None:
        """DIR/<stage>/loss.png: loss and learning rate so far (at each evaluation and at the end)."""
        if self.dist.is_main:
            training_curves(self.metrics_path, self.run_dir / "loss.png", self.stage)

    def print(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

    # -- the run folder (see guarded) --
    def _prepare_run_folder(self, resume: bool, overwrite: bool) -> None:
        for folder in (self.out, self.run_dir, self.run_dir / "samples", self.out / "cache"):
            clean_orphans(folder)
        held = [p for p in (self.final_path, self.resume_path) if p.exists()]
        if held and not resume and not overwrite:
            raise TrainingError(
                f"{self.out} already holds a {self.stage} run ({', '.join(map(str, held))}): continue it with "
                f"--resume, or start again with --overwrite (deletes them); or choose another --out")
        if held and resume and not overwrite and not self.resume_path.exists():
            raise TrainingError(f"{self.final_path} exists but {self.resume_path} (the resume checkpoint) does not: "
                                f"nothing to continue; use --overwrite to train again, or another --out")
        if overwrite or not self.resume_path.exists():  # starting from step 0: a fresh log
            for p in (*held, self.metrics_path):
                p.unlink(missing_ok=True)

    # -- the loop: fit = start, run_loop (run_step after run_step), finish --
    @guarded
    def fit(self, get_batch: Callable[[int], dict], *, resume: bool = False,
            evaluate: Optional[Callable[[nn.Module, int], dict]] = None,
            sample: Optional[Callable[[nn.Module, int], None]] = None,
            time_limit: Optional[float] = None) -> nn.Module:
        """Train to self.total_steps (tc.steps, or what fits in tc.budget_minutes); returns the eval
        model (EMA when on). `evaluate(model, step) -> dict` and `sample(model, step)` run on rank 0 at
        their intervals and at the end (the final evaluation is printed as a table). `time_limit`
        (minutes): finish early, as if the last step were reached (final checkpoint, evaluation), once
        that much time has passed; the LR schedule is not rescaled (tc.budget_minutes is what sizes it)."""
        if self._start(resume):
            self.run_loop(get_batch, evaluate, sample, time_limit)
            self._finish(evaluate, sample)
        return self.eval_model

    def _start(self, resume: bool) -> bool:
        """Write the config, resume if asked; False when a resumed run is already finished."""
        if self.dist.is_main:
            save_config(self.cfg, self.run_dir / "config.yml")
        if resume and self.try_resume():
            self.print(f"[{self.stage}] resumed from {self.resume_path} at step {self.step}")
        elif resume:
            self.print(f"[{self.stage}] nothing to resume in {self.run_dir}: starting from step 0")
        if self.step >= self.total_steps and self.final_path.exists():
            # Resumed a finished run (same model, image size and CLIP, checked by try_resume): nothing to do.
            self.print(f"[{self.stage}] already trained to step {self.step} >= {self.total_steps}: {self.final_path}")
            return False
        return True

    def run_loop(self, get_batch: Callable[[int], dict], evaluate, sample, time_limit: Optional[float]) -> None:
        """Steps until self.total_steps or the time limit, with logging, checkpoints and callbacks at
        their intervals. Ctrl-C (or SIGTERM) saves the resume checkpoint, then propagates."""
        self.model.train()
        w = _Window.open(self.device, self.step)
        self._t_loop = w.t_start
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.stage, disable=not self.dist.is_main,
                   dynamic_ncols=True, leave=True)
        try:
            last = False
            while self.step < self.total_steps and not last:
                lr = self.run_step(get_batch, w)
                bar.update(1)
                self._clock(w, bar)
                last = self.step >= self.total_steps or self._out_of_time(w, time_limit)
                if self.step % self.tc.log_every == 0 or last:
                    self._log_window(w, lr, bar)
                if not last:
                    self._at_intervals(w, evaluate, sample)
        except KeyboardInterrupt:
            bar.close()
            self._check_finite(w.bad)
            self.save()
            self.print(f"[{self.stage}] interrupted: saved step {self.step} to {self.resume_path}; "
                       f"continue with --resume")
            raise
        bar.close()
        self._report_speed(w.speed)
        if self.step < self.total_steps:
            self.print(f"[{self.stage}] time limit reached: stopping at step {self.step} of {self.total_steps}")

    def run_step(self, get_batch: Callable[[int], dict], w: _Window) -> float:
        """One optimisation step: the step's LR and seed, its batch, loss and gradients, the (clipped)
        update, EMA. The loss is accumulated on the device (no sync). Returns the LR used."""
        tc, step = self.tc, self.step
        lr = lr_at(step, tc, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(_step_seed(tc.seed, step, self.dist.rank))
        batch = get_batch(step)
        if w.speed["flops"] is None and self.dist.is_main and self.device.type == "cuda":
            w.speed["flops"] = self._count_flops(batch)
        loss = self._forward_backward(batch)
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)  # = optimizer.step(), skipped on fp16 overflow
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step)
        w.bad |= ~torch.isfinite(loss)
        w.loss_sum += loss
        w.n += 1
        self.step = step + 1
        return lr

    def _count_flops(self, batch: dict) -> float:
        """FLOPs of one training step, counted once, eagerly, before the step proper (on GPUs, where the
        share of the peak means something). The RNG it draws from is put back, so the step (and a resumed
        run) sees exactly the randomness it would have seen."""
        with torch.random.fork_rng(devices=[self.device]), autocast(self.device, self.precision):
            # (under DDP on a copy: a backward through the wrapped module's parameters would fire DDP's
            # gradient hooks on this rank alone)
            counted = self.model if self.dist.world_size == 1 else copy.deepcopy(self.model)
            micro = split_batch(batch, self.tc.grad_accum)  # one micro-batch: what fits in memory
            return training_flops(counted, micro[0][0]) * len(micro) * self.dist.world_size

    def _clock(self, w: _Window, bar) -> None:
        """Start the steady-state clock after PROBE_SKIP steps; size the run to the budget once the probe
        is measured (provisional if the warm-up is longer) and again, finally, at the warm-up's last step."""
        done = self.step - w.speed["start_step"]
        if done == PROBE_SKIP:  # steady-state speed from here on
            _sync(self.device)
            w.speed["t0"], w.speed["step0"] = time.perf_counter(), self.step
        if self.sized or done < PROBE_SKIP + PROBE_STEPS:
            return
        if not self.provisional or self.step >= self.tc.warmup_steps:
            self._size_to_budget(w.speed, w.t_start, bar, final=self.step >= self.tc.warmup_steps)

    def _out_of_time(self, w: _Window, time_limit: Optional[float]) -> bool:
        out_of_time = time_limit is not None and time.perf_counter() - w.t_start > 60 * time_limit
        if self.dist.world_size > 1 and time_limit is not None:  # all ranks stop at the same step
            flag = torch.tensor(float(out_of_time), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        return out_of_time

    def _log_window(self, w: _Window, lr: float, bar) -> None:
        """Log the mean loss and the speed since the last log line (one sync), then start a new window."""
        self._check_finite(w.bad)
        if self.dist.world_size > 1:
            dist.all_reduce(w.loss_sum)
            w.loss_sum /= self.dist.world_size
        ips = w.n * self.tc.batch_size / max(time.perf_counter() - w.t_last, 1e-9)
        record = {"step": self.step, "loss": w.loss_sum.item() / w.n, "lr": lr, "images_per_s": ips}
        self.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        w.loss_sum.zero_()
        w.n, w.t_last = 0, time.perf_counter()

    def _at_intervals(self, w: _Window, evaluate, sample) -> None:
        """The resume checkpoint, the evaluation and the sample grid, each at its interval."""
        if self.step % self.tc.save_every == 0:
            self._check_finite(w.bad)
            self.save()
        self._maybe(evaluate, self.tc.eval_every, "eval")
        self._maybe(sample, self.tc.sample_every, "sample")

    def _finish(self, evaluate, sample) -> None:
        """The final checkpoint, the loss curve, the final evaluation and sample grid."""
        self.save(final=True)
        self.plot_curves()
        if evaluate is not None:
            self._run_callback(evaluate, "eval", final=True)
        if sample is not None:
            self._run_callback(sample, "sample")
        self.print(f"[{self.stage}] done: {self.final_path}")

    def _size_to_budget(self, speed: dict, t_start: float, bar, final: bool) -> None:
        """Set self.total_steps from the speed of this process's steps since PROBE_SKIP, so that the whole
        warm-up + cosine schedule ends inside train.budget_minutes (capped at train.steps). At most three
        device syncs in the whole run; rank 0's count is used by all ranks. Evaluations and sample grids
        inside the loop are not in the estimate (budget runs evaluate at the end)."""
        _sync(self.device)
        now = time.perf_counter()
        measured = self.step - speed["step0"]  # speed["t0"] is at PROBE_SKIP
        per_step = (now - speed["t0"]) / measured
        remaining = 60 * self.tc.budget_minutes - self.budget_spent - (now - t_start)
        total = self.step + max(0, int(BUDGET_MARGIN * remaining / per_step))
        total = max(self.step, min(self.tc.steps, total))
        if self.dist.world_size > 1:
            t = torch.tensor(total, device=self.device)
            dist.broadcast(t, src=0)
            total = int(t.item())
        again = self.provisional
        self.total_steps, self.sized, self.provisional = total, final, not final
        bar.total = total
        bar.refresh()
        ips = self.tc.batch_size / per_step
        note = ("" if total >= 2 * self.tc.warmup_steps
                else f" (less than twice the {self.tc.warmup_steps} warm-up steps)")
        note += "" if final else f"; sized again at the end of warm-up (step {self.tc.warmup_steps})"
        self.print(f"[{self.stage}] budget {self.tc.budget_minutes:g} min: {1 / per_step:.1f} steps/s "
                   f"({ips:.0f} images/s) measured over {measured} steps, so {total} steps"
                   f"{' (re-sized)' if again else ''}{note}")
        self.log({"step": self.step, "budget_steps": total, "budget_final": final, "steps_per_s": 1 / per_step,
                  "images_per_s": ips})

    def _report_speed(self, speed: dict) -> None:
        """Print and log the steady-state training speed (after the first PROBE_SKIP steps of this
        process): images/s, achieved TFLOP/s and their share of the device's bf16 peak."""
        if not self.dist.is_main or "t0" not in speed or self.step <= speed["step0"]:
            return
        _sync(self.device)
        steps_per_s = (self.step - speed["step0"]) / max(time.perf_counter() - speed["t0"], 1e-9)
        record = {"step": self.step, "train_images_per_s": steps_per_s * self.tc.batch_size}
        text = f"[{self.stage}] training speed: {record['train_images_per_s']:,.0f} images/s"
        if speed["flops"]:
            record["train_tflops"] = speed["flops"] * steps_per_s / 1e12
            text += f", {record['train_tflops']:.3g} TFLOP/s"
            peak = bf16_peak_tflops(self.device)
            if peak:
                record["peak_share"] = record["train_tflops"] / peak
                text += f" = {100 * record['peak_share']:.1f}% of the bf16 peak ({peak:g} TFLOP/s)"
        self.log(record)
        self.print(text)

    def _forward_backward(self, batch: dict) -> torch.Tensor:
        """Loss and gradients of one step's batch, in tc.grad_accum micro-batches: each micro-batch's
        loss is weighted by its share of the batch and the gradients add up, so for a loss that is a
        mean over examples the update is the full batch's (CLIP's contrastive loss is not: each
        micro-batch only sees its own negatives). DDP all-reduces once, on the last micro-batch.
        Returns the batch's loss, detached."""
        micro = split_batch(batch, self.tc.grad_accum)
        total = sum(n for _, n in micro)
        loss_sum = torch.zeros((), device=self.device)
        for i, (mb, n) in enumerate(micro):
            sync = self._ddp.no_sync() if self._ddp is not None and i < len(micro) - 1 else nullcontext()
            with sync:
                with autocast(self.device, self.precision):
                    loss = self.objective(mb)
                self.scaler.scale(loss * (n / total)).backward()
            loss_sum += loss.detach().float() * (n / total)
        return loss_sum

    def _check_sane_weights(self) -> None:
        """Refuse to save weights that are non-finite or beyond MAX_SANE_WEIGHT (a divergence the
        loss has not shown yet: it was computed before the optimizer step that blew them up)."""
        for label, module in (("weights", self.model), ("EMA weights", self.ema.model if self.ema else None)):
            if module is None:
                continue
            params = [p.detach() for p in module.parameters() if p.numel()]
            peaks = torch.stack([p.abs().max().float() for p in params]) if params else torch.zeros(1)
            worst = peaks.max().item()  # nan propagates through max
            if not math.isfinite(worst) or worst > MAX_SANE_WEIGHT:
                name = [n for n, p in module.named_parameters() if p.numel()][
                    int(torch.nan_to_num(peaks, nan=math.inf).argmax())]
                try:
                    kept = (f"the last good checkpoint ({self.resume_path}, "
                            f"step {load_checkpoint(self.resume_path)['step']}) is kept")
                except CheckpointError:
                    kept = "there is no earlier checkpoint"
                raise TrainingError(f"[{self.stage}] the {label} diverged before step {self.step} (max |{name}| = "
                                    f"{worst:.3g}): not saved; {kept}. "
                                    f"Try a lower --set {self.stage}.train.lr, then --resume.")

    def _check_finite(self, bad: torch.Tensor) -> None:
        if bool(bad):
            raise TrainingError(
                f"[{self.stage}] the loss became NaN/inf before step {self.step}; the last good checkpoint "
                f"({self.resume_path if self.resume_path.exists() else 'none yet'}) is kept. Try a lower "
                f"--set {self.stage}.train.lr or precision=fp32, then --resume.")

    def _maybe(self, callback, every: int, what: str) -> None:
        if callback is not None and every > 0 and self.step % every == 0:
            self._run_callback(callback, what)

    def _run_callback(self, callback, what: str, final: bool = False) -> None:
        if self.dist.is_main:
            with eval_mode(self.eval_model) as model, torch.no_grad():
                result = callback(model, self.step)
            if what == "eval" and not final:  # the end of fit() draws the final one
                self.plot_curves()
            if what == "eval" and result:
                self.log({"step": self.step, "eval": result})
                if final:
                    self.print(f"[{self.stage}] evaluation at step {self.step}:\n{format_table(result)}")
                else:
                    self.print(f"[{self.stage}] step {self.step} eval: " + ", ".join(
                        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
        if self.dist.world_size > 1:
            dist.barrier()
