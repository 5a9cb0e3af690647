"""The ``hf:`` fetcher: huggingface-hub fetches one file (``hf_hub_download``) or a whole
repository (``snapshot_download``) into ``<cache>/hf`` (its own layout), offline when
``HF_HUB_OFFLINE`` is set. Its HTTP client is ours: every request, redirects to CDN hosts
included, is judged by the outbound policy by URL and then by the addresses it connects to
(orch/provision/connect.py). Plain Python."""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from orch.core.model_ref import ensure_under
from orch.provision.connect import Gate, gate_for, pinned_transport
from orch.provision.errors import FetchFailed, ProvisionError, SourceNotFound
from orch.provision.policy import check_url
from orch.provision.settings import ProvisionSettings, Throttled

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


_HF_LOCK = threading.Lock()
_hf_gate: Optional[Callable[[str], None]] = None
#: Judges the addresses of each connection while a provisioning runs (None: none runs).
_hf_address_gate: Optional[Gate] = None
_hf_client_key: Optional[tuple[float, Optional[str]]] = None


def _hf_request_gate(request: Any) -> None:
    gate = _hf_gate
    if gate is not None:
        gate(str(request.url))


def _hf_client_factory(timeout_s: float, ca_bundle: Optional[str]) -> Callable[[], Any]:
    """huggingface-hub's client, plus the outbound gate on every request (redirects included)
    and a finite timeout on every call (its own default waits forever on some calls)."""
    import httpx2
    from huggingface_hub.utils._http import hf_request_event_hook

    class FiniteTimeouts(httpx2.BaseTransport):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def handle_request(self, request: Any) -> Any:
            given = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {
                key: given.get(key) if given.get(key) is not None else timeout_s
                for key in ("connect", "read", "write", "pool")
            }
            return self.inner.handle_request(request)

        def close(self) -> None:
            self.inner.close()

    def factory() -> Any:
        verify: Any = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        return httpx2.Client(
            event_hooks={"request": [hf_request_event_hook, _hf_request_gate]},
            follow_redirects=True,
            timeout=httpx2.Timeout(timeout_s),
            transport=FiniteTimeouts(pinned_transport(httpx2, httpx2.HTTPTransport(verify=verify),
                                                      lambda: _hf_address_gate)),
        )

    return factory


@contextlib.contextmanager
def _hf_session(settings: ProvisionSettings) -> Iterator[None]:
    global _hf_gate, _hf_address_gate, _hf_client_key
    import huggingface_hub

    with _HF_LOCK:
        key = (settings.timeout_s, settings.ca_bundle)
        if _hf_client_key != key:
            huggingface_hub.set_client_factory(_hf_client_factory(*key))
            _hf_client_key = key
        _hf_gate = lambda url: check_url(url, settings)  # noqa: E731
        _hf_address_gate = gate_for(settings)
        try:
            yield
        finally:
            _hf_gate = _hf_address_gate = None


def _progress_class(progress: Throttled) -> type:
    """A tqdm that reports bytes to ``progress`` and draws nothing."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    lock = threading.Lock()
    counted = {"done": 0}

    class Progress(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._counts = kwargs.get("unit") == "B" and not str(kwargs.get("name") or "").endswith(".transfer")
            self._own_total = kwargs.get("total")
            initial = kwargs.get("initial") or 0
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            if self._counts and initial:
                self._add(int(initial))

        def _add(self, n: int) -> None:
            with lock:
                counted["done"] += n
                done = counted["done"]
            total = self.total if isinstance(self.total, (int, float)) and self.total else None
            progress(done, int(total) if total else None)

        def update(self, n: Any = 1) -> Any:
            if self._counts and n:
                self._add(int(n))
            return super().update(n)

    return Progress


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hf_fetch(detail: dict[str, Any], settings: ProvisionSettings, progress: Throttled, *, snapshot: bool) -> Path:
    """One file (``hf_hub_download``) or a whole repository (``snapshot_download``) into the
    cache; offline (cache only) when ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub import errors as hf_errors

    cache_dir = Path(detail["cache_dir"])
    ensure_under(settings.model_cache, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    offline = _env_true("HF_HUB_OFFLINE")
    where = f"hf:{detail['repo']}" + (f"/{detail['file']}" if "file" in detail else "")
    common = dict(
        repo_id=detail["repo"], revision=detail["revision"], cache_dir=str(cache_dir), endpoint=detail["endpoint"],
        local_files_only=offline, etag_timeout=settings.timeout_s, tqdm_class=_progress_class(progress),
    )
    try:
        with _hf_session(settings):
            if snapshot:
                result = snapshot_download(**common, max_workers=2)
            else:
                result = hf_hub_download(filename=detail["file"], **common)
    except ProvisionError:
        raise
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.RemoteEntryNotFoundError,
            hf_errors.GatedRepoError) as exc:
        raise SourceNotFound(f"{where}: {_first_line(exc)}") from None
    except hf_errors.LocalEntryNotFoundError as exc:
        if offline:
            raise SourceNotFound(f"{where}: HF_HUB_OFFLINE is set and it is not in the cache ({cache_dir})") from None
        raise FetchFailed(f"{where}: the Hub could not be reached and it is not cached: {_first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise FetchFailed(f"{where}: {_first_line(exc)}") from None
    path = Path(str(result))
    ensure_under(cache_dir, path)
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def commit_of(path: Path) -> Optional[str]:
    parts = Path(path).parts
    for index, part in enumerate(parts[:-1]):
        if part == "snapshots" and _COMMIT.match(parts[index + 1]):
            return parts[index + 1]
    return None
