"""The model catalog on disk: one JSON record per model, plus a sqlite index. Plain Python, no Ray.

Layout under the root::

    catalog.json          {"schema_version": N}: the layout version of this directory
    models/<id>.json      one record per model (the source of truth)
    handoffs/<id>.json    one record per handoff: an engine and/or a model ready for the pools
    index.sqlite3         id, ref, digest, state... for lookups; rebuilt from the records

A record is written to a temporary file in the same directory, fsynced, then renamed over
the old one, so a crash leaves either the old record or the new one, never a torn file. The
index is updated after the record; a crash in between leaves the index stale, which
``rebuild_index`` (run when the catalog actor starts) repairs. ``exists`` and ``locate`` only
read: they open the index read-only and create nothing.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import ValidationError

from orch.api.catalog import SCHEMA_VERSION, CatalogModel, HandoffRecord, ModelState
from orch.api.tasks import ID_PATTERN
from orch.core.files import atomic_write

RECORDS_DIR = "models"
HANDOFFS_DIR = "handoffs"
INDEX_FILE = "index.sqlite3"
MARKER_FILE = "catalog.json"
#: Layout of the sqlite index; a different one is dropped and rebuilt from the records.
INDEX_VERSION = 2
_MODEL_ID = re.compile(ID_PATTERN)


class CatalogError(ValueError):
    """A catalog operation that cannot be done; the message says why."""


class CatalogSchemaError(CatalogError):
    """The catalog (or one record) was written by a newer release than this one."""


def check_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not _MODEL_ID.match(model_id):
        raise CatalogError(
            f"model id {str(model_id)[:80]!r} must be 1-128 letters, digits and . _ : - (starting with a letter or digit)"
        )
    return model_id


def _record_path(root: Path, model_id: str) -> Path:
    return root / RECORDS_DIR / f"{check_model_id(model_id)}.json"


def _check_schema(data: dict[str, Any], where: str) -> None:
    version = data.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise CatalogError(f"{where}: schema_version is missing or not a positive integer")
    if version > SCHEMA_VERSION:
        raise CatalogSchemaError(
            f"{where} was written with catalog schema {version}, newer than the {SCHEMA_VERSION} this release "
            "reads; upgrade llama-orch, or point catalog.root at another directory"
        )


def parse_record(raw: bytes, where: str) -> dict[str, Any]:
    """A record file's content, validated; raises CatalogError / CatalogSchemaError."""
    return _parse(raw, where, CatalogModel, "catalog record")


