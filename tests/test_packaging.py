"""The kernels' one import name (``ragcompress_kernels``, from the top-level ``kernels/`` folder,
no symlink), in the editable install the tests run on and in a built wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def listed_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def copy_sources(dest: Path) -> None:
    """Copy what a clone holds (tracked files and untracked ones git does not ignore), not the
    working folder: a developer's ignored ``runs/`` and ``.venv`` are gigabytes, and pytest keeps
    the last three runs' temp folders."""
    git = shutil.which("git")
    command = [str(git), "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(command, capture_output=True) if git else None
    if listed is None or listed.returncode != 0:  # no git, or not a checkout (an unpacked sdist)
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = ROOT / name
        if path.is_file():  # listed but deleted in the work tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / name)


def test_every_package_folder_is_listed_in_pyproject():
    folders = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "ragcompress").rglob("__init__.py")}
    assert folders | {"ragcompress_kernels"} == set(listed_packages())
    assert not (ROOT / "ragcompress_kernels").exists()  # one way to import the kernels: no symlink


def test_editable_install_imports_the_kernels_folder():
    import ragcompress_kernels

    assert Path(ragcompress_kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_wheel_installs_the_kernels_under_their_import_name(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "source"
    copy_sources(source)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("ragcompress-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"ragcompress_kernels/__init__.py", "ragcompress_kernels/quantized_attention.py"} <= names
    assert "ragcompress/data/squad_sample/passages.jsonl" in names
    adaptors = sorted((ROOT / "ragcompress" / "distill" / "adaptors").glob("*/adaptor.json"))
    assert adaptors  # the presets' packaged adaptors (setuptools warns about these data folders)
    for config in adaptors:
        folder = config.parent.relative_to(ROOT).as_posix()
        assert {f"{folder}/adaptor.json", f"{folder}/adaptor.safetensors"} <= names
    assert not any(name.startswith("kernels/") for name in names)
    for package in listed_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names
