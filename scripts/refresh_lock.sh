#!/usr/bin/env bash
# Rebuild constraints.txt: resolve the extras' ranges in a fresh virtualenv, run the suite, freeze.
# Usage: bash scripts/refresh_lock.sh [EXTRA_PIP_ARGS...]   (e.g. "transformers<5.24" to hold one back)
# The lock is only committed after the test suite passed in that venv and `pip check` is clean.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -e ".[dev,hf,report]" "torch==2.13.0" "$@"
pip check
python -m pytest -q
{
  echo "# Lock: every package the dev, hf and report extras install, at one tested, pip-check-clean set."
  echo "# Refresh with: bash scripts/refresh_lock.sh (fresh venv, resolve, full test suite, freeze)."
  echo "# torch is the CPU build that installs offline on the CI machines; the library itself does not pin it."
  pip freeze --all --exclude-editable | grep -vE '^(gradience|pip|wheel)==' | sed 's/+cpu$//'
} > constraints.txt
echo "constraints.txt rewritten from $venv"
