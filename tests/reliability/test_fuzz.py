"""Schemathesis against the service's own ``/openapi.json``, served on 127.0.0.1 by a real
deployment with mock pools, across every documented route, with schema-conforming and
schema-violating requests.

Checked for every answer: no 5xx except the contract's typed 503s (POOL_UNAVAILABLE: no
pool serves what was asked; POOL_UNREADY: the pools that would are draining or loading),
and every error body carries the stable ``code`` (``code`` at the top level on the v2 and
operations routes, OpenAI's ``{"error": {"code": ...}}`` on ``/v1``). Afterwards the
service is healthy: ``/healthz`` answers and a real task runs to its end.

Two routes run only in a form that touches nothing outside the service: engine
provisioning as its plan (``dry_run``), and handoffs without a runtime_env or a pool, since
for real they would install whatever package or image the generator made up.

The default run sends ``ORCH_FUZZ_EXAMPLES`` (1000) requests; the full run is
``ORCH_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q -s tests/reliability/test_fuzz.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, seed, settings

from orch.api.errors import ErrorCode
from tests.reliability.support import TaskLedger, follow, mock_pool, pool_snapshot, rooted, wait_for

pytestmark = pytest.mark.integration

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

#: Generated requests in this run (at least; small routes run out of distinct cases sooner).
FUZZ_EXAMPLES = int(os.environ.get("ORCH_FUZZ_EXAMPLES", "1000"))
#: Wall-clock budget of the generation loop: the run stops early rather than overrun CI.
FUZZ_BUDGET_S = float(os.environ.get("ORCH_FUZZ_BUDGET_S", "1500"))
#: 503 answers the contract gives when no pool can take the work (a typed, documented state).
STATE_503 = {ErrorCode.POOL_UNAVAILABLE.value, ErrorCode.POOL_UNREADY.value}
CODES = {code.value for code in ErrorCode}
#: Share of cases whose ids are swapped for ids the service knows, to reach past the 404s.
KNOWN_ID_SHARE = 0.3


@pytest.fixture(scope="module")
def service(deploy, tmp_path_factory):
    config = rooted({
        "version": 1,
        "pools": [
            dict(mock_pool("fuzz", slots=4, capacity=64, tokens_per_s=0, embedding_dim=8),
                 max_tokens_out=64, model_aliases=["fuzz-model"], ctx=4096),
            dict(mock_pool("victim", slots=1, capacity=8, tokens_per_s=0), max_tokens_out=16),
        ],
    }, tmp_path_factory.mktemp("fuzz"))
    client = deploy(config, name="orch-rel-fuzz", route_prefix="/rfuzz")
    return client, "orch-rel-fuzz"


def error_code(path: str, body: Any) -> Any:
    if path.startswith("/v1/"):
        return body.get("error", {}).get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    return body.get("code") if isinstance(body, dict) else None


class Fuzzer:
    def __init__(self, base_url: str, known: dict[str, list[str]], rng: random.Random) -> None:
        self.base_url = base_url
        self.known = known
        self.rng = rng
        self.session = requests.Session()
        self.sent = 0
        self.statuses: Counter = Counter()
        self.per_route: Counter = Counter()
        self.defects: list[str] = []
        self.state_503: Counter = Counter()
        self.sample_503: dict[tuple[str, str], str] = {}

    def swap_known_ids(self, case) -> None:
        """Now and then aim at things that exist: the victim pool, a real task, a served model."""
        if self.rng.random() >= KNOWN_ID_SHARE:
            return
        params = case.path_parameters or {}
        for name in params:
            choices = self.known.get(name)
            if choices:
                params[name] = self.rng.choice(choices)
        if isinstance(case.body, dict) and case.operation.path.startswith("/v1/") and "model" in case.body:
            case.body["model"] = "fuzz-model"

    @staticmethod
    def make_inert(case) -> None:
        """Provisioning plans only, and handoffs no pool binds to (see the module docstring)."""
        route = (case.operation.method.upper(), case.operation.path)
        if not isinstance(case.body, dict):
            return
        if route == ("POST", "/v2/catalog/engines"):
            case.body["dry_run"] = True
        elif route == ("POST", "/v2/catalog/handoffs"):
            case.body["runtime_env"] = {}
            case.body["pool_id"] = None

    def send(self, case) -> None:
        self.swap_known_ids(case)
        self.make_inert(case)
        route = f"{case.operation.method.upper()} {case.operation.path}"
        try:
            response = case.call(base_url=self.base_url, session=self.session, timeout=30)
        except requests.RequestException as exc:
            self.defects.append(f"{route}: transport error {type(exc).__name__}: {exc}")
            return
        self.sent += 1
        self.per_route[route] += 1
        self.statuses[response.status_code] += 1
        status = response.status_code
        if status < 400:
            return
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        code = error_code(case.operation.path, body)
        request_path = response.request.path_url
        if status == 503 and case.operation.path == "/readyz":
            return  # documented: the Readiness body, not an error envelope
        if status >= 500 and not (status == 503 and code in STATE_503):
            self.defects.append(f"{route} -> {status} {response.content[:300]!r}\n  {case.as_curl_command()}")
            return
        if status == 503:
            self.state_503[(route, code)] += 1
            self.sample_503.setdefault((route, code), (body.get("message") or "")[:200])
        if not code or (not case.operation.path.startswith("/v1/") and code not in CODES):
            self.defects.append(f"{route} -> {status} without a stable code: {response.content[:300]!r}\n"
                                f"  {request_path}")


def run_operation(fuzzer: Fuzzer, operation, mode: GenerationMode, examples: int, run_seed: int, deadline: float) -> None:
    strategy = operation.as_strategy(generation_mode=mode)

    @seed(run_seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def generated(case) -> None:
        if time.monotonic() < deadline:
            fuzzer.send(case)

    generated()


def test_every_route_survives_generated_requests(service):
    client, namespace = service
    ledger = TaskLedger()
    real = ledger.accept(client.post("/v2/tasks", json={"prompt": "seed task", "max_tokens": 4}))
    follow(client, ledger, real)
    known = {"pool_id": ["victim"], "task_id": [real], "model": ["fuzz-model"]}
    base_url = str(client.base_url).rstrip("/")
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {(op.method.upper(), op.path) for op in operations}
    assert len(operations) >= 25, documented

    fuzzer = Fuzzer(base_url, known, random.Random(8))
    began = time.monotonic()
    deadline = began + FUZZ_BUDGET_S
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    for pass_index in range(20):
        missing = FUZZ_EXAMPLES - fuzzer.sent
        if missing <= 0 or time.monotonic() >= deadline:
            break
        quota = max(1, math.ceil(missing / (len(operations) * len(modes))))
        for operation in operations:
            for mode in modes:
                try:
                    run_operation(fuzzer, operation, mode, quota, 1000 * pass_index + hash(mode.value) % 997, deadline)
                except Exception as exc:  # a route whose schema cannot produce a case in this mode
                    if "Unsatisfiable" not in type(exc).__name__:
                        raise
    elapsed = time.monotonic() - began
    fivexx = sum(n for status, n in fuzzer.statuses.items() if status >= 500)
    print(f"fuzz: {fuzzer.sent} requests over {len(fuzzer.per_route)}/{len(documented)} routes in {elapsed:.0f} s; "
          f"statuses {dict(sorted(fuzzer.statuses.items()))}; 5xx {fivexx} of which typed 503 "
          f"{dict(fuzzer.state_503)}; defects {len(fuzzer.defects)}; 503 messages {fuzzer.sample_503}")
    assert not fuzzer.defects, "\n".join(fuzzer.defects[:15])
    assert fuzzer.sent >= min(FUZZ_EXAMPLES, 100)
    assert {route for route in fuzzer.per_route} == {f"{m} {p}" for m, p in documented}

    # Still healthy: liveness, and a real task from admission to its end.
    assert client.get("/healthz").status_code == 200
    wait_for(lambda: pool_snapshot("fuzz", namespace)["ready"], 10)
    after = ledger.accept(client.post("/v2/tasks", json={"prompt": "after the fuzz", "max_tokens": 6,
                                                         "placement": {"pin_pool_id": "fuzz"}}))
    assert after
    follow(client, ledger, after)
    books = ledger.assert_all_accounted()
    assert books["completed"] == 2
