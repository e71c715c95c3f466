"""Caption match (CLIP score, R-precision) on features with known answers, and the sweep choosing by
it where no attribute reader exists."""
import json
import math

import pytest
import torch

from dalle2.core.config import SamplingConfig
from dalle2.evaluation.benchmark import parse_settings
from dalle2.evaluation.metrics import caption_match
from dalle2.evaluation.sweep import (
    export_command,
    fewest_steps,
    paired_difference,
    recommend,
    step_reference,
    write_sweep,
)


def test_perfect_wrong_and_chance_matches():
    text = torch.eye(8)  # 8 orthogonal captions
    ids = torch.arange(8).repeat(3)  # 24 images, 3 per caption
    perfect = caption_match(text[ids], text, ids, distractors=5)
    assert perfect["clip_cosine"] == pytest.approx(1.0) and perfect["clip_score"] == pytest.approx(100.0)
    assert perfect["r_precision"] == 1.0 and perfect["retrieval_top1"] == 1.0
    assert perfect["n_distractors"] == 5 and perfect["n_captions"] == 8

    wrong = caption_match(text[(ids + 1) % 8], text, ids, distractors=7)  # each image shows the next caption
    assert wrong["clip_cosine"] == pytest.approx(0.0) and wrong["r_precision"] == 0.0
    assert wrong["retrieval_top1"] == 0.0

    # an image halfway between its caption and another: cosine 1/sqrt(2) with both
    mixed = caption_match(text[ids] + text[(ids + 1) % 8], text, ids, distractors=7)
    assert mixed["clip_cosine"] == pytest.approx(1 / math.sqrt(2))
    assert mixed["clip_score"] == pytest.approx(100 / math.sqrt(2))
    assert mixed["r_precision"] == 0.0  # a tie with a distractor is not a win


def test_r_precision_of_random_features_is_near_chance_and_seeded():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(50, 32, generator=g)
    ids = torch.randint(0, 50, (4000,), generator=g)
    images = torch.randn(4000, 32, generator=g)
    m = caption_match(images, text, ids, distractors=9, seed=1)
    assert m["r_precision"] == pytest.approx(0.1, abs=0.02)  # chance: 1 / (1 + 9)
    assert m["retrieval_top1"] == pytest.approx(1 / 50, abs=0.01)
    assert caption_match(images, text, ids, distractors=9, seed=1) == m
    # distractors are other captions, never the image's own: with 2 captions the one distractor is the other
    two = caption_match(torch.tensor([[1.0, 0.2]]), torch.eye(2), torch.tensor([0]), distractors=99)
    assert two["n_distractors"] == 1 and two["r_precision"] == 1.0


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="caption ids"):
        caption_match(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        caption_match(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 2]))


def test_sweep_recommends_by_caption_match_without_a_reader():
    def result(rp, score, fd):
        return {"sets": {"test": {"caption_match": {"r_precision": rp, "clip_score": score}}},
                "distance": {"clip_fd": fd}}
    # the lowest distance (index 0) ignores the captions; the highest R-precision wins
    results = [result(0.20, 20.0, 0.5), result(0.60, 25.0, 0.9), result(0.60, 24.0, 0.7)]
    assert recommend(results) == 1
    shapes = [{"sets": {"test": {"faithfulness": {"all": {"exact": e}}, "caption_match": {"r_precision": 1 - e}}},
               "distance": {"clip_fd": 1.0}} for e in (0.3, 0.5)]
    assert recommend(shapes) == 1  # with a reader, exact match decides


