#!/usr/bin/env bash
# Install everything (a virtual environment, the CPU build of torch, moerun itself non-editable with its extras,
# onnxruntime-node for the second-host test) and run the linter and the test suite.
# usage: bash scripts/test.sh [pytest args]      (VENV=path to use another environment)
#   no args: the whole suite (what CI runs on a fresh clone)
#   args: pytest gets only them, e.g. tests/test_cli.py or tests/test_cli.py -k bench
#         (options alone, e.g. -m slow, select from tests/)
# The installation is skipped when the environment was installed from these very files (a stamp keyed
# on the package's sources and data, pyproject.toml, this script and the node test's package files).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"

stamp="$VENV/.moerun-test-stamp"
key=$( (find ./*.py converter custom_ops deploy runtime serve tests/fixtures -type f ! -name '*.pyc';
        ls pyproject.toml scripts/test.sh tests/node/package*.json) | LC_ALL=C sort | xargs sha256sum | sha256sum)
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
  rm -f "$stamp"
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0            # the CPU build; a bare range would pull a CUDA build
  python -m pip install -q ".[test,serve,ray,deploy]"  # non-editable, as users install it; every extra is tested
  (cd tests/node && npm install --ignore-scripts --no-audit --no-fund --loglevel=error)
  echo "$key" > "$stamp"
fi
ruff check .

selection=(tests)
for arg in "$@"; do
  [ -e "${arg%%::*}" ] && selection=()             # a path among the args: they select
done
rc=0
python -m pytest ${selection[@]+"${selection[@]}"} "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests for this selection (exit 5)"
  exit 0
fi
exit "$rc"
