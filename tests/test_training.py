"""The shared training loop: LR schedule, exact resume, Ctrl-C, non-finite loss, checkpoint safety."""
import json
import pickle

import pytest
import torch
import torch.nn as nn

from dalle2.core.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint
from dalle2.core.config import load_config
from dalle2.core.optim import EMA, lr_at
from dalle2.core.tokenizer import Tokenizer
from dalle2.core.training import Trainer, TrainingError


class Toy(nn.Module):
    """A tiny regression model with dropout (so the per-step RNG matters for exact resume)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        self.poison_at = None  # step at which the loss becomes NaN

    def loss(self, x, y, step):
        out = ((self.net(x) - y) ** 2).mean() + 0.01 * torch.randn(()) ** 2
        if self.poison_at is not None and step >= self.poison_at:
            out = out * float("nan")
        return out


def get_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=g)
    return {"x": x, "y": x.sum(1, keepdim=True), "step": step}


def make_trainer(out, steps=8, ema=0.9, **train_overrides):
    sets = [f"clip.train.steps={steps}", "clip.train.warmup_steps=2", "clip.train.log_every=1",
            "clip.train.save_every=2", f"clip.train.ema_decay={ema}", "clip.train.lr=1e-2", "clip.train.batch_size=8"]
    sets += [f"clip.train.{k}={v}" for k, v in train_overrides.items()]
    cfg = load_config(preset="tiny", overrides=sets)
    torch.manual_seed(0)
    return Trainer("clip", cfg, cfg.clip.train, Toy(), out, tokenizer=Tokenizer.build(["a red circle"]))


def losses(run_dir):
    lines = (run_dir / "clip" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_lr_schedule_warms_up_then_decays():
    cfg = load_config(overrides=["clip.train.steps=100", "clip.train.warmup_steps=10", "clip.train.lr=1.0",
                                 "clip.train.min_lr_ratio=0.1"]).clip.train
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_run_folder_layout_and_checkpoint_contents(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.fit(get_batch)
    assert (tmp_path / "clip.pt").is_file() and (tmp_path / "clip" / "checkpoint.pt").is_file()
    assert (tmp_path / "clip" / "config.yml").read_text().startswith("data:")
    assert sorted(losses(tmp_path)) == list(range(1, 9))
    final = load_checkpoint(tmp_path / "clip.pt", "clip")
    assert final["step"] == 8 and final["tokenizer"]["words"] and "optimizer" not in final
    resume = load_checkpoint(tmp_path / "clip" / "checkpoint.pt", "clip")
    for key in ("model", "raw_model", "optimizer", "rng", "config"):
        assert key in resume
    # the final checkpoint holds the EMA weights, which differ from the raw weights
    assert not torch.equal(final["model"]["net.0.weight"], resume["raw_model"]["net.0.weight"])


def test_interrupt_then_resume_matches_an_uninterrupted_run(tmp_path):
    make_trainer(tmp_path / "straight").fit(get_batch)

    def interrupting(step):
        if step == 5:
            raise KeyboardInterrupt
        return get_batch(step)

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "broken").fit(interrupting)  # Ctrl-C saves step 5 before exiting
    assert load_checkpoint(tmp_path / "broken" / "clip" / "checkpoint.pt")["step"] == 5
    resumed = make_trainer(tmp_path / "broken")
    resumed.fit(get_batch, resume=True)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "broken")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    w_a = load_checkpoint(tmp_path / "straight" / "clip.pt")["model"]
    w_b = load_checkpoint(tmp_path / "broken" / "clip.pt")["model"]
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k])


def test_resume_refuses_another_model_config(tmp_path):
    make_trainer(tmp_path, steps=4).fit(get_batch)
    cfg = load_config(preset="tiny", overrides=["clip.model.embed_dim=48"])
    other = Trainer("clip", cfg, cfg.clip.train, Toy(), tmp_path)
    with pytest.raises(TrainingError, match="clip.model"):
        other.fit(get_batch, resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, steps=10)
    trainer.model.poison_at = 5
    with pytest.raises(TrainingError, match="NaN"):
        trainer.fit(get_batch)
    ckpt = load_checkpoint(tmp_path / "clip" / "checkpoint.pt")
    assert ckpt["step"] == 4  # saved at step 4, before the loss went bad
    assert all(torch.isfinite(v).all() for v in ckpt["raw_model"].values())
    assert not (tmp_path / "clip.pt").exists()


def test_ema_is_a_lerp_of_the_weights():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.75)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.75 * before + 0.25 * model.weight)
    assert not any(p.requires_grad for p in ema.model.parameters())
    # warm-up: early steps average fast, later ones at the configured decay
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10 ** 6) == 0.75


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_never_run_code_and_bad_files_get_one_line_errors(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"stage": "clip", "model": {}, "payload": Evil()}, evil, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(evil)
    good = tmp_path / "good.pt"
    atomic_torch_save({"stage": "prior", "format": 1, "model": {"w": torch.ones(3)}}, good)
    with pytest.raises(CheckpointError, match="is a 'prior' checkpoint, expected a 'clip'"):
        load_checkpoint(good, "clip")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        load_checkpoint(truncated)
    other = tmp_path / "notes.pt"
    other.write_bytes(pickle.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_time_limit_finishes_early_with_a_final_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, steps=50)
    trainer.fit(get_batch, time_limit=0.0)  # out of time after the first step
    assert load_checkpoint(tmp_path / "clip.pt")["step"] == 1
    resumed = make_trainer(tmp_path, steps=50)
    resumed.fit(get_batch, resume=True)  # --resume continues to the configured steps
    assert load_checkpoint(tmp_path / "clip.pt")["step"] == 50


class FakeClock:
    """time.perf_counter for dalle2.core.training that advances one second per training step (per batch),
    or seconds(step) seconds."""

    def __init__(self, seconds=lambda step: 1.0):
        self.now, self.seconds = 1000.0, seconds

    def __call__(self):
        return self.now

    def batches(self, step):
        self.now += self.seconds(step)
        return get_batch(step)


def test_budget_sizes_the_run_and_completes_the_schedule(tmp_path, monkeypatch):
    import dalle2.core.training as training
    clock = FakeClock()
    monkeypatch.setattr(training.time, "perf_counter", clock)
    trainer = make_trainer(tmp_path, steps=10_000, budget_minutes=1.0, save_every=1000, log_every=1000)
    trainer.fit(clock.batches)
    # 1 s per step measured over steps 5..25; 25 s spent, 35 s left, 4% margin: 25 + int(0.96 * 35) = 58
    assert trainer.total_steps == trainer.step == 58
    final = load_checkpoint(tmp_path / "clip.pt", "clip")
    assert final["step"] == 58 and final["budget_steps"] == 58
    tc = trainer.tc
    assert lr_at(57, tc, 58) == pytest.approx(tc.lr * tc.min_lr_ratio, rel=2e-2)  # the cosine ran to its end
    records = [json.loads(l) for l in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("budget_steps") == 58 for r in records)


def test_budget_capped_by_steps_and_resume_keeps_the_sized_schedule(tmp_path, monkeypatch):
    import dalle2.core.training as training
    clock = FakeClock()
    monkeypatch.setattr(training.time, "perf_counter", clock)
    capped = make_trainer(tmp_path / "capped", steps=40, budget_minutes=10.0)
    capped.fit(clock.batches)
    assert capped.total_steps == 40  # the budget would allow ~570 steps; train.steps is the maximum

    straight = make_trainer(tmp_path / "straight", steps=10_000, budget_minutes=1.0, save_every=10)
    straight.fit(clock.batches)

    def interrupting(step):
        if step == 35:
            raise KeyboardInterrupt
        return clock.batches(step)

    first = make_trainer(tmp_path / "resumed", steps=10_000, budget_minutes=1.0, save_every=10)
    with pytest.raises(KeyboardInterrupt):
        first.fit(interrupting)
    # resumed much later and on a "faster" machine: the saved step count, not a new measurement, decides
    clock.now += 10_000
    resumed = make_trainer(tmp_path / "resumed", steps=10_000, budget_minutes=1.0, save_every=10)
    resumed.fit(get_batch, resume=True)
    assert resumed.total_steps == straight.total_steps == 58
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)


def test_budget_is_sized_again_at_the_end_of_a_long_warm_up(tmp_path, monkeypatch):
    import dalle2.core.training as training
    clock = FakeClock(lambda step: 1.0 if step < 25 else 0.5)  # the machine gets faster after the probe
    monkeypatch.setattr(training.time, "perf_counter", clock)
    trainer = make_trainer(tmp_path, steps=10_000, budget_minutes=1.0, warmup_steps=40, save_every=1000,
                           log_every=1000)
    trainer.fit(clock.batches)
    # probe (steps 5..25, 1 s each): 25 + int(0.96 * 35) = 58, provisional. At step 40: 35 steps in 27.5 s
    # since step 5, 32.5 s spent: 40 + int(0.96 * 27.5 / (27.5 / 35)) = 73, final
    sizings = [(r["budget_steps"], r["budget_final"]) for r in map(json.loads, (tmp_path / "clip" /
               "metrics.jsonl").read_text().splitlines()) if "budget_steps" in r]
    assert sizings == [(58, False), (73, True)]
    assert trainer.total_steps == trainer.step == 73
    final = load_checkpoint(tmp_path / "clip.pt", "clip")
    assert final["budget_steps"] == 73 and final["budget_final"]
    assert final["budget_spent_s"] == pytest.approx(32.5 + 33 * 0.5)


def test_budget_resumed_in_the_warm_up_counts_the_time_already_spent(tmp_path, monkeypatch):
    import dalle2.core.training as training
    clock = FakeClock()
    monkeypatch.setattr(training.time, "perf_counter", clock)
    settings = dict(steps=10_000, budget_minutes=2.0, warmup_steps=80, save_every=10)
    straight = make_trainer(tmp_path / "straight", **settings)
    straight.fit(clock.batches)
    # provisional 25 + int(0.96 * 95) = 116; at step 80, 40 s left: 80 + int(0.96 * 40) = 118
    assert straight.total_steps == 118

    def interrupting(step):
        if step == 30:
            raise KeyboardInterrupt
        return clock.batches(step)

    first = make_trainer(tmp_path / "resumed", **settings)
    with pytest.raises(KeyboardInterrupt):
        first.fit(interrupting)
    saved = load_checkpoint(tmp_path / "resumed" / "clip" / "checkpoint.pt", "clip")
    assert (saved["step"], saved["budget_steps"], saved["budget_final"]) == (30, 116, False)
    clock.now += 10_000  # resumed later: the 30 s spent before count, the pause does not
    resumed = make_trainer(tmp_path / "resumed", **settings)
    resumed.fit(clock.batches, resume=True)
    assert resumed.total_steps == 118  # re-sized at step 80 from 30 s + 50 s spent
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)

    # resumed too close to the warm-up's end for a whole probe (30 + 25 > 50): the saved count is final
    late = dict(settings, warmup_steps=50)
    first = make_trainer(tmp_path / "late", **late)
    with pytest.raises(KeyboardInterrupt):
        first.fit(interrupting)
    resumed = make_trainer(tmp_path / "late", **late)
    resumed.fit(clock.batches, resume=True)
    saved = load_checkpoint(tmp_path / "late" / "clip.pt", "clip")
    assert resumed.total_steps == saved["budget_steps"] == 25 + int(0.96 * 95) and saved["budget_final"]


def test_training_speed_and_flops_are_reported(tmp_path, capsys):
    from dalle2.core.optim import training_flops
    from dalle2.core.runtime import bf16_peak_tflops
    trainer = make_trainer(tmp_path, steps=12)
    trainer.fit(get_batch)
    records = [json.loads(l) for l in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    speed = [r for r in records if "train_images_per_s" in r]
    assert len(speed) == 1 and speed[0]["train_images_per_s"] > 0
    # Toy: Linear(4, 16) and Linear(16, 1) on 8 rows. Forward 2*8*(64+16) FLOPs; backward the same again
    # for the weight gradients, plus the input gradient of the second layer only (x needs no gradient)
    assert training_flops(Toy(), get_batch(0)) == 2 * (2 * 8 * (4 * 16 + 16 * 1)) + 2 * 8 * 16
    assert "train_tflops" not in speed[0] and "peak_share" not in speed[0]  # FLOPs are counted on GPUs only
    assert bf16_peak_tflops(torch.device("cpu")) is None
    assert "training speed:" in capsys.readouterr().out