def test_sweep_finds_the_fewest_steps_within_run_to_run_noise():
    def result(sampler, steps, prior_steps, exact, fd, guidance=3.0):
        return {"settings": {"guidance_scale": guidance, "prior_guidance_scale": 1.0, "sampler": sampler,
                             "steps": steps, "prior_steps": prior_steps},
                "sets": {"test": {"n_images": 500, "faithfulness": {"all": {"exact": exact}}}},
                "distance": {"clip_fd": fd}}
    results = [result("dpmpp2m", 10, 10, 0.85, 0.021),  # 0.05 below: more than 2 standard errors (0.038)
               result("dpmpp2m", 15, 10, 0.89, 0.030),  # exact match fine, CLIP FD too far
               result("dpmpp2m", 15, 15, 0.88, 0.023),  # equal within both tolerances
               result("ddim", 15, 15, 0.80, 0.040),
               result("dpmpp2m", 20, 20, 0.90, 0.021),  # equal, but more steps
               result("dpmpp2m", 50, 64, 0.91, 0.019),
               result("ddim", 50, 64, 0.90, 0.020),     # the reference: DDIM with the most steps
               result("dpmpp2m", 5, 5, 0.95, 0.010, guidance=5.0)]  # another guidance: not compared
    ref = step_reference([r["settings"] for r in results])
    assert ref == 6
    repeat = result("ddim", 50, 64, 0.89, 0.022)  # another seed: spread 0.01 exact, 0.002 CLIP FD
    found = fewest_steps(results, ref, [repeat])
    assert (found["fewest"]["sampler"], found["fewest"]["steps"], found["fewest"]["prior_steps"]) == ("dpmpp2m", 15, 15)
    assert found["fd_tolerance"] == pytest.approx(0.004)
    assert [c["equal"] for c in found["checked"]] == [False, False, True, False, True, True, True]
    assert found["checked"][0]["tolerance"] == pytest.approx(2 * (0.09 * 2 / 500) ** 0.5)
    # without a repeat there is no CLIP FD check: 15/10 passes on exact match and has fewer prior steps
    assert fewest_steps(results, ref, [])["fewest"]["prior_steps"] == 10
    assert step_reference([result("ddim", 50, 64, 0.9, 0.02, guidance=g)["settings"] for g in (1, 3)]) is None


def test_sweep_prefers_a_narrower_guidance_interval_at_equal_steps_and_never_takes_one_as_reference():
    def result(steps, interval=None, exact=0.9):
        st = {"guidance_scale": 3.0, "prior_guidance_scale": 1.0, "sampler": "ddim", "steps": steps, "prior_steps": 64}
        return {"settings": {**st, **({"guidance_interval": interval} if interval else {})},
                "sets": {"test": {"n_images": 500, "faithfulness": {"all": {"exact": exact}}}},
                "distance": {"clip_fd": 0.02}}
    results = [result(50, [0.2, 0.8]), result(50), result(20, [0.0, 1.0]), result(20, [0.3, 0.7]),
               result(20, [0.5, 0.6], exact=0.5)]  # the narrowest, but far worse
    assert step_reference([r["settings"] for r in results]) == 1  # the full interval, though listed second
    found = fewest_steps(results, 1, [])
    assert found["fewest"]["guidance_interval"] == [0.3, 0.7]
    assert step_reference([result(50)["settings"], result(50, [0.0, 1.0])["settings"]]) is None  # [0, 1] is no change


def test_a_sweep_cut_short_still_writes_its_step_comparison(tmp_path):
    def result(sampler, steps, exact):
        return {"settings": {"guidance_scale": 3.0, "prior_guidance_scale": 1.0, "sampler": sampler, "steps": steps,
                             "prior_steps": steps},
                "sets": {"test": {"n_images": 500, "faithfulness": {"all": {"exact": exact}}}},
                "distance": {"clip_fd": 0.02}, "diversity": {"clip_pairwise_distance": 0.3}, "seconds": 1.0}
    # the reference (index 2) and one other setting evaluated, the third not yet (a timeout)
    evaluated = [result("dpmpp2m", 10, 0.89), None, result("ddim", 50, 0.9)]
    summary, lines = write_sweep(tmp_path, evaluated, 2, [], True)
    assert not summary["complete"] and len(summary["results"]) == 2
    assert summary["fewest_steps"]["reference"]["steps"] == 50 and summary["fewest_steps"]["fewest"]["steps"] == 10
    assert json.loads((tmp_path / "sweep.json").read_text())["fewest_steps"]["fewest"]["steps"] == 10
    assert "Incomplete: 2 of 3 settings" in (tmp_path / "sweep.md").read_text() and (tmp_path / "sweep.png").is_file()
    # how to ship the fewest-step setting: the export command, in the form its --sampling reads
    assert "`python -m dalle2.export CHECKPOINTS NEW_FOLDER --half --sampling dpmpp2m:10:10 --guidance-scale 3`" \
        in (tmp_path / "sweep.md").read_text()


