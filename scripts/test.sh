#!/usr/bin/env bash
# Install everything from scratch (a virtual environment, the CPU build of torch, moerun itself
# non-editable, onnxruntime-node for the second-host test) and run the linter and the test suite.
# usage: bash scripts/test.sh [pytest args]      (VENV=path to use another environment)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0            # the CPU build; a bare range would pull a CUDA build
python -m pip install -q ".[test]"                 # non-editable, as users install it
(cd tests/node && npm install --ignore-scripts --no-audit --no-fund --loglevel=error)
ruff check .
rc=0
python -m pytest tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests for this selection (exit 5)"
  exit 0
fi
exit "$rc"
