"""GGUF header reader: the metadata a model's catalog record keeps, read with ``struct`` only.

A GGUF file starts with ``GGUF``, a version (2 or 3), the tensor count, the metadata
key/value count, the key/value pairs, then one info record per tensor. Only the header is
read: large arrays (the tokenizer's vocabulary) are skipped without being kept, and every
length is checked against bounds and the file size, so a corrupt or hostile file fails with
``GGUFError`` instead of exhausting memory. Plain Python, no Ray.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
#: Bounds that no real model reaches.
MAX_KV = 100_000
MAX_TENSORS = 1_000_000
MAX_KEY_BYTES = 65_536
MAX_STRING_BYTES = 64 * 1024 * 1024
MAX_DIMS = 8

# value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALAR = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i", _FLOAT32: "<f",
    _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}

#: llama.cpp's ``general.file_type`` values (LLAMA_FTYPE_*).
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0",
}


class GGUFError(ValueError):
    """Not a readable GGUF header; the message says what was wrong and where."""


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    tensor_count: int
    architecture: Optional[str]
    name: Optional[str]
    context_length: Optional[int]
    has_chat_template: bool
    file_type: Optional[int]
    file_type_name: Optional[str]
    parameter_count: Optional[int]
    size_label: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Reader:
    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size

    def _need(self, count: int, what: str) -> None:
        if count < 0 or self.handle.tell() + count > self.size:
            raise GGUFError(f"{what} runs past the end of the file (offset {self.handle.tell()}, {count} bytes)")

    def read(self, count: int, what: str) -> bytes:
        self._need(count, what)
        data = self.handle.read(count)
        if len(data) != count:
            raise GGUFError(f"{what}: short read")
        return data

    def skip(self, count: int, what: str) -> None:
        self._need(count, what)
        self.handle.seek(count, 1)

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str, limit: int = MAX_STRING_BYTES, keep: bool = True) -> Optional[str]:
        length = self.u64(f"{what} length")
        if length > limit:
            raise GGUFError(f"{what} is {length} bytes, more than the {limit} allowed")
        if not keep:
            self.skip(length, what)
            return None
        return self.read(length, what).decode("utf-8", errors="replace")

    def value(self, kind: int, what: str, keep: bool) -> Any:
        if kind in _SCALAR:
            return self.scalar(_SCALAR[kind], what)
        if kind == _STRING:
            return self.string(what, keep=keep)
        if kind == _ARRAY:
            item_kind = self.u32(f"{what} item type")
            count = self.u64(f"{what} item count")
            if item_kind in _SCALAR:
                self.skip(count * struct.calcsize(_SCALAR[item_kind]), what)
            elif item_kind == _STRING:
                if count * 8 > self.size:
                    raise GGUFError(f"{what} claims {count} strings, more than the file can hold")
                for _ in range(count):
                    self.string(f"{what} item", keep=False)
            else:
                raise GGUFError(f"{what}: arrays of type {item_kind} are not readable")
            return None
        raise GGUFError(f"{what}: unknown value type {kind}")


def read_gguf(path: Path | str) -> GGUFInfo:
    """The header of a GGUF file; raises GGUFError for anything else."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        reader = _Reader(handle, size)
        if size < 4 or reader.read(4, "magic") != MAGIC:
            raise GGUFError(f"{path.name} is not a GGUF file (no GGUF magic)")
        version = reader.u32("version")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(f"{path.name}: GGUF version {version} is not supported (readable: 2, 3)")
        tensor_count = reader.u64("tensor count")
        kv_count = reader.u64("metadata count")
        if tensor_count > MAX_TENSORS or kv_count > MAX_KV:
            raise GGUFError(f"{path.name}: {tensor_count} tensors / {kv_count} metadata keys is beyond any real model")
        metadata: dict[str, Any] = {}
        for index in range(kv_count):
            key = reader.string(f"metadata key #{index}", limit=MAX_KEY_BYTES) or ""
            kind = reader.u32(f"type of {key}")
            keep = not key.startswith("tokenizer.ggml.")
            metadata[key] = reader.value(kind, key, keep)
        parameters = 0
        for index in range(tensor_count):
            reader.string(f"tensor #{index} name", limit=MAX_KEY_BYTES, keep=False)
            n_dims = reader.u32(f"tensor #{index} dimensions")
            if n_dims > MAX_DIMS:
                raise GGUFError(f"tensor #{index} has {n_dims} dimensions")
            count = 1
            for _ in range(n_dims):
                count *= reader.u64(f"tensor #{index} shape")
            reader.skip(12, f"tensor #{index} type and offset")
            parameters += count

    arch = metadata.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    context = metadata.get(f"{arch}.context_length") if arch else None
    file_type = metadata.get("general.file_type")
    name = metadata.get("general.name")
    label = metadata.get("general.size_label")
    return GGUFInfo(
        version=version,
        tensor_count=tensor_count,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        context_length=int(context) if isinstance(context, int) and context > 0 else None,
        has_chat_template=isinstance(metadata.get("tokenizer.chat_template"), str)
        and bool(metadata["tokenizer.chat_template"]),
        file_type=file_type if isinstance(file_type, int) else None,
        file_type_name=FILE_TYPES.get(file_type, f"type_{file_type}") if isinstance(file_type, int) else None,
        parameter_count=parameters if tensor_count else None,
        size_label=label if isinstance(label, str) else None,
    )


def is_gguf(path: Path | str) -> bool:
    try:
        with Path(path).open("rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False
