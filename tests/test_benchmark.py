"""dalle2.evaluation.benchmark on random tiny weights: settings parsing and the per-stage rows. CPU, seconds."""
import json

import pytest

from dalle2.core.config import SamplingConfig
from dalle2.evaluation.benchmark import main, parse_settings

TINY = ["--preset", "tiny", "--device", "cpu", "--set", "decoder.model.channels=16", "--set",
        "decoder.model.head_channels=16", "--set", "prior.model.width=32"]


def test_parse_settings():
    default, ddim, dpm = parse_settings("default, ddim:50:64,dpmpp2m:15", SamplingConfig())
    assert (default["sampler"], default["steps"], default["prior_steps"]) == ("ddim", 50, 64)
    assert (ddim["steps"], ddim["prior_steps"]) == (50, 64) and (dpm["steps"], dpm["prior_steps"]) == (15, 15)
    (gi,) = parse_settings("dpmpp2m:15:15:0.2-0.8", SamplingConfig())
    assert gi["guidance_interval"] == [0.2, 0.8] and gi["name"] == "dpmpp2m 15/15 g0.2-0.8"
    assert "guidance_interval" not in dpm
    for bad in ("euler:10", "ddim", "ddim:x", "ddim:0", "ddim:1:2:3", "ddim:1:2:0.8-0.2", "ddim:1:2:0.1-0.2-0.3",
                "ddim:1:2:0.1-0.2:9"):
        with pytest.raises(SystemExit, match="--settings"):
            parse_settings(bad, SamplingConfig())


def test_rows_per_setting_and_stage(tmp_path):
    jsonl = tmp_path / "bench.jsonl"
    rows = main([*TINY, "--settings", "ddim:3:2,dpmpp2m:2", "--batch-sizes", "2", "--repeats", "1",
                 "--cost", "0", "--data", "0", "--jsonl", str(jsonl)])
    assert [(r["setting"], r["case"]) for r in rows] == [
        ("ddim 3/2", "single image"), ("ddim 3/2", "batch 2"),
        ("dpmpp2m 2/2", "single image"), ("dpmpp2m 2/2", "batch 2")]
    for r in rows:
        assert r["prior"] > 0 and r["decoder"] > 0 and r["other"] >= 0
        assert r["prior"] + r["decoder"] <= r["seconds"] + 1e-9
    assert [json.loads(line)["case"] for line in jsonl.read_text().splitlines()] == [r["case"] for r in rows]


def test_cold_start_rows_and_sweep_quality(tiny_run, tmp_path):
    run, _ = tiny_run
    sweep = tmp_path / "sweep.json"
    row = lambda g, exact: {"settings": {"sampler": "ddim", "steps": 2, "prior_steps": 3, "guidance_scale": g,  # noqa: E731
                                         "prior_guidance_scale": g}, "exact_match": exact, "distance": {"clip_fd": 0.5}}
    sweep.write_text(json.dumps({"results": [row(1.0, 0.25), row(2.0, 0.75)]}))
    rows = main(["--checkpoints", str(run), "--device", "cpu", "--settings", "ddim:2:3,dpmpp2m:2:2:0.5-1",
                 "--batch-sizes", "",
                 "--single", "0", "--cold", "2", "--repeats", "1", "--cost", "0", "--data", "0",
                 "--guidance-scale", "2", "--quality", str(sweep)])
    assert [(r["setting"], r["case"], r["images"]) for r in rows] == [
        ("ddim 2/3", "cold start, 2", 2), ("dpmpp2m 2/2 g0.5-1", "cold start, 2", 2)]
    assert all(r["seconds"] > 0 and r["prior"] is None for r in rows)
    assert (rows[0]["exact_match"], rows[0]["clip_fd"]) == (0.75, 0.5)  # the sweep's row at guidance 2, not 1
    assert "exact_match" not in rows[1]  # no sweep row for this setting


def test_cold_start_needs_weights_and_quality_a_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr("dalle2.evaluation.benchmark.SHIPPED", tmp_path / "none")
    with pytest.raises(SystemExit, match="--cold needs weights"):
        main([*TINY, "--cold", "8"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="bad.json"):
        main([*TINY, "--quality", str(tmp_path / "bad.json"), "--batch-sizes", "", "--single", "0", "--cost", "0",
              "--data", "0"])
