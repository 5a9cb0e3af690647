"""``notebooks/quickstart.ipynb`` runs top to bottom in a fresh kernel, so it never rots.

The notebook starts its own Ray instance (``address="local"``) in the kernel process and
stops it in its last cell.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orch.config import project_root

pytestmark = pytest.mark.integration

NOTEBOOK = project_root() / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 180
#: The notebook is meant to take well under a minute; a busy CI machine gets some slack.
RUN_BUDGET_S = 150


@pytest.mark.timeout(RUN_BUDGET_S + 120)
def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - started

    text = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.get("outputs", []) if output.get("output_type") == "stream")
    outcomes = [line for line in text.splitlines() if line.startswith(("cancel:", "[end]", "[error]", "ready at"))]
    assert "ready at http://127.0.0.1:" in text, outcomes
    assert "[end] {'tokens_out': 48" in text, outcomes
    assert "cancel: 204 tokens sent:" in text and "[end] finish_reason=cancelled" in text, outcomes
    assert "tasks_enqueued_total{" in text and "tokens_out_total{" in text
    assert text.count("tokens/s") == 4
    assert "stopped; scratch directory removed" in text
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) == 1
    assert elapsed < RUN_BUDGET_S, f"the quickstart took {elapsed:.0f} s"
    assert list(tmp_path.iterdir()) == []  # nothing written next to the kernel
