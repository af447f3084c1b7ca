#!/usr/bin/env bash
# Creates .venv (Python >= 3.12) in the repository root and installs
# lorap_jax with its test, datasets and plots extras (scikit-image and RDKit,
# about 60 MB of wheels, which build MNIST superpixels and AqSol; matplotlib
# for the figures; their tests skip without them). Safe to run again: it
# reuses the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
  for candidate in "${PYTHON:-}" python3.12 python3.13 python3; do
    if [ -n "$candidate" ] && python_ok "$candidate"; then
      echo "$candidate"; return 0
    fi
  done
  # pyenv installs a python3.12 shim that only works with the version selected.
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -rV); do
      candidate="$(pyenv root)/versions/$version/bin/python3"
      if python_ok "$candidate"; then echo "$candidate"; return 0; fi
    done
  fi
  return 1
}

if [ ! -x .venv/bin/python ] || ! python_ok .venv/bin/python; then
  python="$(find_python)" || {
    echo "bootstrap: Python >= 3.12 not found (set PYTHON=/path/to/python3.12)" >&2
    exit 1
  }
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test,datasets,plots]"
