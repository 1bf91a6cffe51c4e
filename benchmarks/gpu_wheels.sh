#!/usr/bin/env bash
# Wheels that a bare CUDA image needs before benchmarks/gpu_check.sh can import ragcompress: run here
# (a machine with a package index), carry the folder to the GPU machine, install it there into a
# target directory that goes first on PYTHONPATH. The image this was written for (2026-12, an H200:
# python 3.12, torch 2.11, triton 3.6, transformers 5.17) lacked transformers >= 5.24 (the model's
# forward takes `cache=`), the hub release it needs and that release's own dependencies, gguf and
# faiss-cpu; torch and triton are the image's own (CUDA builds).
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: .whl (add /.whl/ to .git/info/exclude)
#   # there:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site bash benchmarks/gpu_check.sh
#
# Versions are this venv's (.venv, `make setup-test`), so the GPU machine runs what the suite passed
# with; PYTHON_VERSION and PLATFORMS select the target interpreter and manylinux tags.

set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$repo/.whl}
venv_py=${VENV_PYTHON:-$repo/.venv/bin/python}
target_py=${PYTHON_VERSION:-3.12}
platforms=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64"}

[ -x "$venv_py" ] || { echo "gpu_wheels: no $venv_py (run make setup-test, or set VENV_PYTHON)" >&2; exit 2; }

# transformers and what it requires beyond the image (hub 2.x, kernels, their HTTP stack), then the
# two ragcompress dependencies the image lacks.
packages=(transformers huggingface_hub kernels tomlkit httpx2 httpcore2 truststore h11 idna anyio certifi
    click hf-xet regex gguf faiss-cpu)
pins=()
for name in "${packages[@]}"; do
    version=$("$venv_py" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
    [ -n "$version" ] || { echo "gpu_wheels: $name is not installed in $venv_py" >&2; exit 2; }
    pins+=("$name==$version")
done

platform_args=()
for tag in $platforms; do platform_args+=(--platform "$tag"); done
mkdir -p "$dir"
"$venv_py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$target_py" \
    --implementation cp "${platform_args[@]}" -d "$dir" "${pins[@]}"
echo "gpu_wheels: ${#pins[@]} wheels in $dir ($(du -sh "$dir" | cut -f1)): ${pins[*]}"