def _parse(raw: bytes, where: str, model: type, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CatalogError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{where} is not a JSON object")
    _check_schema(data, where)
    try:
        return model.model_validate(data).model_dump(mode="json")
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CatalogError(f"{where} is not a valid {what}: {first['loc']}: {first['msg']}") from None


def _read_record(root: Path, model_id: str) -> Optional[dict[str, Any]]:
    path = _record_path(root, model_id)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return parse_record(raw, str(path))


def parse_handoff(raw: bytes, where: str) -> dict[str, Any]:
    """A handoff file's content, validated; raises CatalogError / CatalogSchemaError."""
    return _parse(raw, where, HandoffRecord, "handoff record")


def _handoff_path(root: Path, handoff_id: str) -> Path:
    return root / HANDOFFS_DIR / f"{check_model_id(handoff_id)}.json"


def _iter_record_files(root: Path, folder_name: str = RECORDS_DIR) -> Iterator[Path]:
    folder = root / folder_name
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json" and not path.name.startswith(".") and _MODEL_ID.match(path.stem):
            yield path


def _open_index_readonly(root: Path) -> Optional[sqlite3.Connection]:
    index = root / INDEX_FILE
    if not index.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{index.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        row = conn.execute("SELECT value FROM meta WHERE key = 'index_version'").fetchone()
        if row is None or int(row[0]) != INDEX_VERSION:
            conn.close()
            return None
        return conn
    except (sqlite3.Error, ValueError):
        return None


def exists(root: Path | str, model_id: str) -> bool:
    """Whether the catalog at ``root`` has a record for ``model_id``. Never writes."""
    try:
        return _record_path(Path(root), model_id).is_file()
    except CatalogError:
        return False


def locate(root: Path | str, ref: str, state: Optional[str] = ModelState.Active.value) -> Optional[dict[str, Any]]:
    """The record of the model provisioned from ``ref`` (canonical form), in ``state``
    (None: any). Reads the index read-only, then the records themselves when the index has
    no answer (it may lag a crash). Never writes."""
    root = Path(root)
    if not (root / RECORDS_DIR).is_dir():
        return None
    candidates: list[str] = []
    conn = _open_index_readonly(root)
    if conn is not None:
        try:
            candidates = [row[0] for row in conn.execute("SELECT id FROM models WHERE ref = ? ORDER BY id", (ref,))]
        except sqlite3.Error:
            candidates = []
        finally:
            conn.close()
    for model_id in candidates:
        record = _read_record(root, model_id)
        if record is not None and record["ref"] == ref and (state is None or record["state"] == state):
            return record
    for path in _iter_record_files(root):
        record = parse_record(path.read_bytes(), str(path))
        if record["ref"] == ref and (state is None or record["state"] == state):
            return record
    return None


class CatalogStore:
    """Read-write access to a catalog directory (one writer: the catalog actor)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        marker = self.root / MARKER_FILE
        if marker.is_file():
            try:
                data = json.loads(marker.read_bytes())
            except ValueError as exc:
                raise CatalogError(f"{marker} is not valid JSON: {exc}") from None
            _check_schema(data if isinstance(data, dict) else {}, str(marker))
        (self.root / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / HANDOFFS_DIR).mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            atomic_write(marker, json.dumps({"schema_version": SCHEMA_VERSION}).encode())
        self._ensure_index()

    # ------------------------------------------------------------------ index

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.root / INDEX_FILE, timeout=10)
        conn.execute("PRAGMA journal_mode=DELETE")
        return conn

    def _ensure_index(self) -> None:
        conn = self._connect()
        try:
            with conn:
                conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                row = conn.execute("SELECT value FROM meta WHERE key = 'index_version'").fetchone()
            if row is None or int(row[0]) != INDEX_VERSION:
                self._create_index(conn)
                self._fill_index(conn)
        finally:
            conn.close()

    @staticmethod
    def _create_index(conn: sqlite3.Connection) -> None:
        with conn:
            conn.execute("DROP TABLE IF EXISTS models")
            conn.execute(
                "CREATE TABLE models (id TEXT PRIMARY KEY, ref TEXT NOT NULL, digest TEXT NOT NULL, state TEXT NOT NULL,"
                " local_path TEXT NOT NULL, node_id TEXT, size_bytes INTEGER NOT NULL, updated_at REAL NOT NULL)"
            )
            conn.execute("CREATE INDEX models_ref ON models (ref)")
            conn.execute("CREATE INDEX models_digest ON models (digest)")
            conn.execute("DROP TABLE IF EXISTS handoffs")
            conn.execute(
                "CREATE TABLE handoffs (id TEXT PRIMARY KEY, engine TEXT NOT NULL, pool_id TEXT, model_ref TEXT,"
                " origin TEXT NOT NULL, updated_at REAL NOT NULL)"
            )
            conn.execute("CREATE INDEX handoffs_model_ref ON handoffs (model_ref)")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('index_version', ?)", (str(INDEX_VERSION),))

    def _fill_index(self, conn: sqlite3.Connection) -> int:
        records = [parse_record(path.read_bytes(), str(path)) for path in _iter_record_files(self.root)]
        handoffs = [parse_handoff(path.read_bytes(), str(path))
                    for path in _iter_record_files(self.root, HANDOFFS_DIR)]
        with conn:
            conn.execute("DELETE FROM models")
            conn.execute("DELETE FROM handoffs")
            for record in records:
                self._index_row(conn, record)
            for handoff in handoffs:
                self._index_handoff(conn, handoff)
        return len(records)

    @staticmethod
    def _index_handoff(conn: sqlite3.Connection, record: dict[str, Any]) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO handoffs VALUES (?, ?, ?, ?, ?, ?)",
            (record["id"], record["engine"], record["pool_id"], record["model_ref"], record["origin"],
             record["updated_at"]),
        )

    @staticmethod
    def _index_row(conn: sqlite3.Connection, record: dict[str, Any]) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (record["id"], record["ref"], record["digest"], record["state"], record["local_path"], record["node_id"],
             record["size_bytes"], record["updated_at"]),
        )

    def rebuild_index(self) -> int:
        """Recreate the index from the records (the source of truth); returns the count."""
        conn = self._connect()
        try:
            self._create_index(conn)
            return self._fill_index(conn)
        finally:
            conn.close()

    # ------------------------------------------------------------------ records

    def put(self, record: dict[str, Any]) -> dict[str, Any]:
        """Validate and store a record (created_at kept from an earlier one, updated_at now)."""
        if "schema_version" in record:
            _check_schema(record, f"record '{record.get('id')}'")
        now = time.time()
        previous = _read_record(self.root, check_model_id(record.get("id", "")))
        data = dict(record)
        data["schema_version"] = SCHEMA_VERSION
        data["created_at"] = previous["created_at"] if previous else data.get("created_at", now)
        data["updated_at"] = now
        try:
            validated = CatalogModel.model_validate(data).model_dump(mode="json")
        except ValidationError as exc:
            first = exc.errors()[0]
            raise CatalogError(f"record '{data.get('id')}' is not valid: {first['loc']}: {first['msg']}") from None
        path = _record_path(self.root, validated["id"])
        atomic_write(path, json.dumps(validated, sort_keys=True, indent=1).encode())
        conn = self._connect()
        try:
            with conn:
                self._index_row(conn, validated)
        finally:
            conn.close()
        return validated

    def get(self, model_id: str) -> Optional[dict[str, Any]]:
        return _read_record(self.root, model_id)

    def list(self, state: Optional[str] = None) -> list[dict[str, Any]]:
        records = [parse_record(path.read_bytes(), str(path)) for path in _iter_record_files(self.root)]
        return [r for r in records if state is None or r["state"] == state]

    def find(self, *, ref: Optional[str] = None, digest: Optional[str] = None,
             local_path: Optional[str] = None) -> list[dict[str, Any]]:
        """Records matching every given field, through the index."""
        clauses, values = [], []
        for column, value in (("ref", ref), ("digest", digest), ("local_path", local_path)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        where = " AND ".join(clauses) or "1 = 1"
        conn = self._connect()
        try:
            ids = [row[0] for row in conn.execute(f"SELECT id FROM models WHERE {where} ORDER BY id", values)]
        finally:
            conn.close()
        return [record for record in (self.get(model_id) for model_id in ids) if record is not None]

    def set_state(self, model_id: str, state: str) -> Optional[dict[str, Any]]:
        record = self.get(model_id)
        if record is None:
            return None
        record["state"] = ModelState(state).value
        return self.put(record)

    def update(self, model_id: str, **fields: Any) -> Optional[dict[str, Any]]:
        record = self.get(model_id)
        if record is None:
            return None
        record.update(fields)
        return self.put(record)

    def delete(self, model_id: str) -> Optional[dict[str, Any]]:
        """Remove a record; returns it (None when there was none)."""
        record = self.get(model_id)
        if record is None:
            return None
        _record_path(self.root, model_id).unlink(missing_ok=True)
        conn = self._connect()
        try:
            with conn:
                conn.execute("DELETE FROM models WHERE id = ?", (model_id,))
        finally:
            conn.close()
        return record

    def exists(self, model_id: str) -> bool:
        return exists(self.root, model_id)

    def locate(self, ref: str, state: Optional[str] = ModelState.Active.value) -> Optional[dict[str, Any]]:
        return locate(self.root, ref, state)

    # ------------------------------------------------------------------ handoffs

    def put_handoff(self, record: dict[str, Any]) -> dict[str, Any]:
        """Validate and store a handoff record, written like model records (atomically)."""
        if "schema_version" in record:
            _check_schema(record, f"handoff '{record.get('id')}'")
        now = time.time()
        path = _handoff_path(self.root, record.get("id", ""))
        previous = self.get_handoff(record["id"])
        data = dict(record, schema_version=SCHEMA_VERSION, updated_at=now)
        data["created_at"] = previous["created_at"] if previous else (data.get("created_at") or now)
        try:
            validated = HandoffRecord.model_validate(data).model_dump(mode="json")
        except ValidationError as exc:
            first = exc.errors()[0]
            raise CatalogError(f"handoff '{data.get('id')}' is not valid: {first['loc']}: {first['msg']}") from None
        atomic_write(path, json.dumps(validated, sort_keys=True, indent=1).encode())
        conn = self._connect()
        try:
            with conn:
                self._index_handoff(conn, validated)
        finally:
            conn.close()
        return validated

    def get_handoff(self, handoff_id: str) -> Optional[dict[str, Any]]:
        path = _handoff_path(self.root, handoff_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return parse_handoff(raw, str(path))

    def list_handoffs(self) -> list[dict[str, Any]]:
        return [parse_handoff(path.read_bytes(), str(path)) for path in _iter_record_files(self.root, HANDOFFS_DIR)]

    def delete_handoff(self, handoff_id: str) -> Optional[dict[str, Any]]:
        record = self.get_handoff(handoff_id)
        if record is None:
            return None
        _handoff_path(self.root, handoff_id).unlink(missing_ok=True)
        conn = self._connect()
        try:
            with conn:
                conn.execute("DELETE FROM handoffs WHERE id = ?", (handoff_id,))
        finally:
            conn.close()
        return record
