"""A normal (non-editable) install works: the wheel carries the default config, the shapes spec and
the licence, and from another directory, with only the installed files on the path, the config loads
and the `dalle2-sample` console script (sample.py) answers --help."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the whole thing

REPO = Path(__file__).resolve().parent.parent


def _copy_source(dst: Path) -> None:
    """The files a build reads, copied so building never writes build/ or *.egg-info into the repo."""
    for name in ("pyproject.toml", "README.md", "LICENSE", "sample.py"):
        shutil.copy2(REPO / name, dst / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in ("clip", "dalle2"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=skip)
    (dst / "data").mkdir()
    for f in (REPO / "data").iterdir():  # generated datasets live in data/<name>/: leave them out
        if f.is_file():
            shutil.copy2(f, dst / "data" / f.name)


def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    src, wheels, target, elsewhere = (tmp_path / d for d in ("src", "wheels", "target", "elsewhere"))
    for d in (src, wheels, elsewhere):
        d.mkdir()
    _copy_source(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("dalle2/model_config.yml", "data/SHAPES_SPEC.md", "sample.py"):
        assert shipped in names, f"{shipped} is missing from {wheel.name}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path, capture_output=True)

    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    probe = ("import dalle2, dalle2.core.config as c; cfg = c.load_config(preset='tiny'); "
             "print(dalle2.__file__); print(c.DEFAULT_CONFIG); print(cfg.preset)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target)), out  # the installed copy
    assert out[2] == "tiny"

    script = target / "bin" / "dalle2-sample"
    assert script.is_file(), f"no console script in {sorted(p.name for p in target.iterdir())}"
    res = subprocess.run([sys.executable, str(script), "--help"], cwd=elsewhere, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--checkpoints" in res.stdout and "DALLE2.generate" in res.stdout
