"""Engine provisioning: a deterministic plan per mode, a preflight of the programs it needs,
and the code that carries it out. Plain Python, no Ray (``orch.provision.tasks`` runs
``execute`` as a Ray task on the target node and hands the result off to the catalog, where
the pool supervisor binds it to the pools that wait for it).

Modes (``EngineSpec.mode``, orch/api/catalog.py):

- ``external``: attach to a running OpenAI-compatible server: ``probe`` checks that
  ``<url>/models`` answers, then the URL is handed off (pools with ``engine: external``
  attach to it);
- ``package``: the engine's pip requirement goes into the pool actor's Ray ``runtime_env``
  (Ray builds and caches a virtualenv per node); ``verify_env`` imports the engine there;
- ``container``: the pool actor runs in a container image (Ray's ``image_uri``, which Ray
  starts with podman); ``verify_env`` starts a task in it;
- ``binary``: a prebuilt executable (or an archive holding it) is downloaded into the engine
  cache with its required sha256 checked before it is kept, then ``--version`` is run;
- ``source``: llama.cpp's ``llama-server`` (or another cmake ``target``) is built with cmake
  from a pinned git ref (or a local source directory) into the engine cache.

``plan`` touches nothing, so it can be shown (``dry_run``, ``orch provision --plan``);
``preflight`` says which program is missing on the node and how to get it.
"""

from __future__ import annotations

import hashlib
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

from orch.api.catalog import LLAMA_CPP_GIT, EngineMode, EngineSpec
from orch.core.model_ref import ensure_under, safe_join
from orch.provision.errors import BuildFailed, EngineUnreachable, InvalidRequest, ProvisionError, ToolMissing
from orch.provision.models import ProvisionSettings, Step, download
from orch.provision.policy import check_url, is_loopback_host

log = logging.getLogger("orch.provision")

#: The module each in-process engine's package provides (verified in a ``package`` runtime_env).
ENGINE_MODULES = {"llamacpp": "llama_cpp", "vllm": "vllm"}
#: llama.cpp's cmake options for a lean server build (no curl, tests or examples).
LLAMA_CPP_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                   "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON")
#: Lines of a failed program's output quoted in the error.
OUTPUT_TAIL_LINES = 25
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar.xz", ".tar")


@dataclass(frozen=True)
class Tool:
    """A program a plan runs: any of ``names`` on PATH will do."""

    key: str
    names: tuple[str, ...]
    how: str


TOOLS: dict[str, Tool] = {
    "cmake": Tool("cmake", ("cmake",), "apt-get install cmake (Debian/Ubuntu), dnf install cmake (Fedora/RHEL), "
                                        "brew install cmake (macOS), or pip install cmake"),
    "git": Tool("git", ("git",), "apt-get install git, dnf install git, or brew install git"),
    "c++": Tool("c++", ("c++", "g++", "clang++"), "a C++17 compiler: apt-get install g++ (or build-essential), "
                                                   "dnf install gcc-c++, or xcode-select --install (macOS)"),
    "build tool": Tool("build tool", ("make", "ninja"), "apt-get install make (or ninja-build), dnf install make, "
                                                         "or brew install ninja"),
    "podman": Tool("podman", ("podman",), "Ray starts runtime_env containers with podman (docker alone is not "
                                          "enough): apt-get install podman, dnf install podman, brew install podman"),
    "pip": Tool("pip", (), "Ray installs runtime_env packages with the node Python's pip: python -m ensurepip, "
                           "or apt-get install python3-pip"),
}


@dataclass(frozen=True)
class EngineSettings:
    """What engine provisioning needs from the catalog config, as plain values."""

    engine_cache: str
    fetch: ProvisionSettings
    #: Parallel compile jobs of a source build (part of the plan, so it is fixed here).
    build_jobs: int = 2
    #: Longest one program (clone, configure, build) may run.
    step_timeout_s: float = 3600.0

    @classmethod
    def from_config(cls, catalog: Any, base_dir: Optional[Path | str] = None,
                    build_jobs: Optional[int] = None) -> "EngineSettings":
        fetch = ProvisionSettings.from_config(catalog, base_dir)
        return cls(engine_cache=catalog.engine_cache, fetch=replace(fetch, model_cache=catalog.engine_cache),
                   build_jobs=build_jobs or max(1, min(4, os.cpu_count() or 1)),
                   step_timeout_s=catalog.provision_timeout_s)


