#!/usr/bin/env bash
# Install tinkerlm with its test extra into ./.venv and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The playground test drives Debian's chromium through playwright (never `playwright install`).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "tinkerlm tests: installing chromium for the playground test" >&2
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
bash scripts/install.sh test,mergekit  # mergekit: the merge parity tests compare against it
exec .venv/bin/python -m pytest -q "$@"
