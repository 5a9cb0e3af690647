"""Engine provisioning, planned: a deterministic plan per mode and a preflight of the
programs it needs. Plain Python, no Ray; orch/provision/engine_run.py carries a plan out.

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
  from a pinned git ref (or a local source directory under ``catalog.local_roots``) into the
  engine cache.

``plan`` touches nothing, so it can be shown (``dry_run``, ``orch provision --plan``);
``preflight`` says which program is missing on the node and how to get it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from orch.api.catalog import LLAMA_CPP_GIT, EngineMode, EngineSpec
from orch.core.local_roots import OutsideLocalRoots, within_roots
from orch.core.model_ref import safe_join
from orch.core.net import is_loopback
from orch.provision.errors import InvalidRequest, LocalPathRefused
from orch.provision.policy import check_url
from orch.provision.settings import ProvisionSettings, Step

#: The module each in-process engine's package provides (verified in a ``package`` runtime_env).
ENGINE_MODULES = {"llamacpp": "llama_cpp", "vllm": "vllm"}
#: llama.cpp's cmake options for a lean server build (no curl, tests or examples).
LLAMA_CPP_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                   "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON")
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
    scheme = "http" if is_loopback(host.rsplit(":", 1)[0].strip("[]")) else "https"
    return f"{scheme}://{host}/v2/"


@dataclass
class _Draft:
    """What one mode contributes to a plan."""

    key: str
    steps: list[Step] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    handoff: dict[str, Any] = field(default_factory=dict)
    version: Optional[str] = None


def _plan_external(spec: EngineSpec, settings: EngineSettings) -> _Draft:
    assert spec.url is not None
    _check_url_form(spec.url, "url")
    base = spec.url.rstrip("/")
    draft = _Draft(_short_hash({"url": base}), handoff={"url": base, "api_key_env": spec.api_key_env})
    draft.steps.append(Step("probe", {"url": f"{base}/models", "expect": "HTTP 200 with an OpenAI model list",
                                      "timeout_s": settings.fetch.timeout_s, "api_key_env": spec.api_key_env}))
    return draft


def _plan_runtime_env(spec: EngineSpec, settings: EngineSettings, runtime_env: dict[str, Any], tool: str,
                      source: str, by: str, verify: Optional[str], key: dict[str, Any]) -> _Draft:
    """``package`` and ``container``: Ray applies the runtime_env; we check where it comes from."""
    check_url(source, settings.fetch)
    draft = _Draft(_short_hash(key), tools=[tool], runtime_env=runtime_env,
                   handoff=dict(key, runtime_env=runtime_env))
    draft.steps.append(Step("check_tools", {"tools": [tool]}))
    draft.steps.append(Step("check_policy", {"url": source, "host": urlsplit(source).hostname}))
    draft.steps.append(Step("runtime_env", {"runtime_env": runtime_env, "by": by}))
    if verify:
        draft.steps.append(Step("verify_env", {"import": verify, "runtime_env": runtime_env}))
    return draft


def _plan_binary(spec: EngineSpec, settings: EngineSettings) -> _Draft:
    assert spec.url is not None and spec.sha256 is not None
    _check_url_form(spec.url, "url")
    check_url(spec.url, settings.fetch)
    draft = _Draft(spec.sha256.split(":", 1)[1][:16])
    folder = safe_join(settings.engine_cache, "binary", spec.engine, draft.key)
    file_name = _url_file_name(spec.url)
    draft.steps.append(Step("check_policy", {"url": spec.url, "host": urlsplit(spec.url).hostname}))
    draft.steps.append(Step("download", {"url": spec.url, "to": str(folder / file_name), "expected_digest": spec.sha256,
                                         "resume": "HTTP Range from the .partial file a failed attempt left",
                                         "timeout_s": settings.fetch.timeout_s}))
    binary = folder / spec.target if _archive(file_name) else folder / file_name
    if _archive(file_name):
        draft.steps.append(Step("extract", {"archive": str(folder / file_name), "into": str(folder / "unpacked"),
                                            "member": spec.target, "to": str(binary)}))
    draft.steps.append(Step("install", {"binary": str(binary), "mode": "0755"}))
    draft.steps.append(Step("verify", {"run": [str(binary), "--version"], "timeout_s": 60}))
    draft.handoff["binary_path"] = str(binary)
    return draft


def _source_steps(spec: EngineSpec, settings: EngineSettings, source: str, work: Path) -> tuple[Path, list[Step], list[str]]:
    """Where the sources come from: a local directory (under ``catalog.local_roots``) or a git fetch."""
    if source.startswith("file:"):
        src = Path(os.path.normpath(source[len("file:"):]))
        try:
            within_roots(src, settings.fetch.roots(), "source directory")
        except OutsideLocalRoots as exc:
            raise LocalPathRefused(str(exc)) from None
        return src, [Step("check_tools", {"tools": ["cmake", "c++", "build tool"]}),
                     Step("use_source", {"path": str(src), "copy": False})], ["cmake", "c++", "build tool"]
    _check_url_form(source, "source")
    check_url(source, settings.fetch)
    src = work / "src"
    fetch = Step("fetch_source", {"git": source, "ref": spec.ref, "into": str(src), "depth": 1,
                                  "run": [["git", "init", "-q", str(src)],
                                          ["git", "-C", str(src), "fetch", "-q", "--depth", "1", source, str(spec.ref)],
                                          ["git", "-C", str(src), "checkout", "-q", "FETCH_HEAD"]]})
    return src, [Step("check_tools", {"tools": ["git", "cmake", "c++", "build tool"]}),
                 Step("check_policy", {"url": source, "host": urlsplit(source).hostname}), fetch], \
        ["git", "cmake", "c++", "build tool"]


def _plan_source(spec: EngineSpec, settings: EngineSettings) -> _Draft:
    source = spec.source or LLAMA_CPP_GIT
    flags = list(LLAMA_CPP_FLAGS if spec.engine == "llamacpp" else ("-DCMAKE_BUILD_TYPE=Release",)) + list(spec.cmake_flags)
    draft = _Draft(_short_hash({"source": source, "ref": spec.ref, "flags": flags, "target": spec.target}))
    work = safe_join(settings.engine_cache, "build", draft.key)
    build_dir = work / "build"
    src, draft.steps, draft.tools = _source_steps(spec, settings, source, work)
    draft.steps.append(Step("configure", {"run": ["cmake", "-S", str(src), "-B", str(build_dir), *flags]}))
    draft.steps.append(Step("build", {"run": ["cmake", "--build", str(build_dir), "--target", spec.target,
                                              "--config", "Release", "-j", str(settings.build_jobs)],
                                      "timeout_s": settings.step_timeout_s}))
    binary = safe_join(settings.engine_cache, "source", spec.engine, draft.key, spec.target)
    draft.steps.append(Step("install", {"from": str(build_dir), "find": spec.target, "binary": str(binary),
                                        "mode": "0755", "remove_build": str(work)}))
    draft.steps.append(Step("verify", {"run": [str(binary), "--version"], "timeout_s": 60}))
    draft.version = spec.ref if spec.ref else f"local-{draft.key[:8]}"
    draft.handoff["binary_path"] = str(binary)
    return draft


def _draft(spec: EngineSpec, settings: EngineSettings) -> _Draft:
    mode = EngineMode(spec.mode)
    if mode == EngineMode.external:
        return _plan_external(spec, settings)
    if mode == EngineMode.package:
        assert spec.package is not None
        return _plan_runtime_env(spec, settings, {"pip": [spec.package]}, "pip", _package_source(),
                                 "Ray builds a virtualenv with it on the node, cached across starts",
                                 ENGINE_MODULES.get(spec.engine), {"package": spec.package})
    if mode == EngineMode.container:
        assert spec.image is not None
        return _plan_runtime_env(spec, settings, {"image_uri": spec.image}, "podman", _registry_url(spec.image),
                                 "Ray pulls and runs the image with podman when the pool actor starts",
                                 "ray", {"image": spec.image})
    if mode == EngineMode.binary:
        return _plan_binary(spec, settings)
    return _plan_source(spec, settings)


def plan(spec: EngineSpec, settings: EngineSettings, *, handoff_id: Optional[str] = None,
         pool_id: Optional[str] = None, model_ref: Optional[str] = None) -> EnginePlan:
    """The steps that provision ``spec``, without running any; raises ProvisionError
    (OutboundRefused for a download the policy forbids) before anything runs."""
    mode = EngineMode(spec.mode).value
    draft = _draft(spec, settings)
    version = spec.version or draft.version
    handoff_id = handoff_id or f"{spec.engine}-{mode}-{draft.key[:8]}"
    handoff: dict[str, Any] = {"engine": spec.engine, "mode": mode, "pool_id": pool_id, "model_ref": model_ref}
    handoff.update(draft.handoff)
    handoff.update(id=handoff_id, engine_version=version)
    steps = draft.steps + [Step("handoff", {k: v for k, v in handoff.items() if v not in (None, {}, [])})]
    return EnginePlan(handoff_id, mode, spec.engine, version, tuple(steps), tuple(draft.tools), draft.runtime_env,
                      pool_id, model_ref)


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
