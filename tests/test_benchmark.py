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
    for bad in ("euler:10", "ddim", "ddim:x", "ddim:0", "ddim:1:2:3"):
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
