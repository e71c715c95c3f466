"""Exported weights (dalle2/pretrained.py, dalle2/export.py) on the session's tiny run: loading with no
pickle, exact round trips, the same images as the run, refusals of mismatched or damaged folders,
atomic export, the shipped-weights default, and malicious `.pt` files refused wherever one is read."""
import importlib.util
import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle2 import DALLE2, pretrained
from dalle2.core.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parent.parent
STAGES = ("clip", "prior", "decoder")
CAPTIONS = ["a red circle", "a large gold pentagon and a small blue circle"]


def quick(model, seed=3):
    return model.generate(CAPTIONS, n_per_text=2, steps=3, prior_steps=3, seed=seed)


@pytest.fixture(scope="module")
def run_model(tiny_run):
    return DALLE2.from_run(tiny_run[0])


@pytest.fixture(scope="module")
def exported(run_model, tmp_path_factory):
    """fp32 and fp16 exports of the tiny run."""
    base = tmp_path_factory.mktemp("exported")
    return run_model.save_pretrained(base / "fp32"), run_model.save_pretrained(base / "fp16", dtype=torch.float16)


def edit_index(folder, edit):
    index = json.loads((folder / "model_index.json").read_text())
    edit(index)
    (folder / "model_index.json").write_text(json.dumps(index))


def copy_of(folder, tmp_path, name="copy"):
    return Path(shutil.copytree(folder, tmp_path / name))


def test_export_loads_with_no_pickle_and_draws_what_the_run_draws(tiny_run, exported, forbid_pickle):
    model = DALLE2.from_pretrained(exported[0])
    forbid_pickle.undo()
    assert model.clip.checkpoint_path.endswith("clip/model.safetensors")
    from_run_dir = DALLE2.from_pretrained(tiny_run[0])  # a run folder loads as from_run does
    assert torch.equal(quick(model), quick(from_run_dir))
    assert not torch.equal(quick(model, seed=3), quick(model, seed=4))


def test_export_round_trips_exactly_in_fp32_and_to_fp16_rounding_with_half(run_model, exported):
    fp32, fp16 = (DALLE2.from_pretrained(e) for e in exported)
    for stage in STAGES:
        want = getattr(run_model, stage).state_dict()
        got32, got16 = getattr(fp32, stage).state_dict(), getattr(fp16, stage).state_dict()
        assert set(got32) == set(want) == set(got16)
        for key, t in want.items():
            assert torch.equal(got32[key], t), (stage, key)
            assert got16[key].dtype == t.dtype  # upcast to fp32 at load
            expect = t.half().to(t.dtype) if t.is_floating_point() else t
            assert torch.equal(got16[key], expect), (stage, key)
        assert getattr(fp16, stage).step == getattr(run_model, stage).step
        assert getattr(fp16, stage).config == getattr(run_model, stage).config
        size = lambda e: (e / stage / "model.safetensors").stat().st_size
        assert size(exported[1]) < 0.6 * size(exported[0])
    assert fp16.tokenizer == run_model.tokenizer
    assert fp16.clip.checkpoint_hash == run_model.clip.checkpoint_hash  # the identity the other stages check
    index = json.loads((exported[1] / "model_index.json").read_text())
    assert index["dtype"] == "float16" and index["format_version"] == pretrained.FORMAT_VERSION
    images = quick(fp16)  # fp16-rounded weights draw nearly the same images
    assert (images - quick(run_model)).abs().max() < 0.05


def test_stages_of_different_clips_are_refused(exported, tmp_path):
    for stage in ("prior", "decoder"):
        folder = copy_of(exported[0], tmp_path, stage)
        edit_index(folder, lambda i: i["stages"][stage].update(clip_hash="0123456789abcdef"))  # another CLIP's
        with pytest.raises(CheckpointError, match=f"{stage}/model.safetensors: was trained on CLIP 0123456789abcdef"):
            DALLE2.from_pretrained(folder)
    # a stage folder swapped in from elsewhere does not match the index's record of the weights
    folder = copy_of(exported[0], tmp_path, "swapped")
    shutil.copy(exported[1] / "prior" / "model.safetensors", folder / "prior" / "model.safetensors")
    with pytest.raises(CheckpointError, match="prior/model.safetensors: its sha256"):
        DALLE2.from_pretrained(folder)


