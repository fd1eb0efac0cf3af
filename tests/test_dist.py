"""`make dist`: the sdist and the wheel build offline and carry the package's data files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "googlenet"


@pytest.mark.slow
def test_sdist_and_wheel_build_offline_with_data_files_and_license(tmp_path: Path):
    pytest.importorskip("build", reason="the dev extra's `build` is not installed")
    # A copy of what the build reads, so the checkout gets no build/ or egg-info from it.
    tree = tmp_path / "tree"
    shutil.copytree(
        REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tree / name)
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (sdist,) = out.glob("googlenet-*.tar.gz")
    (wheel,) = out.glob("googlenet-*-py3-none-any.whl")  # built from the sdist
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{info}/METADATA").decode()
        license_text = z.read(f"{info}/licenses/LICENSE").decode()
    for pattern in ("training/recipes/*.toml", "fastpool.c", "static/serve.html", "*.txt"):
        files = {"googlenet/" + p.relative_to(PACKAGE).as_posix() for p in PACKAGE.glob(pattern)}
        assert files and files <= names, (pattern, sorted(files - names))
    modules = {"googlenet/" + p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    assert f"License-Expression: {declared}" in metadata
    assert license_text == (REPO / "LICENSE").read_text() and license_text.startswith("MIT")
    with tarfile.open(sdist) as t:
        assert any(m.endswith("/LICENSE") for m in t.getnames())
