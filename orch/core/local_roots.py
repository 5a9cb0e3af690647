"""Where local model files and engine binaries may lie: under the configured roots
(``catalog.local_roots``), judged after every symlink and ``..`` is resolved, so neither a
link nor a relative path can lead a registration out of them. Plain Python."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

ROOTS_KEY = "catalog.local_roots"


class OutsideLocalRoots(ValueError):
    """A local path that lies outside every configured root."""


def within_roots(path: Path | str, roots: Sequence[str], what: str = "model path") -> Path:
    """``path`` with symlinks resolved, refused unless it lies under one of ``roots`` (each
    resolved too). Returns the resolved path."""
    resolved = Path(os.path.realpath(path))
    for root in roots:
        base = Path(os.path.realpath(root))
        if resolved == base or base in resolved.parents:
            return resolved
    shown = f"{path} (resolved: {resolved})" if str(resolved) != os.path.abspath(path) else str(resolved)
    raise OutsideLocalRoots(
        f"{what} {shown} is not under {ROOTS_KEY} ({', '.join(roots) or 'none'}); local files are used only "
        f"from there: move the file under one of them, or add a directory that holds it to {ROOTS_KEY}"
    )