def rewrite_weights(folder, stage, edit):
    """Change a stage's tensors and record the new file's sha256, so only the key check can object."""
    import hashlib

    from safetensors.torch import load, save
    path = folder / stage / "model.safetensors"
    blob = save(edit(load(path.read_bytes())))
    path.write_bytes(blob)
    edit_index(folder, lambda i: i["stages"][stage].update(sha256=hashlib.sha256(blob).hexdigest()))


def test_damaged_exports_give_one_clear_error_naming_the_file(exported, tmp_path):
    def drop_one(state):
        state.pop(sorted(state)[0])
        return state
    cases = [
        (lambda f: (f / "model_index.json").write_text('{"format": "open-dalle2", "format_ver'),
         r"model_index.json: not readable JSON"),
        (lambda f: edit_index(f, lambda i: i.update(format_version=99)),
         r"model_index.json: format version 99, this code reads version 1 \(written by a newer version"),
        (lambda f: (f / "model_index.json").write_text(json.dumps({"format": "something else"})),
         r"model_index.json: not an Open DALL-E 2"),
        (lambda f: edit_index(f, lambda i: i["stages"]["prior"].update(step="six")),
         r"model_index.json: the entry of stage 'prior' lacks a valid step"),
        (lambda f: edit_index(f, lambda i: i["stages"].pop("decoder")), r"the entry of stage 'decoder' lacks a valid"),
        (lambda f: (f / "tokenizer.json").unlink(), r"tokenizer.json: missing"),
        (lambda f: (f / "decoder" / "config.json").write_text("{]"), r"decoder/config.json: not readable JSON"),
        (lambda f: (f / "prior" / "config.json").write_text('{"prior": {"model": {"wdith": 3}}}'),
         r"prior/config.json: not a config"),
        (lambda f: (f / "clip" / "model.safetensors").unlink(), r"clip/model.safetensors: missing"),
        (lambda f: (f / "clip" / "model.safetensors").write_bytes(b"\0" * 64), r"clip/model.safetensors: its sha256"),
        (lambda f: rewrite_weights(f, "decoder", drop_one),
         r"decoder/model.safetensors: its tensors do not match .*; missing: "),
        (lambda f: rewrite_weights(f, "prior", lambda s: {**s, "stowaway": torch.zeros(2)}),
         r"prior/model.safetensors: its tensors do not match .*; unexpected: stowaway"),
        (lambda f: rewrite_weights(f, "clip", lambda s: {k: v[:1] if v.dim() else v for k, v in s.items()}),
         r"clip/model.safetensors: tensor .* has shape"),
    ]
    for i, (damage, message) in enumerate(cases):
        folder = copy_of(exported[0], tmp_path, f"case{i}")
        damage(folder)
        with pytest.raises(CheckpointError, match=message):
            DALLE2.from_pretrained(folder)
    # on the command line: one line, no traceback
    folder = copy_of(exported[0], tmp_path, "cli")
    (folder / "model_index.json").write_text("not json")
    r = subprocess.run([sys.executable, "sample.py", "a red circle", "--checkpoints", str(folder), "--out",
                        str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "model_index.json: not readable JSON" in lines[0], r.stderr


def test_export_is_atomic_and_never_overwrites_a_foreign_folder(run_model, exported, tmp_path, monkeypatch):
    target = copy_of(exported[1], tmp_path, "previous")  # an earlier export, to be replaced
    before = (target / "model_index.json").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted after the weights were written, before the index
    monkeypatch.setattr(pretrained, "model_card", crash)
    for folder in (tmp_path / "new", target):
        with pytest.raises(KeyboardInterrupt):
            run_model.save_pretrained(folder)
    monkeypatch.undo()
    assert not (tmp_path / "new").exists()
    assert (target / "model_index.json").read_bytes() == before  # the previous export is untouched and loads
    DALLE2.from_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]  # no temporary folders left
    run_model.save_pretrained(target)  # replacing an earlier export works
    assert json.loads((target / "model_index.json").read_text())["dtype"] == "float32"
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="notes: exists and is not an exported model folder"):
        run_model.save_pretrained(foreign)
    assert (foreign / "mine.txt").read_text() == "keep me"


