"""Devices and precisions people have: "auto" finds Apple's mps, bf16 falls back to fp16 (with a
gradient scaler, saved for resume) on GPUs without bf16, and gradient accumulation gives the full
batch's update."""
import json

import pytest
import torch
import torch.nn as nn

from dalle2.core import training
from dalle2.core.checkpoint import load_checkpoint
from dalle2.core.config import ConfigError, load_config
from dalle2.core.optim import split_batch
from dalle2.core.runtime import pick_device, resolve_precision
from dalle2.core.training import Trainer


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(SystemExit, match="mps"):
        pick_device("mps")


def test_bf16_becomes_fp16_where_the_gpu_has_no_bf16(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: False)  # a T4 / V100
    assert resolve_precision(cuda, "bf16") == "fp16"
    assert resolve_precision(cuda, "fp16") == "fp16" and resolve_precision(cuda, "fp32") == "fp32"
    assert resolve_precision(cpu, "bf16") == resolve_precision(cpu, "fp16") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: True)  # an A100 / H100
    assert resolve_precision(cuda, "bf16") == "bf16"
    assert resolve_precision(cuda, "fp16") == "fp16"  # asked for explicitly


class Linear(nn.Module):
    """A loss that is a plain mean over examples (no dropout, no noise): accumulation must be exact."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.sizes = []  # the micro-batch sizes the loss saw

    def loss(self, x, y):
        self.sizes.append(len(x))
        return ((self.net(x) - y) ** 2).mean()


def get_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(12, 4, generator=g)
    return {"x": x, "y": x.sum(1, keepdim=True).sin()}


def trainer(out, steps=6, **overrides):
    sets = [f"prior.train.steps={steps}", "prior.train.warmup_steps=2", "prior.train.log_every=1",
            "prior.train.save_every=3", "prior.train.ema_decay=0", "prior.train.lr=1e-2",
            "prior.train.batch_size=12"] + [f"prior.train.{k}={v}" for k, v in overrides.items()]
    cfg = load_config(preset="tiny", overrides=sets)
    torch.manual_seed(0)
    return Trainer("prior", cfg, cfg.prior.train, Linear(), out)


def test_split_batch_cuts_tensors_and_shares_the_rest():
    parts = split_batch({"x": torch.arange(5), "step": 3}, 2)
    assert [n for _, n in parts] == [3, 2] and [p["step"] for p, _ in parts] == [3, 3]
    assert torch.equal(torch.cat([p["x"] for p, _ in parts]), torch.arange(5))


@pytest.mark.parametrize("accum", [2, 5])  # 5 does not divide 12: micro-batches of 3 and 2
def test_grad_accum_gives_the_full_batch_update(tmp_path, accum):
    full = trainer(tmp_path / "full").fit(get_batch)
    micro = trainer(tmp_path / "micro", grad_accum=accum).fit(get_batch)
    assert full.sizes == [12] * 6 and micro.sizes == ([6, 6] if accum == 2 else [3, 3, 2, 2, 2]) * 6
    for a, b in zip(full.parameters(), micro.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(full.net[0].weight, Linear().net[0].weight)  # it did train
    la = [r["loss"] for r in map(json.loads, (tmp_path / "full" / "prior" / "metrics.jsonl").read_text().splitlines())
          if "loss" in r]
    lb = [r["loss"] for r in map(json.loads, (tmp_path / "micro" / "prior" / "metrics.jsonl").read_text().splitlines())
          if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)


def test_grad_accum_larger_than_the_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="decoder.train.grad_accum"):
        load_config(preset="tiny", overrides=["decoder.train.batch_size=4", "decoder.train.grad_accum=8"])


def test_fp16_scaler_state_is_saved_and_resumed(tmp_path, monkeypatch):
    """With fp16 (forced here: the CPU has no fp16 autocast, so the scaler runs on CPU tensors), the
    scaler's state goes into the resume checkpoint and comes back, and resuming stays exact."""
    monkeypatch.setattr(training, "resolve_precision", lambda device, precision: "fp16")
    monkeypatch.setattr(training, "autocast", lambda device, precision: torch.autocast("cpu", enabled=False))
    straight = trainer(tmp_path / "straight", grad_accum=2)
    model = straight.fit(get_batch)
    assert straight.scaler.is_enabled() and straight.scaler.state_dict()["_growth_tracker"] == 6

    def interrupting(step):
        if step == 4:
            raise KeyboardInterrupt
        return get_batch(step)
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "broken", grad_accum=2).fit(interrupting)
    saved = load_checkpoint(tmp_path / "broken" / "prior" / "checkpoint.pt", "prior")["scaler"]
    assert saved["_growth_tracker"] == 4 and saved["scale"] == straight.scaler.get_scale()
    resumed = trainer(tmp_path / "broken", grad_accum=2)
    again = resumed.fit(get_batch, resume=True)
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    for a, b in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
