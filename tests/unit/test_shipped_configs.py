"""Every config and Serve config the project ships parses (a typo there would only show at
deploy time otherwise)."""

from __future__ import annotations

import pytest
import yaml

from orch.config import load_config, project_root

ROOT = project_root()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_orchestrator_configs_parse(path, monkeypatch):
    monkeypatch.setenv("ORCH_TOKEN", "a-token-of-sufficient-length")
    config = load_config(path)
    assert config.pools


@pytest.mark.parametrize("path", sorted((ROOT / "deployments").glob("*.yaml")), ids=lambda p: p.name)
def test_serve_configs_point_at_a_shipped_config(path):
    data = yaml.safe_load(path.read_text())
    for app in data["applications"]:
        assert app["import_path"] == "orch.serve.deployment:build"
        assert (ROOT / app["args"]["config"]).is_file()


@pytest.mark.parametrize("path", sorted((ROOT / "cluster").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_configs_keep_gpus_off_the_head(path):
    data = yaml.safe_load(path.read_text())
    commands = " ".join(data.get("head_start_ray_commands", []))
    head = data.get("available_node_types", {}).get(data.get("head_node_type", ""), {})
    assert "--num-gpus=0" in commands or head.get("resources", {}).get("GPU") == 0
