"""Where the networks run: device choice (CUDA, Apple mps, CPU), DDP processes, mixed precision and
the GPU's bf16 peak. Shared by training, sampling and the instruments, so sampling does not import the
training loop."""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """"auto": a CUDA GPU, else Apple's Metal (mps), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but PyTorch sees no CUDA GPU")
    if name.startswith("mps") and not _mps_available():
        raise SystemExit("error: --device mps asked for, but PyTorch sees no Apple Metal (mps) device")
    return torch.device(name)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Single process, or one process per GPU under torchrun (NCCL on GPU, gloo on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls/convs: free speed on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(device=pick_device(device))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu"))


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 (Ampere and later); T4s, V100s and RTX 20-series only emulate it, slowly."""
    try:  # of the current device: the training device (DDP sets it per rank)
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no including_emulation
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(device: torch.device, precision: str) -> str:
    """What autocast really runs: "bf16" or "fp16" on CUDA, "fp32" elsewhere (and when asked). bf16 on
    a CUDA GPU without it becomes fp16, which training pairs with a gradient scaler."""
    if device.type != "cuda" or precision == "fp32":
        return "fp32"
    if precision == "bf16" and not _cuda_has_bf16(device):
        return "fp16"
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (no loss scaling needed), fp16 where the GPU has no bf16 (see
    resolve_precision); fp32 on CPU and other devices."""
    resolved = resolve_precision(device, precision)
    if resolved == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)


def make_grad_scaler(precision: str, device: torch.device):
    """A gradient scaler, enabled for fp16 only (bf16 and fp32 need none: its calls then pass through)."""
    scaler = getattr(torch.amp, "GradScaler", None)
    if scaler is None:  # torch before 2.3
        return torch.cuda.amp.GradScaler(enabled=precision == "fp16")
    return scaler(device.type, enabled=precision == "fp16")


def rank0_first(fn: Callable, dist_info: DistInfo):
    """Run fn() on rank 0 first and on the other ranks after it, so only one process writes shared
    files (generated data, embedding caches) and the others read them."""
    if dist_info.world_size == 1:
        return fn()
    if dist_info.is_main:
        result = fn()
        dist.barrier()
        return result
    dist.barrier()
    return fn()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name(): the denominator of the "share of peak" each stage prints.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0,
                    "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 0.0, "T4": 0.0}


def bf16_peak_tflops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in TFLOP/s, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name and v > 0), None)


@contextmanager
def eval_mode(module: nn.Module):
    """`module.eval()` inside the block (no dropout, no random condition dropout), then its former
    train/eval state back, also when the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
