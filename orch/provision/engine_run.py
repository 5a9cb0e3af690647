"""Engine provisioning, carried out: each step of an ``EnginePlan`` (orch/provision/engines.py)
run on the target node. Plain Python, no Ray (``orch.provision.tasks`` runs ``execute`` as a
Ray task and hands the result off to the catalog)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from orch.core.model_ref import ensure_under
from orch.provision.engines import EnginePlan, EngineSettings, describe_missing, preflight
from orch.provision.errors import BuildFailed, EngineUnreachable, InvalidRequest, ProvisionError, ToolMissing
from orch.provision.fetch_url import download
from orch.provision.policy import check_url, checked_addresses

log = logging.getLogger("orch.provision")

#: Lines of a failed program's output quoted in the error.
OUTPUT_TAIL_LINES = 25


# --------------------------------------------------------------------------- execute

#: ``verify_env(runtime_env, module) -> version``: runs an import in a Ray runtime_env.
VerifyEnv = Callable[[dict[str, Any], str], str]


@dataclass
class _Work:
    plan: EnginePlan
    settings: EngineSettings
    path: Optional[str]
    verify_env: Optional[VerifyEnv]
    node_id: Optional[str]
    deadline: float
    version: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    record: Optional[dict[str, Any]] = None


def execute(plan_: EnginePlan, settings: EngineSettings, *, path: Optional[str] = None,
            verify_env: Optional[VerifyEnv] = None, node_id: Optional[str] = None) -> dict[str, Any]:
    """Run a plan's steps; returns the handoff record (not yet stored)."""
    work = _Work(plan_, settings, path, verify_env, node_id, time.monotonic() + settings.step_timeout_s)
    for step in plan_.steps:
        handler = _HANDLERS.get(step.kind)
        if handler is None:
            raise InvalidRequest(f"plan step '{step.kind}' is unknown to this release")
        handler(work, step.detail)
    assert work.record is not None
    return work.record


def _run(command: list[str], work: _Work, what: str, timeout_s: Optional[float] = None,
         cwd: Optional[str] = None) -> str:
    env = dict(os.environ)
    if work.path is not None:
        env["PATH"] = work.path
    remaining = max(1.0, work.deadline - time.monotonic())
    try:
        done = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=min(timeout_s or remaining, remaining), check=False)
    except FileNotFoundError:
        raise ToolMissing(f"{what}: {command[0]} is not on this node's PATH") from None
    except PermissionError:
        raise BuildFailed(f"{what}: {command[0]} is not executable") from None
    except OSError as exc:
        raise BuildFailed(f"{what}: {command[0]} cannot run here ({exc.strerror or exc})") from None
    except subprocess.TimeoutExpired:
        raise BuildFailed(f"{what}: {' '.join(command[:4])} did not finish within its time limit") from None
    output = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-OUTPUT_TAIL_LINES:])
        raise BuildFailed(f"{what}: {' '.join(command[:4])} exited with status {done.returncode}:\n{tail}")
    return output


def _probe(work: _Work, detail: dict[str, Any]) -> None:
    import httpx

    headers = {}
    if detail.get("api_key_env"):
        key = os.environ.get(detail["api_key_env"], "")
        if not key:
            raise EngineUnreachable(f"api_key_env {detail['api_key_env']} is not set on this node")
        headers["Authorization"] = f"Bearer {key}"
    try:
        response = httpx.get(detail["url"], headers=headers, timeout=detail.get("timeout_s", 30))
    except httpx.HTTPError as exc:
        raise EngineUnreachable(f"{detail['url']}: {type(exc).__name__}; is the server running?") from None
    if response.status_code != 200:
        raise EngineUnreachable(f"{detail['url']} answered HTTP {response.status_code}, not a model list")
    try:
        models = [m.get("id") for m in response.json().get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError):
        raise EngineUnreachable(f"{detail['url']} did not answer an OpenAI model list") from None
    work.notes.append(f"serves {', '.join(str(m) for m in models[:5]) or 'no model yet'}")
    server = response.headers.get("server", "").split("/")[0].strip()
    work.version = work.version or (f"external:{server}" if server else None)


def _runtime_env(work: _Work, detail: dict[str, Any]) -> None:
    """Nothing to run here: Ray applies the runtime_env when it starts the pool actor."""


def _verify_env(work: _Work, detail: dict[str, Any]) -> None:
    if work.verify_env is None:
        work.notes.append("runtime_env not verified here; Ray builds it when the pool actor starts")
        return
    try:
        work.version = work.version or work.verify_env(detail["runtime_env"], detail["import"])
    except ProvisionError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        cause = lines[-1][:500] if lines else type(exc).__name__
        raise BuildFailed(f"the runtime_env {json.dumps(detail['runtime_env'])} could not be set up or does "
                          f"not provide '{detail['import']}': {cause}") from None


def _check_policy(work: _Work, detail: dict[str, Any]) -> None:
    """The URL, then what its host resolves to on this node (a download judges each
    connection again; git, pip and podman connect by themselves)."""
    check_url(detail["url"], work.settings.fetch)
    parts = urlsplit(detail["url"])
    try:
        checked_addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80),
                          work.settings.fetch)
    except OSError:
        pass  # no answer from DNS now: the step that connects reports what the network says


