"""Atomic file replacement: readers see the old content or the new one, and no temporary
file is left behind, even when the write fails."""

from __future__ import annotations

import pytest

from orch.core.files import atomic_write


def test_replaces_the_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "record.json"
    atomic_write(path, b"old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "record.json"
    atomic_write(path, b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
