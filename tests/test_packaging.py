"""The packages a wheel installs are the repo-root folders of the same names, and no repo-root
package shadows an installed distribution: ``python -m pytest`` puts the checkout first on
``sys.path``, so a folder named ``kernels/`` was imported in place of PyPI's ``kernels`` (a
dependency of transformers >= 5.25) and broke ``import transformers`` for the whole suite."""

from __future__ import annotations

import importlib
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


TOP_LEVEL = ("ragcompress", "ragcompress_kernels")
DISTRIBUTION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]  # ragcompress-kv


def repo_root_packages() -> set[str]:
    return {init.parent.name for init in ROOT.glob("*/__init__.py")}


def test_every_package_folder_is_listed_in_pyproject():
    assert repo_root_packages() == set(TOP_LEVEL)
    folders = {
        ".".join(init.parent.relative_to(ROOT).parts) for top in TOP_LEVEL for init in (ROOT / top).rglob("__init__.py")
    }
    assert folders == set(listed_packages())
    assert "package-dir" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_no_repo_root_package_shadows_an_installed_distribution():
    """A repo-root package whose import name another installed distribution also provides is
    imported in place of it from a checkout (transformers imports PyPI's ``kernels``)."""
    import importlib.metadata

    providers = importlib.metadata.packages_distributions()
    shadowed = {name: providers[name] for name in repo_root_packages() if set(providers.get(name, [])) - {DISTRIBUTION}}
    assert shadowed == {}


def test_editable_install_imports_the_repo_root_folders():
    import ragcompress
    import ragcompress_kernels

    for module in (ragcompress, ragcompress_kernels):
        assert Path(module.__file__).resolve() == ROOT / module.__name__ / "__init__.py"


def test_wheel_installs_the_kernels_under_their_import_name(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "source"
    copy_sources(source)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob(f"{DISTRIBUTION.replace('-', '_')}-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"ragcompress/py.typed", "ragcompress_kernels/py.typed"} <= names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert {"ragcompress_kernels/__init__.py", "ragcompress_kernels/quantized_attention.py"} <= names
    # the data and the adaptors trained on it ship with their attribution (CC BY-SA 4.0 asks for it)
    assert {"ragcompress/data/squad_sample/passages.jsonl", "ragcompress/data/squad_sample/README.md"} <= names
    assert "ragcompress/distill/adaptors/README.md" in names
    adaptors = sorted((ROOT / "ragcompress" / "distill" / "adaptors").glob("*/adaptor.json"))
    assert adaptors  # the presets' packaged adaptors (setuptools warns about these data folders)
    for config in adaptors:
        folder = config.parent.relative_to(ROOT).as_posix()
        assert {f"{folder}/adaptor.json", f"{folder}/adaptor.safetensors"} <= names
    for package in listed_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names


def test_the_command_line_starts_without_torch():
    """``ragcompress --help`` and the command line's own input errors must not wait ~4 s for torch
    and transformers: the package's names load on first use, and so do the commands' modules."""
    code = (
        "import sys, ragcompress, ragcompress.cli, ragcompress.errors; "
        "print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "command",
    [
        ["ask", "--question", "x"],
        ["eval", "--questions", "q.jsonl"],
        ["bench"],
        ["calibrate"],
        ["remove", "a"],
        ["compact"],
        ["serve"],
        ["verify"],
    ],
)
def test_a_missing_store_fails_before_torch_loads(command, tmp_path):
    """Every command that reads a store names a missing ``--store`` at once (not after ~5 s of
    imports), with the store's own wording (``verify`` with its own: a mistyped path is not a
    damaged store, and the path's absence is named)."""
    missing = tmp_path / "nope"
    code = (
        "import sys\n"
        "from ragcompress.cli import main\n"
        f"sys.argv = ['ragcompress', {command[0]!r}, '--store', {str(missing)!r}, *{command[1:]!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n"
        "    print(exc.code, sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "1 []", out.stdout + out.stderr
    # verify too (a folder that is no store has its own wording there: tests/test_cli.py)
    expected = f"store {missing} does not exist; build it with `ragcompress index --input PASSAGES --store {missing}`"
    assert out.stderr == f"error: {expected}\n"


@pytest.mark.parametrize("package", ["ragcompress", "ragcompress.indexing"])
def test_every_public_name_loads_on_first_use(package):
    module = importlib.import_module(package)

    assert sorted(module.__all__) == sorted(module._EXPORTS)
    for name in module.__all__:
        assert getattr(module, name) is not None
    assert {"IndexConfig", "index"} <= set(dir(module))
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
        module.nope  # noqa: B018


def test_the_distribution_name_is_ours_and_ships_its_licence_and_types():
    """PyPI's ``ragcompress`` is an unrelated project, which the integration's dependency and every
    ``pip install 'ragcompress[...]'`` hint fetched; the wheel shipped no licence text (Apache-2.0
    asks for one) and no ``py.typed`` (type checkers saw the package as untyped)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    integration = tomllib.loads(
        (ROOT / "integrations/llama-index-postprocessor-ragcompress/pyproject.toml").read_text()
    )
    assert DISTRIBUTION != "ragcompress"
    assert any(dep.startswith(f"{DISTRIBUTION}>=") for dep in integration["project"]["dependencies"])
    for meta, folder in ((project, ROOT), (integration, ROOT / "integrations/llama-index-postprocessor-ragcompress")):
        assert meta["project"]["license-files"] == ["LICENSE"]
        assert "Apache License" in (folder / "LICENSE").read_text()
    data = project["tool"]["setuptools"]["package-data"]
    for package in TOP_LEVEL:
        assert "py.typed" in data[package] and (ROOT / package / "py.typed").is_file()
