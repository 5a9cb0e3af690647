"""Pure logic stays free of Ray: importing it must not import ray."""

import subprocess
import sys

PURE_MODULES = [
    "orch.api",
    "orch.core.queue",
    "orch.core.admission",
    "orch.core.placement",
    "orch.core.model_ref",
    "orch.config",
    "orch.engines.llamacpp",
    "orch.core.sessions",
    "orch.core.chat",
    "orch.api.openai",
    "orch.core.supervision",
    "orch.core.capacity",
    "orch.catalog.store",
    "orch.catalog.gguf",
    "orch.provision.models",
    "orch.provision.policy",
    "orch.provision.errors",
    "orch.api.catalog",
    "orch.artifacts.store",
    "orch.artifacts.transcript",
    "orch.observability.names",
    "orch.observability.pool_metrics",
    "orch.observability.logs",
    "orch.pools.manager",
    "orch.pools.task_record",
    "orch.api.preparation",
    "orch.core.forecast",
    "orch.catalog.binding",
    "orch.catalog.handoff_files",
    "orch.provision.engines",
    "orch.engines.external",
]


def test_pure_modules_do_not_import_ray():
    code = "import sys\n" + "".join(f"import {m}\n" for m in PURE_MODULES) + "print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
