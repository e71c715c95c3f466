"""Test-wide settings: one intra-op thread (tiny models run faster and steadier than with threads
competing for 2 cores) and no tqdm bars cluttering the output."""
import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")


def tiny_overrides(root, n_train: int = 64, n_test: int = 16, steps: int = 6) -> list:
    """`--set` arguments for an even smaller run than the tiny preset: a few dozen images, a few steps."""
    sets = [f"data.root={root}", f"data.n_train={n_train}", f"data.n_test={n_test}"]
    for stage, bs in (("clip", 16), ("prior", 16), ("decoder", 8)):
        sets += [f"{stage}.train.steps={steps}", f"{stage}.train.batch_size={bs}", f"{stage}.train.warmup_steps=2",
                 f"{stage}.train.log_every=1", f"{stage}.train.save_every=3"]
    sets += ["sampling.steps=4", "sampling.prior_steps=4", "prior.diffusion.timesteps=50",
             "decoder.diffusion.timesteps=50", "decoder.model.channels=16", "decoder.model.head_channels=16",
             "decoder.model.text_width=32", "clip.model.embed_dim=32", "clip.model.vision_width=32",
             "clip.model.text_width=32", "prior.model.width=32"]
    return [x for s in sets for x in ("--set", s)]


def pytest_collection_modifyitems(items):
    """Every test that trains the tiny run is an end-to-end test (see the e2e marker in pyproject.toml)."""
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def forbid_pickle(monkeypatch):
    """Every unpickling entry point raises while the test holds this (undo with monkeypatch.undo())."""
    import pickle

    def no_pickle(*args, **kwargs):
        raise AssertionError("something was unpickled")
    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                         (torch.serialization, "load")):
        monkeypatch.setattr(module, name, no_pickle)
    return monkeypatch


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Caches (the attribute reader's weights) go to a temporary folder, never the user's home."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A complete tiny run folder (clip.pt, prior.pt, decoder.pt), trained once per test session.
    Returns (run_dir, argv prefix with --preset tiny and the overrides)."""
    from clip.train import main as train_clip
    from dalle2.train_decoder import main as train_decoder
    from dalle2.train_prior import main as train_prior
    base = tmp_path_factory.mktemp("tiny_run")
    argv = ["--preset", "tiny", "--quiet", "--out", str(base / "run"), *tiny_overrides(base / "shapes")]
    for train in (train_clip, train_prior, train_decoder):
        train(argv)
    return base / "run", argv
