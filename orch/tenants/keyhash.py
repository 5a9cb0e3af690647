"""Key secrets: minting, parsing a presented key, salted hashing, constant-time checks.

Pure Python (no Ray, no I/O). A key is ``orch_<key_id>_<secret>``: the id is 12 hex digits
(public: it finds the key's row without a scan), the secret 43 url-safe characters (256
bits). Only ``sha256(salt || secret)`` with a per-key random salt is kept; the secret's
entropy makes a slow hash unnecessary, and the cache verifies every request with one
sha256.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Optional

KEY_PREFIX = "orch_"
_KEY = re.compile(r"^orch_([0-9a-f]{12})_([A-Za-z0-9_-]{20,200})$")
SALT_BYTES = 16


def mint(key_id: Optional[str] = None) -> tuple[str, str, str]:
    """A new key: (key_id, secret, whole key). A given id keeps its id (rotation)."""
    key_id = key_id or secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{KEY_PREFIX}{key_id}_{secret}"


def looks_like_key(presented: str) -> bool:
    """Shaped like one of our keys (a server token or any other bearer is not)."""
    return presented.startswith(KEY_PREFIX)


def parse(presented: str) -> Optional[tuple[str, str]]:
    """(key_id, secret) of a presented key, or None when it is not shaped like a key."""
    match = _KEY.match(presented)
    return (match.group(1), match.group(2)) if match else None


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


def matches(salt: bytes, stored: bytes, secret: str) -> bool:
    """Whether ``secret`` is the one hashed into ``stored``; constant time over equal-length
    digests, whatever the presented secret's length."""
    return hmac.compare_digest(digest(salt, secret), stored)
