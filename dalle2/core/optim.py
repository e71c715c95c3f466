"""What one optimisation step is made of, apart from the loop that runs it (dalle2/core/training.py):
the AdamW optimizer, the warm-up + cosine LR schedule, the EMA of the weights, micro-batching for
gradient accumulation, and the FLOP count behind the speed report."""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dalle2.core.config import TrainConfig


def lr_at(step: int, tc: TrainConfig, total_steps: Optional[int] = None) -> float:
    """Linear warm-up to tc.lr, then cosine decay to tc.lr * tc.min_lr_ratio at total_steps (default
    tc.steps; a budget-sized run passes the step count it fixed)."""
    total = tc.steps if total_steps is None else total_steps
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)
    floor = tc.lr * tc.min_lr_ratio
    return floor + (tc.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on biases, norms, scalars), as in GPT-2 / nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused or None)


class EMA:
    """Exponential moving average of the weights, kept as a frozen deep copy (as in DiT).

    With a step, the decay warms up as min(decay, (1 + step) / (10 + step)): a plain 0.9995
    average is still ~60% initial weights after 1,000 steps (measured: a shapes32 decoder's EMA
    sampled pure noise at step 912), so short runs would sample from an untrained mix."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: Optional[int]) -> float:
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        ema_params = list(self.model.parameters())
        params = list(model.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(step))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def split_batch(batch: dict, parts: int) -> list[tuple[dict, int]]:
    """A batch dict cut into `parts` micro-batches along dim 0 of its tensors (other values are
    shared): [(micro_batch, its size), ...]; sizes differ by at most one."""
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if parts == 1 or not tensors:
        return [(batch, next(iter(tensors.values())).shape[0] if tensors else 1)]
    chunks = {k: torch.tensor_split(v, parts) for k, v in tensors.items()}
    out = []
    for i in range(parts):
        micro = {**batch, **{k: c[i] for k, c in chunks.items()}}
        out.append((micro, next(iter(chunks.values()))[i].shape[0]))
    return [(m, n) for m, n in out if n > 0]



def training_flops(model: nn.Module, batch: dict) -> float:
    """FLOPs of one training step (forward + backward of model.loss(**batch); matmuls and convolutions,
    as torch.utils.flop_counter counts them), measured eagerly on this batch; gradients are discarded."""
    with FlopCounterMode(display=False) as counter:
        model.loss(**batch).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())
