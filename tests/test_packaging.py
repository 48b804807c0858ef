"""The wheel carries one import name, `capguard`: users' own `models/` packages must not collide with ours.

Builds the wheel from this tree (no dependencies, no build isolation: the dev venv's setuptools builds it,
so nothing is fetched), installs it with --no-deps into a fresh venv and reads what landed in
site-packages. The root folders models/ and server/ reach the wheel through the links capguard/models and
capguard/server: they must arrive as real directories with their files (static/ included), not as links.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*cmd: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def source_files(folder: Path) -> set[str]:
    """Relative paths of the .py files and static assets a package folder must ship (caches left out)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.mark.slow
def test_wheel_installs_one_top_level_package_and_the_command(tmp_path):
    """~30 s on 2 busy cores: pip wheel + venv + pip install, all offline."""
    # setuptools writes build/ and *.egg-info next to pyproject.toml: build from a copy of what the wheel
    # is made of (links kept as links, as in a clone), not in the working tree
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("models", "server", "capguard"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    assert (src / "capguard" / "models").is_symlink()
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", wheels, src, cwd=tmp_path)
    (wheel,) = wheels.glob("capguard-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level_txt = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(top_level_txt).decode().split() == ["capguard"]
        # a zip entry that is a symlink carries S_IFLNK in its external attributes
        links = [i.filename for i in zf.infolist() if (i.external_attr >> 16) & 0o170000 == 0o120000]
        assert not links, links
    assert {n.split("/")[0] for n in names} == {"capguard", "capguard-0.1.0.dist-info"}

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)           # ensurepip's bundled pip: offline
    purelib = Path(run(venv / "bin" / "python", "-c",
                       "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    before = {p.name for p in purelib.iterdir()}      # pip (and, on older Pythons, setuptools)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)

    entries = {p.name for p in purelib.iterdir()} - before   # what the wheel put there
    packages = {e for e in entries if not e.endswith((".dist-info", ".pth", ".py"))}
    assert packages == {"capguard"}, entries
    assert not {e for e in entries if e.endswith(".py")}, entries     # no stray top-level modules either

    installed = purelib / "capguard"
    for name in ("models", "server"):
        folder = installed / name
        assert folder.is_dir() and not folder.is_symlink(), folder
        shipped = source_files(folder)
        expected = {f for f in source_files(REPO / name) if f.endswith(".py") or f.startswith("static/")}
        assert expected <= shipped, sorted(expected - shipped)
    assert (installed / "server" / "static" / "index.html").is_file()

    script = venv / "bin" / "capguard"
    assert script.is_file(), sorted(p.name for p in (venv / "bin").iterdir())
    assert "capguard.server.cli" in script.read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("target, venv", [("install", ".venv"), ("install-vllm", ".venv-vllm")])
def test_a_venv_build_on_a_short_disk_stops_before_it_starts(tmp_path, target, venv):
    """The last CI run of a full disk failed 13 minutes in, inside pip; make now says so up front."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    done = subprocess.run(["make", target, "DISK_GB=1000000"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert f"building {venv} needs about 1000000 GB free" in done.stderr and "GB are free" in done.stderr
    assert not (tmp_path / venv).exists()                  # nothing half-built
