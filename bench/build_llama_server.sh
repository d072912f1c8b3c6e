#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (bench only) from the llama.cpp source that the llama-cpp-python sdist vendors,
# so bench/server_compare.py runs the same llama.cpp version that bench/compare.py loads through llama_cpp.
# Explicit CPU flags (never -march=native), only the llama-server target, 2 jobs at low priority.
# Idempotent: prints the binary's path and exits at once when it is already built.
#
#   bench/build_llama_server.sh                 # -> ~/.cache/tinkerlm-bench/llama-server/bin/llama-server
#   LLAMA_SERVER_CACHE=/tmp/ls bench/build_llama_server.sh
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${LLAMA_SERVER_CACHE:-$HOME/.cache/tinkerlm-bench/llama-server}"
PYTHON="${PYTHON:-python3}"
BIN="$CACHE/bin/llama-server"

if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE/sdist"
if ! ls "$CACHE"/sdist/llama_cpp_python-"$VERSION".tar.gz >/dev/null 2>&1; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist" >&2
fi
SRC="$CACHE/src"
if [[ ! -d "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp" ]]; then
    rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
    tar -xzf "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$SRC.tmp"
    rm -rf "$SRC" && mv "$SRC.tmp" "$SRC"
fi
LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"

cmake -S "$LLAMA" -B "$CACHE/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF >&2
nice -n 10 cmake --build "$CACHE/build" --target llama-server -j"${JOBS:-2}" >&2

mkdir -p "$CACHE/bin"
cp "$CACHE/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