def test_the_export_command_of_a_setting_reads_back_as_that_setting():
    st = {"guidance_scale": 2.5, "sampler": "dpmpp2m", "steps": 15, "prior_steps": 10, "guidance_interval": [0.2, 0.8]}
    command = export_command("runs/x", st)
    spec = command.split("--sampling ")[1].split()[0]
    assert spec == "dpmpp2m:15:10:0.2-0.8" and command.endswith("--guidance-scale 2.5")
    parsed = parse_settings(spec, SamplingConfig(), "--sampling")[0]
    assert {k: parsed[k] for k in ("sampler", "steps", "prior_steps", "guidance_interval")} == \
        {k: st[k] for k in ("sampler", "steps", "prior_steps", "guidance_interval")}
    assert "--sampling ddim:50:64 " in export_command("runs/x", {**st, "sampler": "ddim", "steps": 50,
                                                                  "prior_steps": 64, "guidance_interval": [0.0, 1.0]})


def test_paired_difference_of_per_image_exact_match():
    diff, se = paired_difference([1, 1, 0, 1], [1, 0, 0, 1])  # one image gained, none lost
    assert diff == pytest.approx(0.25) and se == pytest.approx(math.sqrt((0.25 - 0.0625) / 4))
    assert paired_difference([1, 0], [1, 0]) == (0.0, 0.0)
    assert paired_difference(None, [1]) == (None, None) and paired_difference([1], [1, 0]) == (None, None)
    results = [{"settings": {"guidance_scale": 3.0, "prior_guidance_scale": 1.0, "sampler": sampler, "steps": steps,
                             "prior_steps": steps},
                "sets": {"test": {"n_images": 4, "faithfulness": {"all": {"exact": sum(flags) / 4}}}},
                "distance": {"clip_fd": 0.02}, "exact_flags": flags}
               for sampler, steps, flags in (("dpmpp2m", 10, [1, 0, 0, 1]), ("ddim", 50, [1, 1, 0, 1]))]
    checked = fewest_steps(results, 1, [])["checked"]
    assert checked[0]["paired_difference"] == pytest.approx(-0.25) and checked[1]["paired_se"] == 0.0


def test_a_setting_measurably_worse_on_the_same_noise_is_not_equal():
    ref_flags = [1] * 150 + [0] * 350  # the reference: exact match 0.30 on 500 images
    lost = [0] * 20 + [1] * 130 + [0] * 350  # 20 images it got right are now wrong, none gained: 0.26
    traded = [0] * 20 + [1] * 130 + [1] * 15 + [0] * 335  # 20 lost, 15 gained: 0.29
    results = [{"settings": {"guidance_scale": 3.0, "prior_guidance_scale": 1.0, "sampler": sampler, "steps": steps,
                             "prior_steps": steps},
                "sets": {"test": {"n_images": 500, "faithfulness": {"all": {"exact": sum(flags) / 500}}}},
                "distance": {"clip_fd": 0.02}, "exact_flags": flags}
               for sampler, steps, flags in (("dpmpp2m", 6, lost), ("dpmpp2m", 8, traded), ("ddim", 50, ref_flags))]
    found = fewest_steps(results, 2, [])
    lost_c, traded_c = found["checked"][:2]
    # 0.04 below is within the unpaired tolerance (2 SE of two proportions, 0.058) ...
    assert lost_c["quality"] >= 0.30 - lost_c["tolerance"]
    # ... but 20 of 20 changed images lost is 4.6 paired standard errors below: not equal
    assert lost_c["paired_difference"] < -2 * lost_c["paired_se"] and not lost_c["equal"]
    assert traded_c["equal"] and found["fewest"]["steps"] == 8  # -0.01 with 35 images changed: noise
