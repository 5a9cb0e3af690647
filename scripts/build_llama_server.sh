#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the llama.cpp source vendored in the sdist of the
# installed llama-cpp-python, so the orchestrator and llama-server run the same llama.cpp.
# Prints the binary's path. Reuses a build of the same version; pip fetches the sdist (from
# its cache when it has it). bench/vs_llama_server.py runs this when it finds no llama-server.
#
#   scripts/build_llama_server.sh            # -> .runtime/llama-server/llama-server
#   JOBS=1 NICE=19 scripts/build_llama_server.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${LLAMA_SERVER_DIR:-$ROOT/.runtime/llama-server}"
JOBS="${JOBS:-$(nproc)}"
NICE="${NICE:-0}"

VERSION="$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
if [ -x "$OUT/llama-server" ] && [ "$(cat "$OUT/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  echo "$OUT/llama-server"
  exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "fetching the llama-cpp-python $VERSION sdist" >&2
"$PY" -m pip download --quiet --no-binary :all: --no-deps --dest "$WORK" "llama-cpp-python==$VERSION" >&2
tar -xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC="$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"

echo "building llama-server from $SRC ($JOBS jobs, nice $NICE)" >&2
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
nice -n "$NICE" cmake -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2  # offline: no web UI, no downloads
nice -n "$NICE" cmake --build "$WORK/build" --target llama-server -j "$JOBS" >&2

mkdir -p "$OUT"
cp "$WORK/build/bin/llama-server" "$OUT/llama-server"
echo "$VERSION" > "$OUT/VERSION"
echo "$OUT/llama-server"