def test_model_card_is_written_from_the_run_and_its_report(tiny_run, tmp_path):
    run = copy_of(tiny_run[0], tmp_path, "run")
    faith = {"n": 10, "colour": 0.9, "shape": 0.4, "size": 0.8, "position": 0.7, "binding": 0.3, "count": 0.6,
             "exact": 0.25}
    report = {"checkpoints": str(run), "sampling": {"steps": 4}, "device": "cpu",
              "sets": {"test": {"faithfulness": {"all": faith, "seen": faith,
                                                 "heldout": {**faith, "n": 4, "exact": 0.0}}}},
              "distance": {"clip_fd": 12.5}, "reference": {"train_vs_test": {"clip_fd": 1.5}}, "seconds": 3.0}
    (run / "report").mkdir()
    (run / "report" / "report.json").write_text(json.dumps(report))
    out = tmp_path / "exported"
    DALLE2.from_run(run).save_pretrained(out, card={"command": "python -m dalle2.pipeline --preset tiny",
                                                    "hardware": "a test machine"})
    card = (out / "README.md").read_text()
    for words in ("## Data", "64 training and 16 test images", "`python -m dalle2.pipeline --preset tiny`",
                  "a test machine", "git commit:", "## Measured", "| test | seen | 10 | 0.900 | 0.400 |",
                  "| test | heldout | 4 |", "12.500", "## What this model cannot do", "shape 0.40", "exact 0.00"):
        assert words in card, words
    assert "colour 0.90" not in card  # only what it gets wrong is listed as a limit
    # training time per stage from metrics.jsonl: a duration in every row of the recipe table
    rows = [l for l in card.splitlines() if re.match(r"\| (clip|prior|decoder) \|", l)]
    assert len(rows) == 3 and all(re.search(r"\| \d+ s \|$", r) for r in rows), rows
    seconds = pretrained.training_seconds(run / "clip" / "metrics.jsonl", 16)
    lines = [json.loads(l) for l in (run / "clip" / "metrics.jsonl").read_text().splitlines()]
    # 1 step per line
    assert seconds == pytest.approx(sum(16 / l["images_per_s"] for l in lines if "images_per_s" in l))


def test_model_card_says_whether_its_figures_were_measured_on_these_files(tiny_run, tmp_path):
    run, out = copy_of(tiny_run[0], tmp_path, "run"), tmp_path / "half"
    model = DALLE2.from_run(run)
    (run / "report").mkdir()
    report = {"checkpoints": str(run), "sampling": {}, "device": "cpu", "sets": {}}
    (run / "report" / "report.json").write_text(json.dumps(report))
    model.save_pretrained(out, dtype=torch.float16)
    assert "Measured on the run's float32 weights" in (out / "README.md").read_text()
    # the export evaluated, then exported again (what .ci/gpu_recipe.sh does): the same sha256s
    (run / "report" / "report.json").write_text(json.dumps({**report, "checkpoints": str(out)}))
    before = json.loads((out / "model_index.json").read_text())["stages"]
    model.save_pretrained(out, dtype=torch.float16)
    assert "Measured on these float16 files" in (out / "README.md").read_text()
    after = json.loads((out / "model_index.json").read_text())["stages"]
    assert [before[s]["sha256"] for s in before] == [after[s]["sha256"] for s in before]  # byte-identical files
    model.save_pretrained(tmp_path / "fp32")  # other files than those evaluated
    assert "Measured on these" not in (tmp_path / "fp32" / "README.md").read_text()


