"""Catalog store: JSON records + sqlite index, atomic writes, schema versions, read-only helpers."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orch.api.catalog import SCHEMA_VERSION
from orch.catalog.store import (
    INDEX_FILE,
    MARKER_FILE,
    RECORDS_DIR,
    CatalogError,
    CatalogSchemaError,
    CatalogStore,
    exists,
    locate,
)
from orch.core import files as files_module

DIGEST = "sha256:" + "ab" * 32


def record(model_id: str = "smol", **overrides) -> dict:
    base = {
        "id": model_id,
        "ref": f"file:/models/{model_id}.gguf",
        "source": "file",
        "local_path": f"/models/{model_id}.gguf",
        "node_id": "ab" * 28,
        "managed": False,
        "digest": DIGEST,
        "digest_verified": False,
        "size_bytes": 1234,
        "ctx_max": 8192,
        "format": "gguf",
        "metadata": {"architecture": "llama", "has_chat_template": True},
        "revision": None,
        "state": "Active",
    }
    base.update(overrides)
    return base


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime (ns)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            stat = path.stat()
            out[str(path.relative_to(root))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return out


def test_round_trip(tmp_path):
    store = CatalogStore(tmp_path)
    stored = store.put(record())
    assert stored["schema_version"] == SCHEMA_VERSION
    assert stored["created_at"] == stored["updated_at"]
    assert store.get("smol") == stored
    # a fresh store over the same directory reads the same record
    again = CatalogStore(tmp_path)
    assert again.get("smol") == stored
    assert again.list() == [stored]
    assert json.loads((tmp_path / RECORDS_DIR / "smol.json").read_text())["id"] == "smol"


def test_updates_keep_created_at_and_move_updated_at(tmp_path):
    store = CatalogStore(tmp_path)
    first = store.put(record())
    time.sleep(0.01)
    second = store.set_state("smol", "Retired")
    assert second["state"] == "Retired"
    assert second["created_at"] == first["created_at"]
    assert second["updated_at"] > first["updated_at"]
    assert store.list(state="Retired") == [second] and store.list(state="Active") == []
    assert store.set_state("nope", "Retired") is None
    with pytest.raises(ValueError):
        store.set_state("smol", "Deleted")


def test_delete(tmp_path):
    store = CatalogStore(tmp_path)
    store.put(record())
    assert store.delete("smol")["id"] == "smol"
    assert store.get("smol") is None and store.delete("smol") is None
    assert not exists(tmp_path, "smol")
    assert store.find(ref="file:/models/smol.gguf") == []


def test_invalid_records_and_ids_are_refused(tmp_path):
    store = CatalogStore(tmp_path)
    with pytest.raises(CatalogError):
        store.put(record(digest="md5:abc"))
    with pytest.raises(CatalogError):
        store.put(record(state="Gone"))
    with pytest.raises(CatalogError):
        store.put(record(extra_field=1))
    for bad in ("../escape", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(CatalogError):
            store.put(record(bad))
        assert not exists(tmp_path, bad)
    assert list((tmp_path / RECORDS_DIR).iterdir()) == []


def test_a_crash_between_write_and_rename_keeps_the_old_record(tmp_path, monkeypatch):
    store = CatalogStore(tmp_path)
    old = store.put(record(size_bytes=1))
    path = tmp_path / RECORDS_DIR / "smol.json"
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("power lost before the rename")

    monkeypatch.setattr(files_module.os, "replace", crash)
    with pytest.raises(OSError, match="power lost"):
        store.put(record(size_bytes=2))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert CatalogStore(tmp_path).get("smol") == old
    assert [p.name for p in (tmp_path / RECORDS_DIR).iterdir()] == ["smol.json"]  # no temporary file left


def test_a_new_record_that_crashes_before_rename_does_not_exist(tmp_path, monkeypatch):
    store = CatalogStore(tmp_path)
    monkeypatch.setattr(files_module.os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        store.put(record("fresh"))
    monkeypatch.undo()
    assert not exists(tmp_path, "fresh")
    assert CatalogStore(tmp_path).list() == []


def test_index_is_rebuilt_from_the_records(tmp_path):
    store = CatalogStore(tmp_path)
    store.put(record("a"))
    store.put(record("b", ref="file:/models/shared.gguf"))
    store.put(record("c", ref="file:/models/shared.gguf"))
    (tmp_path / INDEX_FILE).unlink()
    reopened = CatalogStore(tmp_path)  # a missing index is recreated from the records
    assert [r["id"] for r in reopened.find(ref="file:/models/shared.gguf")] == ["b", "c"]
    # records written behind the index's back (a crash before the index update) come back
    with sqlite3.connect(tmp_path / INDEX_FILE) as conn:
        conn.execute("DELETE FROM models")
    assert reopened.find(ref="file:/models/shared.gguf") == []
    assert reopened.rebuild_index() == 3
    assert [r["id"] for r in reopened.find(digest=DIGEST)] == ["a", "b", "c"]


def test_a_stale_or_foreign_index_version_is_rebuilt(tmp_path):
    CatalogStore(tmp_path).put(record())
    with sqlite3.connect(tmp_path / INDEX_FILE) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'index_version'")
        conn.execute("DELETE FROM models")
    assert [r["id"] for r in CatalogStore(tmp_path).find(ref="file:/models/smol.gguf")] == ["smol"]


def test_newer_schema_is_refused_clearly(tmp_path):
    CatalogStore(tmp_path).put(record())
    path = tmp_path / RECORDS_DIR / "smol.json"
    data = json.loads(path.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    data["field_from_the_future"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(CatalogSchemaError, match=r"newer than the 1 this release reads"):
        CatalogStore(tmp_path).get("smol")
    with pytest.raises(CatalogSchemaError):
        CatalogStore(tmp_path).rebuild_index()
    with pytest.raises(CatalogSchemaError):
        CatalogStore(tmp_path).put(dict(record("other"), schema_version=SCHEMA_VERSION + 1))


def test_newer_catalog_directory_is_refused(tmp_path):
    CatalogStore(tmp_path)
    (tmp_path / MARKER_FILE).write_text(json.dumps({"schema_version": SCHEMA_VERSION + 5}))
    with pytest.raises(CatalogSchemaError, match="upgrade llama-orch"):
        CatalogStore(tmp_path)


def test_corrupt_record_is_reported_with_its_path(tmp_path):
    CatalogStore(tmp_path)
    (tmp_path / RECORDS_DIR / "bad.json").write_text("{not json")
    with pytest.raises(CatalogError, match="bad.json"):
        CatalogStore(tmp_path).get("bad")


# --------------------------------------------------------------------------- read-only helpers


def test_exists_and_locate_answer_without_writing(tmp_path):
    store = CatalogStore(tmp_path)
    store.put(record("a", ref="hf:org/repo/a.gguf"))
    store.put(record("b", ref="hf:org/repo/b.gguf", state="Retired"))
    before = snapshot(tmp_path)
    os.chmod(tmp_path / INDEX_FILE, 0o444)
    try:
        assert exists(tmp_path, "a") and not exists(tmp_path, "zzz") and not exists(tmp_path, "../a")
        assert locate(tmp_path, "hf:org/repo/a.gguf")["id"] == "a"
        assert locate(tmp_path, "hf:org/repo/b.gguf") is None  # Retired is not located by default
        assert locate(tmp_path, "hf:org/repo/b.gguf", state=None)["id"] == "b"
        assert locate(tmp_path, "hf:org/repo/none.gguf") is None
    finally:
        os.chmod(tmp_path / INDEX_FILE, 0o644)
    assert snapshot(tmp_path) == before


def test_locate_finds_records_the_index_missed(tmp_path):
    store = CatalogStore(tmp_path)
    store.put(record("a", ref="hf:org/repo/a.gguf"))
    with sqlite3.connect(tmp_path / INDEX_FILE) as conn:
        conn.execute("DELETE FROM models")
    before = snapshot(tmp_path)
    assert locate(tmp_path, "hf:org/repo/a.gguf")["id"] == "a"
    (tmp_path / INDEX_FILE).unlink()
    before = snapshot(tmp_path)
    assert locate(tmp_path, "hf:org/repo/a.gguf")["id"] == "a"
    assert snapshot(tmp_path) == before


def test_read_only_helpers_never_create_a_catalog(tmp_path):
    missing = tmp_path / "nothing-here"
    assert not exists(missing, "a")
    assert locate(missing, "hf:org/repo") is None
    assert not missing.exists()


def test_store_is_pure_python():
    code = ("import sys\nimport orch.catalog.store, orch.provision.gguf, orch.provision.models, orch.provision.policy\n"
            "import orch.core.model_ref, orch.api.catalog\nprint('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
