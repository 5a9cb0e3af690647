"""Model provisioning: a deterministic plan for a ref, and the steps that carry it out.
Plain Python, no Ray (``orch.provision.tasks`` runs ``execute`` as a Ray task on the target
node and stores the record in the catalog).

``plan`` checks the ref, the outbound policy and ``catalog.local_roots`` and lists the
steps, without touching the network, so it can be shown (``dry_run``) and refused at once.
``execute`` runs those steps in order:

- ``stage``: a ``file:``/``pkg:`` model is used where it lies (a ``file:`` one only under
  ``catalog.local_roots``, judged again on the node with symlinks resolved); nothing is copied;
- ``check_policy``: the URL, and the addresses its host resolves to on the node;
- ``download``: an ``https://`` file into ``<cache>/url/...`` (orch/provision/fetch_url.py);
- ``hf_download`` / ``hf_snapshot``: huggingface-hub into ``<cache>/hf``
  (orch/provision/fetch_hf.py);
- ``digest``: sha256 of the file (of a manifest of every file for a directory), checked
  against the one given, else computed and recorded as unverified;
- ``inspect``: GGUF header (or ``config.json``) metadata, the trained context;
- ``record``: the catalog record, Active.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from orch.api.catalog import DIGEST_PATTERN
from orch.api.tasks import ID_PATTERN
from orch.catalog.handoff_files import check_paths
from orch.core.local_roots import OutsideLocalRoots, within_roots
from orch.core.model_ref import (
    ModelRef,
    ModelRefError,
    cache_path,
    catalog_ref,
    default_model_id,
    parse_ref,
    resolve_local,
    resolve_local_path,
    safe_join,
)
from orch.provision.errors import BadModelFile, DigestMismatch, InvalidRequest, LocalPathRefused, SourceNotFound
from orch.provision.fetch_hf import commit_of, hf_fetch
from orch.provision.fetch_url import download
from orch.provision.files import digest_path, inspect_model, remove_managed
from orch.provision.gguf import GGUFError
from orch.provision.policy import check_ref, check_url
from orch.provision.settings import ProvisionSettings, Report, Step, Throttled

log = logging.getLogger("orch.provision")

_DIGEST = re.compile(DIGEST_PATTERN)
_MODEL_ID = re.compile(ID_PATTERN)

__all__ = ["ProvisionPlan", "ProvisionSettings", "Step", "check_handoff_paths", "check_local_file", "execute", "plan"]


@dataclass(frozen=True)
class ProvisionPlan:
    model_id: str
    ref: str
    source: str
    managed: bool
    steps: tuple[Step, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "ref": self.ref,
            "source": self.source,
            "managed": self.managed,
            "steps": [{"kind": step.kind, "detail": dict(step.detail)} for step in self.steps],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProvisionPlan":
        return cls(data["model_id"], data["ref"], data["source"], data["managed"],
                   tuple(Step(s["kind"], dict(s["detail"])) for s in data["steps"]))


# --------------------------------------------------------------------------- plan


def check_local_file(path: Path | str, settings: ProvisionSettings, what: str = "model path") -> Path:
    """``path`` resolved, or LocalPathRefused (403) when it lies outside ``catalog.local_roots``."""
    try:
        return within_roots(path, settings.roots(), what)
    except OutsideLocalRoots as exc:
        raise LocalPathRefused(str(exc)) from None


def check_handoff_paths(record: dict[str, Any], settings: ProvisionSettings) -> None:
    """A handoff's ``model_path`` and ``binary_path`` must lie under the roots (or the engine
    cache); else LocalPathRefused (403)."""
    try:
        check_paths(record, settings.handoff_roots())
    except OutsideLocalRoots as exc:
        raise LocalPathRefused(str(exc)) from None


def _fetch_steps(ref: ModelRef, settings: ProvisionSettings, hf_endpoint: str, digest: Optional[str]) -> list[Step]:
    if ref.scheme in ("https", "http"):
        return [
            Step("check_policy", {"url": ref.url, "host": ref.host}),
            Step("download", {
                "url": ref.url,
                "to": str(cache_path(ref, settings.model_cache)),
                "resume": "HTTP Range from the .partial file a failed attempt left",
                "timeout_s": settings.timeout_s,
                "expected_digest": digest,
            }),
        ]
    detail = {
        "repo": ref.repo,
        "revision": ref.revision or "main",
        "endpoint": hf_endpoint,
        "cache_dir": str(safe_join(settings.model_cache, "hf")),
        "offline": "honoured when HF_HUB_OFFLINE is set on the node",
        "timeout_s": settings.timeout_s,
    }
    endpoint_host = re.sub(r"^https?://", "", hf_endpoint).split("/", 1)[0]
    check = Step("check_policy", {"url": hf_endpoint, "host": endpoint_host})
    if ref.path:
        return [check, Step("hf_download", dict(detail, file=ref.path))]
    return [check, Step("hf_snapshot", detail)]


def plan(raw_ref: str, settings: ProvisionSettings, *, model_id: Optional[str] = None,
         digest: Optional[str] = None) -> ProvisionPlan:
    """The steps that provision ``raw_ref``; raises ModelRefError, InvalidRequest,
    OutboundRefused, LocalPathRefused or ProvisionUnsupported before anything runs."""
    ref = parse_ref(raw_ref)
    key = catalog_ref(ref, settings.base_dir)
    model_id = model_id or default_model_id(key)
    if not _MODEL_ID.match(model_id):
        raise InvalidRequest(f"model id {model_id[:80]!r} must be 1-128 letters, digits and . _ : -")
    if digest is not None and not _DIGEST.match(digest):
        raise InvalidRequest(f"digest {digest[:80]!r} must be 'sha256:' followed by 64 lowercase hex digits")
    hf_endpoint = settings.effective_hf_endpoint()
    check_ref(ref, settings, hf_endpoint)
    steps: list[Step] = []
    if ref.scheme == "pkg":
        package, _, filename = ref.target.partition("/")
        steps.append(Step("stage", {"package": package, "file": filename, "copy": False}))
    elif ref.scheme == "file":
        check_local_file(key[len("file:"):], settings)
        steps.append(Step("stage", {"path": key[len("file:"):], "copy": False}))
    else:
        steps += _fetch_steps(ref, settings, hf_endpoint, digest)
    steps.append(Step("digest", {"algorithm": "sha256", "expected": digest,
                                 "of": "a manifest of every file" if ref.scheme == "hf" and not ref.path else "the file"}))
    steps.append(Step("inspect", {"reads": "GGUF header, or config.json for a directory"}))
    steps.append(Step("record", {"model_id": model_id, "ref": key, "state": "Active", "managed": not ref.is_local}))
    return ProvisionPlan(model_id, key, ref.scheme, not ref.is_local, tuple(steps))


# --------------------------------------------------------------------------- execute


@dataclass
class _Work:
    plan: ProvisionPlan
    settings: ProvisionSettings
    progress: Throttled
    node_id: Optional[str]
    started: float = field(default_factory=time.monotonic)
    path: Optional[Path] = None
    digest: Optional[str] = None
    size: Optional[int] = None
    verified: bool = False
    revision: Optional[str] = None
    format: str = "file"
    ctx_max: Optional[int] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    record: Optional[dict[str, Any]] = None

    @property
    def deadline(self) -> float:
        return self.started + self.settings.deadline_s

    def discard(self) -> None:
        """Remove what this run fetched into the cache (never a user's own file)."""
        if self.plan.managed and self.path is not None:
            remove_managed(self.path, self.settings.model_cache)


def execute(plan_: ProvisionPlan, settings: ProvisionSettings, report: Optional[Report] = None,
            node_id: Optional[str] = None) -> dict[str, Any]:
    """Run a plan's steps; returns the catalog record (not yet stored)."""
    work = _Work(plan_, settings, Throttled(report), node_id)
    for step in plan_.steps:
        handler = _HANDLERS.get(step.kind)
        if handler is None:
            raise InvalidRequest(f"plan step '{step.kind}' is unknown to this release")
        handler(work, step.detail)
    work.progress.flush()
    assert work.record is not None
    return work.record


def _stage(work: _Work, detail: dict[str, Any]) -> None:
    if "path" in detail:  # judged here too: symlinks are resolved on the node that holds the file
        check_local_file(detail["path"], work.settings)
    try:
        if "package" in detail:
            work.path = resolve_local(f"pkg:{detail['package']}/{detail['file']}")
        else:
            work.path = resolve_local_path("file:" + detail["path"])
    except ModelRefError as exc:
        raise SourceNotFound(str(exc)) from None


def _check_policy(work: _Work, detail: dict[str, Any]) -> None:
    """The URL again, on the node; each connection the fetch opens judges its addresses."""
    check_url(detail["url"], work.settings)


def _download(work: _Work, detail: dict[str, Any]) -> None:
    dest = Path(detail["to"])
    work.path, work.digest, work.size = download(
        detail["url"], dest, work.settings, expected_digest=detail.get("expected_digest"),
        report=work.progress, deadline=work.deadline,
    )
    work.verified = detail.get("expected_digest") is not None


def _hf_download(work: _Work, detail: dict[str, Any]) -> None:
    path = hf_fetch(detail, work.settings, work.progress, snapshot=False)
    work.path = path
    work.revision = commit_of(path)


def _hf_snapshot(work: _Work, detail: dict[str, Any]) -> None:
    path = hf_fetch(detail, work.settings, work.progress, snapshot=True)
    work.path = path
    work.revision = commit_of(path / "_")


def _digest(work: _Work, detail: dict[str, Any]) -> None:
    assert work.path is not None
    expected = detail.get("expected")
    if work.digest is None:
        work.digest, work.size = digest_path(work.path, work.progress, work.deadline)
    if expected is not None and work.digest != expected:
        work.discard()
        raise DigestMismatch(
            f"model '{work.plan.model_id}' ({work.plan.ref}): sha256 is {work.digest}, not the expected {expected}"
            + ("; the fetched file was removed" if work.plan.managed else "")
        )
    work.verified = expected is not None
    if expected is None:
        log.warning("model %s (%s): no digest was given; computed %s and recorded it as unverified",
                    work.plan.model_id, work.plan.ref, work.digest)


def _inspect(work: _Work, detail: dict[str, Any]) -> None:
    assert work.path is not None
    try:
        work.format, work.ctx_max, work.metadata = inspect_model(work.path)
    except GGUFError as exc:
        work.discard()
        raise BadModelFile(f"model '{work.plan.model_id}' ({work.plan.ref}): {exc}") from None


def _record(work: _Work, detail: dict[str, Any]) -> None:
    assert work.path is not None and work.digest is not None and work.size is not None
    work.record = {
        "id": detail["model_id"],
        "ref": detail["ref"],
        "source": work.plan.source,
        "local_path": str(work.path),
        "node_id": work.node_id,
        "managed": work.plan.managed,
        "digest": work.digest,
        "digest_verified": work.verified,
        "size_bytes": work.size,
        "ctx_max": work.ctx_max,
        "format": work.format,
        "metadata": work.metadata,
        "revision": work.revision,
        "state": detail.get("state", "Active"),
    }


_HANDLERS: dict[str, Callable[[_Work, dict[str, Any]], None]] = {
    "stage": _stage,
    "check_policy": _check_policy,
    "download": _download,
    "hf_download": _hf_download,
    "hf_snapshot": _hf_snapshot,
    "digest": _digest,
    "inspect": _inspect,
    "record": _record,
}
