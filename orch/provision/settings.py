"""What model provisioning needs from the config, as plain values, and the pieces every
fetcher shares: a plan's step and throttled progress reports. Plain Python."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from orch.core.model_ref import FETCH_SCHEMES
from orch.provision.policy import DEFAULT_HF_ENDPOINT

log = logging.getLogger("orch.provision")

CHUNK_BYTES = 1 << 20
#: Progress is reported at most this often (plus once at the end).
REPORT_EVERY_S = 0.25

#: ``report(done_bytes, total_bytes_or_None)``
Report = Callable[[int, Optional[int]], None]


@dataclass(frozen=True)
class ProvisionSettings:
    """What provisioning needs from the catalog config (it satisfies the outbound ``Policy``
    protocol)."""

    model_cache: str
    allow_downloads: bool = True
    allowed_hosts: tuple[str, ...] = ()
    allowed_schemes: tuple[str, ...] = FETCH_SCHEMES
    timeout_s: float = 30.0
    ca_bundle: Optional[str] = None
    hf_endpoint: Optional[str] = None
    #: Relative ``file:`` refs resolve against this directory.
    base_dir: Optional[str] = None
    #: Longest one provisioning may run.
    deadline_s: float = 3600.0
    #: Directories ``file:`` refs must resolve into (``catalog.local_roots``); empty: the
    #: model cache only.
    local_roots: tuple[str, ...] = ()
    #: Where provisioned engine binaries live (a handoff's ``binary_path`` may lie there too).
    engine_cache: Optional[str] = None

    @classmethod
    def from_config(cls, catalog: Any, base_dir: Optional[Path | str] = None) -> "ProvisionSettings":
        outbound = catalog.outbound
        return cls(
            model_cache=catalog.model_cache,
            allow_downloads=outbound.allow_downloads,
            allowed_hosts=tuple(outbound.allowed_hosts),
            allowed_schemes=tuple(outbound.allowed_schemes),
            timeout_s=outbound.timeout_s,
            ca_bundle=outbound.ca_bundle,
            hf_endpoint=catalog.hf_endpoint,
            base_dir=str(base_dir) if base_dir is not None else None,
            deadline_s=catalog.provision_timeout_s,
            local_roots=tuple(catalog.local_roots or ()),
            engine_cache=catalog.engine_cache,
        )

    def effective_hf_endpoint(self) -> str:
        return (self.hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")

    def roots(self) -> tuple[str, ...]:
        """Where local model files may lie: the configured roots, or the model cache."""
        return self.local_roots or (self.model_cache,)

    def handoff_roots(self) -> tuple[str, ...]:
        """Where a handoff's model or engine binary may lie: the roots and the engine cache."""
        return self.roots() + ((self.engine_cache,) if self.engine_cache else ())


@dataclass(frozen=True)
class Step:
    kind: str
    detail: dict[str, Any]


class Throttled:
    """Calls ``report`` at most every REPORT_EVERY_S, from any thread, plus ``flush`` at the end."""

    def __init__(self, report: Optional[Report]) -> None:
        self.report = report
        self.lock = threading.Lock()
        self.last = 0.0
        self.done = 0
        self.total: Optional[int] = None

    def __call__(self, done: int, total: Optional[int]) -> None:
        if self.report is None:
            return
        with self.lock:
            self.done, self.total = done, total
            now = time.monotonic()
            if now - self.last < REPORT_EVERY_S:
                return
            self.last = now
        self._send(done, total)

    def flush(self) -> None:
        if self.report is not None:
            self._send(self.done, self.total)

    def _send(self, done: int, total: Optional[int]) -> None:
        try:
            self.report(done, total)
        except Exception as exc:  # progress is best effort; never fail a download over it
            log.debug("progress report failed: %s", exc)
