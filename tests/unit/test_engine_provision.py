"""Engine provisioning without Ray: deterministic plans for every mode, a preflight that
names the missing program, a binary downloaded from a loopback server with its checksum
checked, and a real cmake build of a stand-in ``llama-server`` source tree."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from orch.api.catalog import EngineSpec, HandoffRecord
from orch.provision.engine_run import execute
from orch.provision.engines import EngineSettings, describe_missing, plan, preflight
from orch.provision.errors import DigestMismatch, EngineUnreachable, OutboundRefused, ToolMissing
from orch.provision.models import ProvisionSettings
from tests.loopback_servers import FileServer, sha256_digest

FAKE_BINARY = b"#!/bin/sh\necho 'llama-server version: 4242 (stand-in)'\n"
RIGHT = sha256_digest(FAKE_BINARY)
WRONG = "sha256:" + "0" * 64
CMAKE_PROJECT = """cmake_minimum_required(VERSION 3.10)
project(stand_in_llama CXX)
add_executable(llama-server server.cpp)
set_target_properties(llama-server PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
"""
SERVER_CPP = '#include <cstdio>\nint main() { std::puts("version: 1 (stand-in build)"); return 0; }\n'


def settings_for(cache: Path, allowed_hosts: tuple[str, ...] = (), local_roots: tuple[str, ...] = ()) -> EngineSettings:
    fetch_settings = ProvisionSettings(model_cache=str(cache), allowed_hosts=allowed_hosts, timeout_s=10,
                                       local_roots=local_roots)
    return EngineSettings(engine_cache=str(cache), fetch=fetch_settings, build_jobs=2, step_timeout_s=300)


@pytest.fixture()
def settings(tmp_path) -> EngineSettings:
    """Downloads from the loopback test server (named: loopback is refused by default); local
    sources under ``tmp_path``."""
    return settings_for(tmp_path / "engines", ("127.0.0.0/8",), (str(tmp_path),))


@pytest.fixture(scope="module")
def server():
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("build/bin/README.md", "stand-in release")
        info = zipfile.ZipInfo("build/bin/llama-server")
        info.external_attr = 0o755 << 16
        handle.writestr(info, FAKE_BINARY)
    files = {"/releases/llama-server": FAKE_BINARY, "/releases/llama-bin.zip": archive.getvalue()}
    running = FileServer(files=files).start()
    running.archive_digest = sha256_digest(archive.getvalue())  # type: ignore[attr-defined]
    yield running
    running.stop()


def steps_of(engine_plan) -> list[str]:
    return [step.kind for step in engine_plan.steps]


# --------------------------------------------------------------------------- plans


def test_a_source_plan_builds_llama_server_from_a_pinned_ref_and_is_deterministic(settings, capsys):
    spec = EngineSpec(mode="source", ref="b4500", cmake_flags=["-DGGML_NATIVE=OFF"])
    first, second = plan(spec, settings), plan(spec, settings)
    assert first == second
    print(json.dumps(first.to_dict(), indent=1))
    printed = json.loads(capsys.readouterr().out)
    assert printed["handoff_id"] == first.handoff_id and printed["version"] == "b4500"
    assert steps_of(first) == ["check_tools", "check_policy", "fetch_source", "configure", "build", "install",
                               "verify", "handoff"]
    assert list(first.tools) == ["git", "cmake", "c++", "build tool"]
    detail = {step.kind: step.detail for step in first.steps}
    assert detail["fetch_source"]["git"] == "https://github.com/ggml-org/llama.cpp" and detail["fetch_source"]["ref"] == "b4500"
    assert ["git", "-C", detail["fetch_source"]["into"], "checkout", "-q", "FETCH_HEAD"] in detail["fetch_source"]["run"]
    configure = detail["configure"]["run"]
    assert configure[:2] == ["cmake", "-S"] and "-DLLAMA_CURL=OFF" in configure and configure[-1] == "-DGGML_NATIVE=OFF"
    assert detail["build"]["run"][-4:] == ["--config", "Release", "-j", "2"] and "llama-server" in detail["build"]["run"]
    binary = Path(detail["install"]["binary"])
    assert binary.name == "llama-server" and Path(settings.engine_cache) in binary.parents
    assert detail["handoff"] == {"engine": "llamacpp", "mode": "source", "binary_path": str(binary),
                                 "id": first.handoff_id, "engine_version": "b4500"}
    other_ref = plan(EngineSpec(mode="source", ref="b4501"), settings)
    assert other_ref.handoff_id != first.handoff_id


def test_a_binary_plan_downloads_with_its_checksum_into_the_engine_cache(settings, capsys):
    url = "https://github.com/ggml-org/llama.cpp/releases/download/b4500/llama-b4500-bin-ubuntu-x64.zip"
    spec = EngineSpec(mode="binary", url=url, sha256=RIGHT, version="b4500")
    loopback_only = settings_for(Path(settings.engine_cache), ("127.0.0.1",))
    with pytest.raises(OutboundRefused, match="allowed_hosts"):  # refused when planned, before anything runs
        plan(spec, loopback_only)
    engine_plan = plan(spec, settings, pool_id="default")
    print(json.dumps(engine_plan.to_dict(), indent=1))
    assert json.loads(capsys.readouterr().out)["steps"][1]["detail"]["expected_digest"] == RIGHT
    assert steps_of(engine_plan) == ["check_policy", "download", "extract", "install", "verify", "handoff"]
    detail = {step.kind: step.detail for step in engine_plan.steps}
    folder = Path(settings.engine_cache) / "binary" / "llamacpp" / RIGHT[7:23]
    assert detail["download"]["to"] == str(folder / "llama-b4500-bin-ubuntu-x64.zip")
    assert detail["extract"]["member"] == "llama-server" and detail["install"]["binary"] == str(folder / "llama-server")
    assert detail["handoff"]["pool_id"] == "default" and detail["handoff"]["engine_version"] == "b4500"
    assert engine_plan.tools == ()


def test_external_package_and_container_plans(settings, monkeypatch):
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    external = plan(EngineSpec(mode="external", url="http://127.0.0.1:8081/v1/"), settings, pool_id="ext")
    assert steps_of(external) == ["probe", "handoff"] and external.steps[0].detail["url"] == "http://127.0.0.1:8081/v1/models"
    assert external.steps[-1].detail["url"] == "http://127.0.0.1:8081/v1"
    package = plan(EngineSpec(mode="package", package="llama-cpp-python==0.3.16"), settings)
    assert package.runtime_env == {"pip": ["llama-cpp-python==0.3.16"]} and package.tools == ("pip",)
    assert steps_of(package) == ["check_tools", "check_policy", "runtime_env", "verify_env", "handoff"]
    assert package.steps[1].detail == {"url": "https://pypi.org/simple/", "host": "pypi.org"}
    assert package.steps[3].detail == {"import": "llama_cpp", "runtime_env": package.runtime_env}
    container = plan(EngineSpec(mode="container", image="rayproject/ray:2.60.0-py311"), settings)
    assert container.runtime_env == {"image_uri": "rayproject/ray:2.60.0-py311"} and container.tools == ("podman",)
    assert steps_of(container)[:2] == ["check_tools", "check_policy"]
    assert container.steps[1].detail["host"] == "registry-1.docker.io"
    HandoffRecord.model_validate(dict(container.steps[-1].detail, origin="provision"))


@pytest.mark.parametrize("spec, host", [
    (EngineSpec(mode="package", package="llama-cpp-python==0.3.16"), "pypi.org"),
    (EngineSpec(mode="container", image="rayproject/ray:2.60.0-py311"), "registry-1.docker.io"),
    (EngineSpec(mode="container", image="ghcr.io/acme/engine:1.0"), "ghcr.io"),
])
def test_package_and_container_plans_obey_the_outbound_policy(settings, spec, host, monkeypatch):
    """pip and the container runtime download too: with downloads off, or the host they
    fetch from not allowed, the plan is refused before anything runs."""
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    cache = Path(settings.engine_cache)
    no_downloads = EngineSettings(engine_cache=str(cache), fetch=ProvisionSettings(
        model_cache=str(cache), allow_downloads=False, timeout_s=10))
    with pytest.raises(OutboundRefused, match="downloads are disabled"):
        plan(spec, no_downloads)
    with pytest.raises(OutboundRefused, match=f"host '{host}' is not in .*allowed_hosts"):
        plan(spec, settings_for(cache, ("127.0.0.1",)))
    allowed = plan(spec, settings_for(cache, (host,)))
    assert allowed.steps[1].detail["host"] == host


def test_specs_refuse_what_a_mode_cannot_run_without():
    with pytest.raises(ValidationError, match="needs sha256"):
        EngineSpec(mode="binary", url="http://127.0.0.1:1/llama-server")
    with pytest.raises(ValidationError, match="pinned ref"):
        EngineSpec(mode="source")
    with pytest.raises(ValidationError, match="needs url"):
        EngineSpec(mode="external")
    with pytest.raises(ValidationError, match="-DNAME=value"):
        EngineSpec(mode="source", ref="b1", cmake_flags=["--evil"])
    with pytest.raises(ValidationError):
        EngineSpec(mode="package", package="pkg; rm -rf /")


# --------------------------------------------------------------------------- preflight


def path_without(tmp_path: Path, *left_out: str) -> str:
    """A PATH holding links to this machine's build tools, minus ``left_out``."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("git", "c++", "g++", "make", "cmake", "sh"):
        found = shutil.which(name)
        if found and name not in left_out:
            (folder / name).symlink_to(found)
    return str(folder)


@pytest.mark.skipif(not all(shutil.which(t) for t in ("git", "c++", "make", "cmake")), reason="needs the build tools")
def test_preflight_names_the_missing_tool_and_how_to_get_it(tmp_path, settings):
    engine_plan = plan(EngineSpec(mode="source", ref="b4500"), settings)
    assert preflight(engine_plan) == []
    missing = preflight(engine_plan, path=path_without(tmp_path, "cmake"))
    assert [item["tool"] for item in missing] == ["cmake"]
    assert "apt-get install cmake" in missing[0]["how"] and "source provisioning" in missing[0]["needed_for"]
    with pytest.raises(ToolMissing, match="cmake is missing .*apt-get install cmake"):
        execute(engine_plan, settings, path=str(tmp_path / "bin"))
    no_compiler = preflight(engine_plan, path=str(tmp_path / "empty"))
    assert [item["tool"] for item in no_compiler] == ["git", "cmake", "c++ (c++ or g++ or clang++)",
                                                     "build tool (make or ninja)"]
    assert "g++" in describe_missing(no_compiler)


def test_preflight_of_a_container_plan_asks_for_podman(tmp_path, settings):
    engine_plan = plan(EngineSpec(mode="container", image="rayproject/ray:2.60.0-py311"), settings)
    missing = preflight(engine_plan, path=str(tmp_path))
    assert [item["tool"] for item in missing] == ["podman"] and "docker alone is not enough" in missing[0]["how"]
    with pytest.raises(ToolMissing, match="podman is missing"):  # typed, before Ray tries to start the image
        execute(engine_plan, settings, path=str(tmp_path))


# --------------------------------------------------------------------------- execution


def test_a_binary_is_downloaded_checked_and_handed_off(server, settings):
    engine_plan = plan(EngineSpec(mode="binary", url=server.url("/releases/llama-server"), sha256=RIGHT), settings,
                       model_ref="file:/models/m.gguf")
    record = execute(engine_plan, settings, node_id="ab" * 28)
    binary = Path(record["binary_path"])
    assert binary.read_bytes() == FAKE_BINARY and binary.stat().st_mode & stat.S_IXUSR
    assert record["mode"] == "binary" and record["origin"] == "provision" and record["model_ref"] == "file:/models/m.gguf"
    HandoffRecord.model_validate(record)
    again = execute(engine_plan, settings)  # a second run finds the checked file and keeps it
    assert again["binary_path"] == record["binary_path"]


def test_a_binary_with_the_wrong_checksum_is_refused_and_removed(server, settings):
    engine_plan = plan(EngineSpec(mode="binary", url=server.url("/releases/llama-server"), sha256=WRONG), settings)
    with pytest.raises(DigestMismatch, match="not the expected"):
        execute(engine_plan, settings)
    download_to = Path(engine_plan.steps[1].detail["to"])
    assert not download_to.exists() and not Path(str(download_to) + ".partial").exists()
    assert not Path(engine_plan.steps[-1].detail["binary_path"]).exists()


def test_a_binary_archive_is_unpacked_to_its_target(server, settings):
    engine_plan = plan(EngineSpec(mode="binary", url=server.url("/releases/llama-bin.zip"),
                                  sha256=server.archive_digest), settings)
    record = execute(engine_plan, settings)
    assert Path(record["binary_path"]).read_bytes() == FAKE_BINARY
    assert not (Path(record["binary_path"]).parent / "unpacked").exists()


def test_an_external_server_that_does_not_answer_is_refused(settings):
    engine_plan = plan(EngineSpec(mode="external", url="http://127.0.0.1:9/v1"), settings)
    with pytest.raises(EngineUnreachable, match="is the server running"):
        execute(engine_plan, settings)


@pytest.mark.skipif(not all(shutil.which(t) for t in ("c++", "make", "cmake")), reason="needs the build tools")
def test_a_source_build_runs_cmake_and_installs_the_target(tmp_path, settings):
    source = tmp_path / "llama-src"
    source.mkdir()
    (source / "CMakeLists.txt").write_text(CMAKE_PROJECT)
    (source / "server.cpp").write_text(SERVER_CPP)
    engine_plan = plan(EngineSpec(mode="source", source=f"file:{source}"), settings, pool_id="default")
    assert steps_of(engine_plan) == ["check_tools", "use_source", "configure", "build", "install", "verify", "handoff"]
    record = execute(engine_plan, settings)
    binary = Path(record["binary_path"])
    assert binary.is_file() and os.access(binary, os.X_OK) and record["engine_version"].startswith("local-")
    build = Path(engine_plan.steps[-3].detail["remove_build"])
    assert not build.exists()  # the build tree is removed once the binary is installed
    broken = tmp_path / "broken-src"
    broken.mkdir()
    (broken / "CMakeLists.txt").write_text(CMAKE_PROJECT)
    (broken / "server.cpp").write_text("int main( {")
    with pytest.raises(Exception, match="exited with status") as failure:
        execute(plan(EngineSpec(mode="source", source=f"file:{broken}"), settings), settings)
    assert "server.cpp" in str(failure.value)  # the compiler's own words are quoted
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    assert len(digest) == 64
