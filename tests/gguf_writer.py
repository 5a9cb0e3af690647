"""Writes small GGUF files for tests (header, metadata and tensor infos; no tensor data)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

_TYPES = {bool: 7, int: 4, float: 6, str: 8}


def _string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(value: Any) -> bytes:
    if isinstance(value, bool):
        return struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return struct.pack("<IQ", 10, value) if value > 0xFFFFFFFF else struct.pack("<II", 4, value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    if isinstance(value, str):
        return struct.pack("<I", 8) + _string(value)
    if isinstance(value, list):
        if value and isinstance(value[0], str):
            return struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_string(v) for v in value)
        return struct.pack("<IIQ", 9, 5, len(value)) + b"".join(struct.pack("<i", v) for v in value)
    raise TypeError(type(value))


def gguf_bytes(metadata: dict[str, Any], tensors: list[tuple[str, list[int]]] = (), version: int = 3) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, value in metadata.items():
        out += _string(key) + _value(value)
    offset = 0
    for name, shape in tensors:
        out += _string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", 0, offset)
        offset += 32
    return out + b"\0" * 64


def tiny_gguf(context_length: int = 2048, name: str = "Tiny Test", template: bool = True) -> bytes:
    metadata: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": name,
        "general.file_type": 15,
        "llama.context_length": context_length,
        "tokenizer.ggml.tokens": ["<s>", "</s>", "a", "b"],
        "tokenizer.ggml.token_type": [1, 1, 1, 1],
    }
    if template:
        metadata["tokenizer.chat_template"] = "{{ messages }}"
    return gguf_bytes(metadata, [("tok_embd.weight", [8, 4]), ("out.weight", [4, 8, 2])])


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
