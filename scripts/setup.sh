#!/usr/bin/env bash
# Creates .venv in the checkout and installs the project into it (nothing system-wide).
#   scripts/setup.sh        runtime only
#   scripts/setup.sh test   runtime + test tools
# Idempotent: a second run with unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "test" ] && extras="[test]"

python_bin=""
for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
        python_bin="$candidate"
        break
    fi
done
if [ -z "$python_bin" ]; then
    echo "setup: Python 3.11 is required (python3.11 not found on PATH)" >&2
    exit 1
fi

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=".venv/.orch-installed${extras}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "setup: installing into .venv (llama-cpp-python compiles from source the first time: a few minutes)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extras}"
echo "$want" > "$stamp"