@dataclass(frozen=True)
class EnginePlan:
    handoff_id: str
    mode: str
    engine: str
    version: Optional[str]
    steps: tuple[Step, ...]
    tools: tuple[str, ...]
    runtime_env: dict[str, Any] = field(default_factory=dict)
    pool_id: Optional[str] = None
    model_ref: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "handoff_id": self.handoff_id, "mode": self.mode, "engine": self.engine, "version": self.version,
            "steps": [{"kind": step.kind, "detail": dict(step.detail)} for step in self.steps],
            "tools": list(self.tools), "runtime_env": dict(self.runtime_env), "pool_id": self.pool_id,
            "model_ref": self.model_ref,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EnginePlan":
        return cls(data["handoff_id"], data["mode"], data["engine"], data["version"],
                   tuple(Step(s["kind"], dict(s["detail"])) for s in data["steps"]), tuple(data["tools"]),
                   dict(data["runtime_env"]), data.get("pool_id"), data.get("model_ref"))


# --------------------------------------------------------------------------- plan


def _short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _url_file_name(url: str) -> str:
    name = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name).lstrip(".-")
    return cleaned[:128] or "engine"


def _archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_url_form(url: str, what: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"{what} {url!r} must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise InvalidRequest(f"{what} must not carry credentials (they would be stored and logged); "
                             "use api_key_env for an external server's key")


def _package_source() -> str:
    """The index pip installs from (PIP_INDEX_URL, else PyPI), which the outbound policy
    judges (specs name a plain requirement, never a URL)."""
    return os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/"


def _registry_url(image: str) -> str:
    """The registry an image reference pulls from (Docker Hub when it names none)."""
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        host = first
    else:
        host = "registry-1.docker.io"
    scheme = "http" if is_loopback_host(host.rsplit(":", 1)[0].strip("[]")) else "https"
    return f"{scheme}://{host}/v2/"


