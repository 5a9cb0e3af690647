"""Model references, resolved to a local file without touching the network.

Accepted here: ``pkg:<python package>/<file>`` (a model shipped inside an installed
package, such as the embedded default), ``file:/abs/path``, ``file:relative/path`` and plain
paths. Relative paths resolve against a base directory, and ``..`` never leaves it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ACCEPTED_FORMS = "pkg:<package>/<file>, file:/abs/path, file:relative/path, /abs/path, relative/path"
_PACKAGE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ModelRefError(ValueError):
    pass


@dataclass(frozen=True)
class ModelRef:
    scheme: str  # "pkg" or "file"
    target: str  # package/file for pkg, the path for file
    raw: str


def parse_model_ref(raw: str) -> ModelRef:
    if not isinstance(raw, str) or not raw.strip() or "\x00" in raw:
        raise ModelRefError(f"model ref {raw!r} is empty or malformed; accepted forms: {ACCEPTED_FORMS}")
    if raw.startswith("pkg:"):
        body = raw[4:]
        package, _, filename = body.partition("/")
        if not _PACKAGE.match(package) or not filename or "/" in filename or filename in (".", ".."):
            raise ModelRefError(f"model ref {raw!r}: expected pkg:<package>/<file>; accepted forms: {ACCEPTED_FORMS}")
        return ModelRef("pkg", body, raw)
    if raw.startswith("file:"):
        return ModelRef("file", raw[5:], raw)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", raw) or re.match(r"^(hf|s3|oci):", raw):
        raise ModelRefError(
            f"model ref {raw!r} needs fetching, which this resolver does not do; "
            f"accepted local forms: {ACCEPTED_FORMS}"
        )
    return ModelRef("file", raw, raw)


def resolve_local(ref: ModelRef | str, base_dir: Optional[Path] = None) -> Path:
    """Absolute path of the model file; raises ModelRefError when it does not exist."""
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    if ref.scheme == "pkg":
        package, _, filename = ref.target.partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelRefError(f"model ref {ref.raw!r}: package '{package}' is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
    else:
        path = Path(ref.target)
        if not path.is_absolute():
            base = (base_dir or Path.cwd()).resolve()
            path = (base / path).resolve()
            if base not in path.parents and path != base:
                raise ModelRefError(f"model ref {ref.raw!r} leaves its base directory {base}")
    if not path.is_file():
        raise ModelRefError(f"model ref {ref.raw!r}: no file at {path}")
    return path


def display_name(ref: str) -> str:
    """Short, stable name for a model ref (used in /v1/models and logs)."""
    tail = ref.rstrip("/").rsplit("/", 1)[-1]
    tail = tail.split(":", 1)[-1] if tail.startswith(("pkg:", "file:")) else tail
    return os.path.splitext(tail)[0] if tail.endswith(".gguf") else tail