def _download(work: _Work, detail: dict[str, Any]) -> None:
    download(detail["url"], Path(detail["to"]), work.settings.fetch, expected_digest=detail["expected_digest"],
             deadline=work.deadline)


def _safe_members(archive: Path, into: Path) -> list[str]:
    """Member names of an archive, refused if any would land outside ``into``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            names = handle.namelist()
    else:
        with tarfile.open(archive) as handle:
            members = handle.getmembers()
            if any(m.issym() or m.islnk() or m.isdev() for m in members):
                raise BuildFailed(f"{archive.name} holds links or devices; refusing to unpack it")
            names = [m.name for m in members]
    for name in names:
        target = os.path.normpath(into / name)
        if os.path.isabs(name) or not target.startswith(str(into) + os.sep):
            raise BuildFailed(f"{archive.name} has a member {name!r} outside its folder; refusing to unpack it")
    return names


def _extract(work: _Work, detail: dict[str, Any]) -> None:
    archive, into, to = Path(detail["archive"]), Path(detail["into"]), Path(detail["to"])
    cache = work.settings.engine_cache
    ensure_under(cache, archive.parent)
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    names = _safe_members(archive, into)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(into)
    else:
        with tarfile.open(archive) as handle:
            handle.extractall(into, filter="data")
    found = sorted((n for n in names if n.rstrip("/").rsplit("/", 1)[-1] == detail["member"]), key=len)
    if not found or not (into / found[0]).is_file():
        raise BuildFailed(f"{archive.name} holds no file named {detail['member']}")
    os.replace(into / found[0], to)
    shutil.rmtree(into, ignore_errors=True)


def _install(work: _Work, detail: dict[str, Any]) -> None:
    binary = Path(detail["binary"])
    cache = work.settings.engine_cache
    ensure_under(cache, binary.parent)  # before creating anything: no symlink may lead out
    binary.parent.mkdir(parents=True, exist_ok=True)
    ensure_under(cache, binary.parent)
    if "from" in detail:  # a build: find the target in the build tree, copy it into the cache
        build = Path(detail["from"])
        found = sorted((p for p in build.rglob(detail["find"]) if p.is_file() and os.access(p, os.X_OK)),
                       key=lambda p: (len(p.parts), str(p)))
        if not found:
            raise BuildFailed(f"the build finished but produced no executable named {detail['find']} under {build}")
        tmp = binary.with_name(f".{binary.name}.tmp")
        shutil.copy2(found[0], tmp)
        os.replace(tmp, binary)
        if detail.get("remove_build"):
            shutil.rmtree(ensure_under(cache, detail["remove_build"]), ignore_errors=True)
    if not binary.is_file():
        raise BuildFailed(f"{binary} is missing after its download")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _verify(work: _Work, detail: dict[str, Any]) -> None:
    output = _run(list(detail["run"]), work, f"checking {Path(detail['run'][0]).name}", detail.get("timeout_s", 60))
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    work.notes.append(lines[0][:200] if lines else "no version output")


def _check_tools(work: _Work, detail: dict[str, Any]) -> None:
    missing = preflight(replace(work.plan, tools=tuple(detail["tools"])), path=work.path)
    if missing:
        raise ToolMissing(describe_missing(missing))


def _use_source(work: _Work, detail: dict[str, Any]) -> None:
    if not (Path(detail["path"]) / "CMakeLists.txt").is_file():
        raise BuildFailed(f"{detail['path']} holds no CMakeLists.txt; point source at a llama.cpp checkout")


def _fetch_source(work: _Work, detail: dict[str, Any]) -> None:
    src = Path(detail["into"])
    ensure_under(work.settings.engine_cache, src.parent)
    if src.exists():
        shutil.rmtree(src)
    src.parent.mkdir(parents=True, exist_ok=True)
    for command in detail["run"]:
        _run(list(command), work, f"fetching {detail['git']} at {detail['ref']}")


def _configure(work: _Work, detail: dict[str, Any]) -> None:
    build = Path(detail["run"][detail["run"].index("-B") + 1])
    ensure_under(work.settings.engine_cache, build.parent)
    build.mkdir(parents=True, exist_ok=True)
    _run(list(detail["run"]), work, "configuring the build")


def _build(work: _Work, detail: dict[str, Any]) -> None:
    _run(list(detail["run"]), work, "building", detail.get("timeout_s"))


def _handoff(work: _Work, detail: dict[str, Any]) -> None:
    record = dict(detail)
    if work.version and not record.get("engine_version"):
        record["engine_version"] = work.version
    record.update(node_id=work.node_id, origin="provision")
    work.record = {k: v for k, v in record.items() if v is not None}
    if work.notes:
        log.info("engine %s provisioned (%s): %s", record["id"], record["mode"], "; ".join(work.notes))


_HANDLERS: dict[str, Callable[[_Work, dict[str, Any]], None]] = {
    "probe": _probe,
    "runtime_env": _runtime_env,
    "verify_env": _verify_env,
    "check_policy": _check_policy,
    "download": _download,
    "extract": _extract,
    "install": _install,
    "verify": _verify,
    "check_tools": _check_tools,
    "use_source": _use_source,
    "fetch_source": _fetch_source,
    "configure": _configure,
    "build": _build,
    "handoff": _handoff,
}