def test_export_command_end_to_end(tiny_run, tmp_path):
    out = tmp_path / "half"
    r = subprocess.run([sys.executable, "-m", "dalle2.export", str(tiny_run[0]), str(out), "--half",
                        "--hardware", "2 test cores"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "fp16" in r.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "README.md", "clip/config.json", "clip/model.safetensors", "decoder/config.json", "decoder/model.safetensors",
        "model_index.json", "prior/config.json", "prior/model.safetensors", "tokenizer.json"]
    assert "2 test cores" in (out / "README.md").read_text()
    samples = tmp_path / "samples"
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "a red circle", "--checkpoints", str(out), "--out",
                        str(samples), "--steps", "2", "--prior-steps", "2"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in samples.iterdir()) == ["0000.png", "grid.png", "samples.jsonl"]
    from dalle2.export import main as export
    with pytest.raises(CheckpointError, match="nowhere: missing clip.pt, prior.pt, decoder.pt"):
        export([str(tmp_path / "nowhere"), str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="another folder than the run"):
        export([str(out), str(out)])
    assert export([str(out), str(tmp_path / "again")]) == tmp_path / "again"  # an export re-exports
    again = (tmp_path / "again" / "README.md").read_text()
    assert "not been measured" in again and "trained on: 2 test cores" in again  # provenance carried along
    # so are the training times, which only the run's metrics.jsonl had: in the index and the card's table
    first, second = (json.loads((d / "model_index.json").read_text())["stages"] for d in (out, tmp_path / "again"))
    assert all(first[s]["training_seconds"] > 0 for s in STAGES)
    assert [second[s]["training_seconds"] for s in STAGES] == [first[s]["training_seconds"] for s in STAGES]
    rows = [l for l in again.splitlines() if re.match(r"\| (clip|prior|decoder) \|", l)]
    assert len(rows) == 3 and all(re.search(r"\| \d+ s \|$", r) for r in rows), rows


def test_export_sets_the_sampling_defaults_and_keeps_the_weights(exported, tmp_path):
    from dalle2.export import main as export
    src, out = exported[1], tmp_path / "resampled"
    before = DALLE2.from_pretrained(src).sampling
    export([str(src), str(out), "--half", "--sampling", "dpmpp2m:4:3:0.2-0.8", "--guidance-scale", "2.5"])
    model = DALLE2.from_pretrained(out)
    s = model.sampling
    assert (s.sampler, s.steps, s.prior_steps, s.guidance_interval, s.guidance_scale) == \
        ("dpmpp2m", 4, 3, [0.2, 0.8], 2.5)
    assert (s.candidates, s.clip_x0, s.prior_guidance_scale) == \
        (before.candidates, before.clip_x0, before.prior_guidance_scale)  # the rest is untouched
    config = json.loads((out / "decoder" / "config.json").read_text())["sampling"]
    assert config["sampler"] == "dpmpp2m" and config["steps"] == 4
    index = {d: json.loads((d / "model_index.json").read_text())["stages"] for d in (src, out)}
    assert [index[out][st]["sha256"] for st in STAGES] == [index[src][st]["sha256"] for st in STAGES]
    # a setting without an interval guides every step again; the scale stays what the source had
    export([str(out), str(tmp_path / "back"), "--half", "--sampling", "ddim:5"])
    s = DALLE2.from_pretrained(tmp_path / "back").sampling
    assert (s.sampler, s.steps, s.prior_steps, s.guidance_interval, s.guidance_scale) == \
        ("ddim", 5, 5, [0.0, 1.0], 2.5)
    for bad in (["--sampling", "default"], ["--sampling", "ddim:5,ddim:6"], ["--sampling", "euler:5"],
                ["--guidance-scale", "-1"]):
        with pytest.raises(SystemExit, match="--sampling|--guidance-scale"):
            export([str(src), str(tmp_path / "refused"), *bad])
        assert not (tmp_path / "refused").exists()


def load_sample_py():
    spec = importlib.util.spec_from_file_location("sample_cli", REPO / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_weights_are_the_default_when_present(exported, tmp_path, monkeypatch):
    checkpoints = Path(pretrained.__file__).resolve().parent.parent / "checkpoints"
    assert pretrained.SHIPPED_CHOICES == (checkpoints / "shapes32", checkpoints / "shapes_cpu")  # GPU first
    assert pretrained.SHIPPED == pretrained.first_folder(pretrained.SHIPPED_CHOICES)
    gpu, cpu = tmp_path / "choices" / "gpu", tmp_path / "choices" / "cpu"
    assert pretrained.first_folder((gpu, cpu)) == gpu  # neither: the first, which the error names
    cpu.mkdir(parents=True)
    assert pretrained.first_folder((gpu, cpu)) == cpu
    gpu.mkdir()
    assert pretrained.first_folder((gpu, cpu)) == gpu
    monkeypatch.chdir(tmp_path)  # no runs/ here
    monkeypatch.setattr(pretrained, "SHIPPED", tmp_path / "checkpoints" / "shapes32")
    with pytest.raises(CheckpointError, match=r"no shipped weights are present .*python -m dalle2.pipeline --out runs"):
        DALLE2.from_pretrained()
    sample = load_sample_py()
    with pytest.raises(CheckpointError, match="runs: missing clip.pt, prior.pt, decoder.pt"):  # as before: runs/
        sample.main(["a red circle", "--out", str(tmp_path / "a")])
    monkeypatch.setattr(pretrained, "SHIPPED", exported[1])
    model = DALLE2.from_pretrained()
    assert model.clip.checkpoint_path == str(exported[1] / "clip" / "model.safetensors")
    sample.main(["a red circle", "--out", str(tmp_path / "b"), "--steps", "2", "--prior-steps", "2"])
    assert (tmp_path / "b" / "grid.png").is_file()


# --- malicious .pt files ---------------------------------------------------------------------

class Evil:
    """A pickle that writes a marker file when unpickled by an unrestricted unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def plant(path, marker, kind="zip"):
    """An evil file at `path`: torch's zip format, its legacy format, or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"stage": "clip", "format": 1, "model": {}, "hook": Evil(marker)}
    if kind == "raw":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=kind == "zip", pickle_protocol=2)
    return path


def test_every_pt_reader_uses_weights_only():
    """Each torch.load in the code passes weights_only=True, and each file that calls it is covered by
    the test below (a new reader of .pt files must be added there)."""
    sites = {}
    for path in [*REPO.glob("dalle2/**/*.py"), *REPO.glob("clip/*.py"), *REPO.glob("data/*.py"), REPO / "sample.py"]:
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
                sites[str(path.relative_to(REPO))] = line
    assert set(sites) == {"dalle2/core/checkpoint.py", "dalle2/embeddings.py", "dalle2/evaluation/metrics.py",
                          "dalle2/evaluation/reader.py"}


def test_a_planted_malicious_pt_is_refused_wherever_a_pt_is_read(tiny_run, tmp_path):
    from clip.model import CLIP
    from clip.train import main as train_clip
    from dalle2.core.checkpoint import load_checkpoint
    from dalle2.decoder import Decoder
    from dalle2.embeddings import load_or_compute
    from dalle2.evaluation.metrics import load_inception
    from dalle2.evaluation.reader import AttributeReader
    from dalle2.prior import DiffusionPrior
    from data.datasets import load_dataset

    marker = tmp_path / "marker"
    for kind in ("zip", "legacy", "raw"):
        evil = plant(tmp_path / kind / "evil.pt", marker, kind)
        with pytest.raises(CheckpointError, match="evil.pt: not a readable checkpoint"):
            load_checkpoint(evil)
        for cls in (CLIP, DiffusionPrior, Decoder):
            with pytest.raises(CheckpointError, match="evil.pt"):
                cls.from_checkpoint(evil)
        with pytest.raises(pickle.UnpicklingError):
            load_inception("cpu", weights_path=evil)
        with pytest.raises(pickle.UnpicklingError):
            AttributeReader.load(evil)
        run = copy_of(tiny_run[0], tmp_path, f"run_{kind}")
        for stage in STAGES:
            stage_run = copy_of(tiny_run[0], tmp_path, f"run_{kind}_{stage}")
            shutil.copy(evil, stage_run / f"{stage}.pt")
            for load in (DALLE2.from_run, DALLE2.from_pretrained):
                with pytest.raises(CheckpointError, match=f"{stage}.pt: not a readable checkpoint"):
                    load(stage_run)
    assert not marker.exists()

    # resuming training from a planted resume checkpoint
    argv = list(tiny_run[1])
    argv[argv.index("--out") + 1] = str(run)
    plant(run / "clip" / "checkpoint.pt", marker)
    with pytest.raises(CheckpointError, match="checkpoint.pt: not a readable checkpoint"):
        train_clip(argv + ["--resume"])
    # a planted embedding cache is never trusted: it is rebuilt
    clip = CLIP.from_checkpoint(run / "clip.pt")
    cache = run / "cache" / f"test-{clip.checkpoint_hash}.pt"
    assert cache.is_file()
    plant(cache, marker)
    test = load_dataset(clip.config.data, "test", generate_missing=False, progress=False)
    logged = []
    emb = load_or_compute(clip, clip.checkpoint_hash, test, run / "cache", "test", progress=False, log=logged.append)
    assert emb.image_emb.shape[0] == len(test) and "unreadable" in logged[0]
    assert torch.load(cache, weights_only=True)["clip_hash"] == clip.checkpoint_hash  # replaced by a good cache
    assert not marker.exists()

    # the payload is live: an unrestricted unpickler does run it (so the checks above mean something)
    torch.load(tmp_path / "zip" / "evil.pt", weights_only=False)
    assert marker.read_text() == "code ran"


def test_a_model_cast_for_sampling_is_not_saved(tiny_run, tmp_path):
    import torch

    from dalle2 import DALLE2
    from dalle2.core.checkpoint import CheckpointError
    model = DALLE2.from_run(tiny_run[0]).lean(torch.bfloat16)  # what generate does on a GPU
    with pytest.raises(CheckpointError, match="freshly loaded"):
        model.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()
