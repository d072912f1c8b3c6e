#!/usr/bin/env bash
# Install tinkerlm with its test extra into ./.venv, run the linter (ruff), then the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The playground test drives Debian's chromium through playwright (never `playwright install`).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "tinkerlm tests: installing chromium for the playground test" >&2
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
# mergekit: the merge parity tests compare against it; llamacpp: the export interop tests load our GGUFs in llama.cpp;
# lmeval: the lm-evaluation-harness backend's parity tests against its `hf` model
bash scripts/install.sh test,mergekit,llamacpp,lmeval
# The linter first: formatting and a small rule set (pyproject.toml [tool.ruff]); `ruff format .` and
# `ruff check --fix .` repair most of what it reports.
.venv/bin/ruff format --check --quiet . || { echo "tinkerlm tests: run '.venv/bin/ruff format .'" >&2; exit 1; }
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q "$@"