def plan(spec: EngineSpec, settings: EngineSettings, *, handoff_id: Optional[str] = None,
         pool_id: Optional[str] = None, model_ref: Optional[str] = None) -> EnginePlan:
    """The steps that provision ``spec``, without running any; raises ProvisionError
    (OutboundRefused for a download the policy forbids) before anything runs."""
    mode = EngineMode(spec.mode)
    engine = spec.engine
    steps: list[Step] = []
    tools: list[str] = []
    runtime_env: dict[str, Any] = {}
    handoff: dict[str, Any] = {"engine": engine, "mode": mode.value, "pool_id": pool_id, "model_ref": model_ref}
    version = spec.version
    if mode == EngineMode.external:
        assert spec.url is not None
        _check_url_form(spec.url, "url")
        base = spec.url.rstrip("/")
        steps.append(Step("probe", {"url": f"{base}/models", "expect": "HTTP 200 with an OpenAI model list",
                                    "timeout_s": settings.fetch.timeout_s, "api_key_env": spec.api_key_env}))
        handoff.update(url=base, api_key_env=spec.api_key_env)
        key = _short_hash({"url": base})
    elif mode == EngineMode.package:
        assert spec.package is not None
        runtime_env = {"pip": [spec.package]}
        tools.append("pip")
        index = _package_source()
        check_url(index, settings.fetch)
        steps.append(Step("check_tools", {"tools": ["pip"]}))
        steps.append(Step("check_policy", {"url": index, "host": urlsplit(index).hostname}))
        steps.append(Step("runtime_env", {"runtime_env": runtime_env,
                                          "by": "Ray builds a virtualenv with it on the node, cached across starts"}))
        module = ENGINE_MODULES.get(engine)
        if module:
            steps.append(Step("verify_env", {"import": module, "runtime_env": runtime_env}))
        handoff.update(package=spec.package, runtime_env=runtime_env)
        key = _short_hash({"package": spec.package})
    elif mode == EngineMode.container:
        assert spec.image is not None
        runtime_env = {"image_uri": spec.image}
        tools.append("podman")
        registry = _registry_url(spec.image)
        check_url(registry, settings.fetch)
        steps.append(Step("check_tools", {"tools": ["podman"]}))
        steps.append(Step("check_policy", {"url": registry, "host": urlsplit(registry).hostname}))
        steps.append(Step("runtime_env", {"runtime_env": runtime_env,
                                          "by": "Ray pulls and runs the image with podman when the pool actor starts"}))
        steps.append(Step("verify_env", {"import": "ray", "runtime_env": runtime_env}))
        handoff.update(image=spec.image, runtime_env=runtime_env)
        key = _short_hash({"image": spec.image})
    elif mode == EngineMode.binary:
        assert spec.url is not None and spec.sha256 is not None
        _check_url_form(spec.url, "url")
        check_url(spec.url, settings.fetch)
        key = spec.sha256.split(":", 1)[1][:16]
        folder = safe_join(settings.engine_cache, "binary", engine, key)
        file_name = _url_file_name(spec.url)
        steps.append(Step("check_policy", {"url": spec.url, "host": urlsplit(spec.url).hostname}))
        steps.append(Step("download", {"url": spec.url, "to": str(folder / file_name), "expected_digest": spec.sha256,
                                       "resume": "HTTP Range from the .partial file a failed attempt left",
                                       "timeout_s": settings.fetch.timeout_s}))
        binary = folder / spec.target if _archive(file_name) else folder / file_name
        if _archive(file_name):
            steps.append(Step("extract", {"archive": str(folder / file_name), "into": str(folder / "unpacked"),
                                          "member": spec.target, "to": str(binary)}))
        steps.append(Step("install", {"binary": str(binary), "mode": "0755"}))
        steps.append(Step("verify", {"run": [str(binary), "--version"], "timeout_s": 60}))
        handoff.update(binary_path=str(binary))
    else:  # source
        source = spec.source or LLAMA_CPP_GIT
        flags = list(LLAMA_CPP_FLAGS if engine == "llamacpp" else ("-DCMAKE_BUILD_TYPE=Release",)) + list(spec.cmake_flags)
        key = _short_hash({"source": source, "ref": spec.ref, "flags": flags, "target": spec.target})
        work = safe_join(settings.engine_cache, "build", key)
        build_dir = work / "build"
        if source.startswith("file:"):
            src = Path(os.path.normpath(source[len("file:"):]))
            steps.append(Step("check_tools", {"tools": ["cmake", "c++", "build tool"]}))
            steps.append(Step("use_source", {"path": str(src), "copy": False}))
            tools += ["cmake", "c++", "build tool"]
        else:
            _check_url_form(source, "source")
            check_url(source, settings.fetch)
            src = work / "src"
            steps.append(Step("check_tools", {"tools": ["git", "cmake", "c++", "build tool"]}))
            steps.append(Step("check_policy", {"url": source, "host": urlsplit(source).hostname}))
            steps.append(Step("fetch_source", {"git": source, "ref": spec.ref, "into": str(src), "depth": 1,
                                               "run": [["git", "init", "-q", str(src)],
                                                       ["git", "-C", str(src), "fetch", "-q", "--depth", "1", source,
                                                        str(spec.ref)],
                                                       ["git", "-C", str(src), "checkout", "-q", "FETCH_HEAD"]]}))
            tools += ["git", "cmake", "c++", "build tool"]
        steps.append(Step("configure", {"run": ["cmake", "-S", str(src), "-B", str(build_dir), *flags]}))
        steps.append(Step("build", {"run": ["cmake", "--build", str(build_dir), "--target", spec.target,
                                            "--config", "Release", "-j", str(settings.build_jobs)],
                                    "timeout_s": settings.step_timeout_s}))
        binary = safe_join(settings.engine_cache, "source", engine, key, spec.target)
        steps.append(Step("install", {"from": str(build_dir), "find": spec.target, "binary": str(binary),
                                      "mode": "0755", "remove_build": str(work)}))
        steps.append(Step("verify", {"run": [str(binary), "--version"], "timeout_s": 60}))
        version = version or (spec.ref if spec.ref else f"local-{key[:8]}")
        handoff.update(binary_path=str(binary))
    handoff_id = handoff_id or f"{engine}-{mode.value}-{key[:8]}"
    handoff.update(id=handoff_id, engine_version=version)
    steps.append(Step("handoff", {k: v for k, v in handoff.items() if v not in (None, {}, [])}))
    return EnginePlan(handoff_id, mode.value, engine, version, tuple(steps), tuple(tools), runtime_env, pool_id,
                      model_ref)


# --------------------------------------------------------------------------- preflight


def preflight(plan_: EnginePlan, path: Optional[str] = None) -> list[dict[str, str]]:
    """The programs the plan needs that are missing on this node (``path``: the PATH to look
    in, default the process's), each with what it is for and how to get it."""
    missing = []
    for key in plan_.tools:
        tool = TOOLS[key]
        if key == "pip":
            import importlib.util

            found = importlib.util.find_spec("pip") is not None
        else:
            found = any(shutil.which(name, path=path) for name in tool.names)
        if not found:
            missing.append({"tool": tool.key if len(tool.names) < 2 else f"{tool.key} ({' or '.join(tool.names)})",
                            "needed_for": f"{plan_.mode} provisioning of {plan_.engine}", "how": tool.how})
    return missing


def describe_missing(missing: list[dict[str, str]]) -> str:
    return "; ".join(f"{item['tool']} is missing (needed for {item['needed_for']}); install it: {item['how']}"
                     for item in missing)


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
    check_url(detail["url"], work.settings.fetch)


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
