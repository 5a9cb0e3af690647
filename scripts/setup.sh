#!/usr/bin/env bash
# Creates .venv in the checkout and installs the project into it (nothing system-wide).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     runtime + test tools
#   scripts/setup.sh haproxy  runtime + HAProxy, for Serve's HAProxy ingress (opt-in; see
#                             docs/benchmarks.md, "Serve's ingress options"); combine: test haproxy
# Idempotent: a second run with unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
want_haproxy=""
for arg in "$@"; do
    case "$arg" in
        test) extras="[test]" ;;
        haproxy) want_haproxy=1 ;;
        *) echo "setup: unknown argument '$arg' (expected: test, haproxy)" >&2; exit 2 ;;
    esac
done

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

# Debian packages, installed as root or with passwordless sudo: apt_install WHAT PACKAGE...
# Says why and returns 1 when this user may not, there is no apt-get, or apt-get fails.
apt_install() {
    local what="$1"
    shift
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "setup: note: $what is not installed and this user cannot install it (not root, no passwordless sudo)" >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: note: $what is not installed and there is no apt-get here" >&2
        return 1
    fi
    echo "setup: installing $* with apt-get (for $what)"
    local log
    log="$(mktemp)"
    if ${sudo[@]+"${sudo[@]}"} apt-get update -qq >"$log" 2>&1 &&
        ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "$@" >>"$log" 2>&1; then
        rm -f "$log"
        return 0
    fi
    tail -n 5 "$log" >&2
    rm -f "$log"
    echo "setup: note: installing $* failed" >&2
    return 1
}

# The browser tests drive headless Chromium from the distribution's packages. Installed only
# when missing and when this user may (root, or passwordless sudo); otherwise they skip.
install_browser() {
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        return 0
    fi
    apt_install "the browser tests" chromium chromium-driver ||
        echo "setup: note: the browser tests will skip (install the Debian packages chromium and chromium-driver to run them)" >&2
}
if [ -n "$extras" ]; then install_browser; fi

# Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1) runs the distribution's haproxy
# binary (2.6 or later). Installed only when asked for and when this user may; otherwise say how.
install_haproxy() {
    if command -v haproxy >/dev/null 2>&1; then
        return 0
    fi
    apt_install "Serve's HAProxy ingress" haproxy
}
if [ -n "$want_haproxy" ]; then install_haproxy; fi

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=".venv/.orch-installed${extras}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing into .venv (llama-cpp-python compiles from source the first time: a few minutes)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".${extras}"
    echo "$want" > "$stamp"
fi
# The vLLM tests run on vLLM's CPU build and a converted checkpoint (cached after the first run).
if [ -n "$extras" ] && ! scripts/setup_vllm.sh; then
    echo "setup: note: installing vLLM failed; the vLLM tests will skip (run scripts/setup_vllm.sh to retry)" >&2
fi
