"""The one-command pipeline end to end on an even smaller tiny run, then the guidance sweep on it."""
import json
import shlex

import pytest
import torch
from conftest import tiny_overrides

from dalle2 import DALLE2
from dalle2.core.config import load_config
from dalle2.evaluation.sweep import main as sweep
from dalle2.pipeline import main as pipeline
from data.datasets import load_dataset

pytestmark = pytest.mark.e2e  # runs the whole thing


def test_pipeline_end_to_end_then_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--out", str(out), "--eval-n", "8", *tiny_overrides(tmp_path / "shapes")]
    pipeline(argv)
    for name in ("clip.pt", "prior.pt", "decoder.pt", "samples/grid.png", "report/report.md",
                 "report/report.json", "report/best_worst.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report" / "report.json").read_text())
    faith = report["sets"]["test"]["faithfulness"]
    assert set(faith) == {"all", "seen", "heldout"} and faith["all"]["n"] == 8
    for key in ("exact", "count", "colour", "shape"):
        assert 0.0 <= faith["all"][key] <= 1.0
    assert report["reader_accuracy"]["all"]["colour"] > 0.97  # the reader's ceiling is reported
    assert {"clip_fd", "clip_kid"} <= set(report["distance"]) and "near_duplicate_rate" in report["memorisation"]
    assert "rephrased" in report["sets"] and "partial" in report["sets"]
    alone = report["sets"]["test"]["decoder_alone"]  # the decoder on the test images' own embeddings
    assert alone["all"]["n"] == 8 and 0.0 <= alone["all"]["exact"] <= 1.0
    assert "| test, decoder alone | all | 8 |" in (out / "report" / "report.md").read_text()
    match = report["sets"]["test"]["caption_match"]
    assert 0.0 <= match["r_precision"] <= 1.0 and report["reference"]["caption_match"]["n_captions"] >= 1
    assert all((out / stage / "loss.png").is_file() for stage in ("clip", "prior", "decoder"))
    # the closing hint draws a caption of the run's own data
    cfg = load_config(preset="tiny", overrides=tiny_overrides(tmp_path / "shapes")[1::2])
    test = load_dataset(cfg.data, "test", generate_missing=False)
    assert f"python sample.py {shlex.quote(test.caption_of(0))} --checkpoints" in capsys.readouterr().out
    card = (out / "pretrained" / "README.md").read_text()  # the run exported itself, its card from the report
    assert "| test | all | 8 |" in card and "--eval-n 8" in card and "trained on: CPU" in card
    assert torch.equal(DALLE2.from_pretrained(out / "pretrained").clip.logit_scale,
                       DALLE2.from_run(out).clip.logit_scale)

    pipeline(argv + ["--skip-eval"])  # everything trained: every stage is skipped
    text = capsys.readouterr().out
    assert text.count("already trained") == 3

    summary = sweep(["--checkpoints", str(out), "--guidance", "1,3", "--steps", "4", "--limit", "8",
                     *tiny_overrides(tmp_path / "shapes")])
    assert len(summary["results"]) == 2 and summary["recommended"]["guidance_scale"] in (1.0, 3.0)
    assert (out / "sweep" / "sweep.png").is_file() and (out / "sweep" / "sweep.json").is_file()
    steps = sweep(["--checkpoints", str(out), "--guidance", "3", "--settings", "ddim:4:4,dpmpp2m:2:2,dpmpp2m:2:4:0.5-1",
                   "--limit", "8", "--out", str(tmp_path / "steps"), *tiny_overrides(tmp_path / "shapes")])
    found = steps["fewest_steps"]  # the reference (DDIM, most steps) is always equal to itself
    assert (found["reference"]["sampler"], found["reference"]["steps"], found["noise_runs"]) == ("ddim", 4, 1)
    checked = [(c["settings"]["sampler"], c["settings"]["steps"], c["settings"]["prior_steps"],
                c["settings"].get("guidance_interval")) for c in found["checked"]]
    assert checked == [("ddim", 4, 4, None), ("dpmpp2m", 2, 2, None), ("dpmpp2m", 2, 4, [0.5, 1.0])]
    assert found["checked"][0]["equal"] and "dpmpp2m 2/4 g0.5-1" in (tmp_path / "steps" / "sweep.md").read_text()
    assert (found["checked"][0]["paired_difference"], found["checked"][0]["paired_se"]) == (0.0, 0.0)  # itself
    assert all(c["paired_se"] is not None for c in found["checked"])  # per-image flags from the reader
    with pytest.raises(SystemExit, match="drop --samplers"):
        sweep(["--checkpoints", str(out), "--settings", "ddim:4", "--steps", "4"])
    with pytest.raises(SystemExit, match="ddim:x"):
        sweep(["--checkpoints", str(out), "--settings", "ddim:x"])
    assert "Fewest steps at the quality of ddim 4/" in (tmp_path / "steps" / "sweep.md").read_text()
