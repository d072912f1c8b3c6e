#!/usr/bin/env bash
# Install tinkerlm with its test extra into ./.venv, run the linter (ruff), then the whole test suite.
# Extra arguments go to pytest (after the worker count below, so `-n 0` overrides it).
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
# One pytest process per core (pytest-xdist), each pinned to its own core by tests/conftest.py so that no worker's
# threads wait on another's; whole files go to one worker (--dist loadfile) so module fixtures load once.
# TINKERLM_TEST_WORKERS=1 (or `-n 0` among the arguments) runs them in this one process.
workers="${TINKERLM_TEST_WORKERS:-$(nproc)}"
[ "$workers" -gt 4 ] && workers=4
if [ "$workers" -gt 1 ]; then set -- -n "$workers" --dist loadfile "$@"; fi
exec .venv/bin/python -m pytest -q "$@"
