"""``orch``: start the orchestrator, send it work and look at it from a terminal.

Every command except ``up`` talks to a running service over its HTTP API, so this module
imports Ray only inside ``up``. Failures are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_FAILED = 2
EXIT_INTERRUPTED = 130
#: Seconds between looks at a queued task's position while its stream waits to start.
QUEUE_WATCH_INTERVAL_S = 1.0
#: Tasks the queue watcher reads to find its own (the newest ones of every pool).
QUEUE_WATCH_LIMIT = 500


class CliError(Exception):
    """A failure worth one line to the user; ``main`` prints it and exits 2."""


class ApiError(CliError):
    """The orchestrator answered with an error; keeps its ``code`` for callers that branch on it."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.code, self.message = _error_of(response)
        super().__init__(f"the orchestrator answered {self.status} {self.code}: {self.message}")


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP_{response.status_code}", response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # the OpenAI-compatible envelope
        body = body["error"]
    if isinstance(body, dict) and "message" in body:
        return str(body.get("code") or f"HTTP_{response.status_code}"), str(body["message"])
    return f"HTTP_{response.status_code}", json.dumps(body)[:300]


def unreachable_message(url: str, exc: Exception) -> str:
    reason = str(exc) or type(exc).__name__
    if "refused" in reason.lower():
        reason = "connection refused"
    return f"cannot reach the orchestrator at {url}: {reason}; is it running? start it with: orch up"


class Api:
    """The orchestrator's HTTP API with the CLI's error handling: transport failures and
    error answers become one-line ``CliError``s."""

    def __init__(self, url: str, token: Optional[str], timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, *, ok: Sequence[int] = (200,), **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise CliError(f"the orchestrator at {self.url} did not answer {method} {path} in time") from None
        except httpx.TransportError as exc:
            raise CliError(unreachable_message(self.url, exc)) from None
        if response.status_code not in ok:
            raise ApiError(response)
        return response

    def get_json(self, path: str, ok: Sequence[int] = (200,)) -> Any:
        return self.request("GET", path, ok=ok).json()

    @contextmanager
    def stream_events(self, task_id: str) -> Iterator[Iterator[tuple[str, dict[str, Any]]]]:
        """A task's SSE events as (event, data) pairs; keepalives are skipped."""
        path = f"/v2/tasks/{task_id}/events"
        try:
            with self.client.stream("GET", path, timeout=httpx.Timeout(60.0, connect=5.0)) as response:
                if response.status_code != 200:
                    response.read()
                    raise ApiError(response)
                yield _sse_events(response.iter_lines())
        except httpx.TimeoutException:
            raise CliError(f"the stream of task {task_id} went quiet for 60 s; the orchestrator may be overloaded") from None
        except httpx.TransportError as exc:
            raise CliError(unreachable_message(self.url, exc)) from None


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    current: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "event" in current:
                yield current["event"], json.loads(current.get("data") or "{}")
            current = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            current[key] = value[1:] if value.startswith(" ") else value


class Progress:
    """One status line on stderr: rewritten in place on a terminal, a line per change elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.shown = ""
        self.lock = threading.Lock()

    def show(self, text: str) -> None:
        with self.lock:
            if text == self.shown:
                return
            self.shown = text
            if self.live:
                self.stream.write("\r\x1b[K" + text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        with self.lock:
            if self.live and self.shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            self.shown = ""


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


# -- commands -------------------------------------------------------------------------------


def cmd_submit(api: Api, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"prompt": args.prompt, "max_tokens": args.max_tokens, "priority": args.priority}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.pool:
        body["placement"] = {"pin_pool_id": args.pool}
    if args.model:
        body["model_ref"] = args.model
    admitted = api.request("POST", "/v2/tasks", json=body, ok=(202,)).json()
    task_id = admitted["task_id"]
    progress = Progress(sys.stderr)
    progress.show(_queued_line(admitted, admitted["queue_position"]))
    started = threading.Event()
    watcher = threading.Thread(target=_watch_queue, args=(api, admitted, started, progress), daemon=True)
    watcher.start()
    wrote_text = False
    try:
        with api.stream_events(task_id) as events:
            for event, data in events:
                if event == "started":
                    started.set()
                    progress.clear()
                elif event == "token":
                    sys.stdout.write(data.get("t", ""))
                    sys.stdout.flush()
                    wrote_text = True
                elif event == "end":
                    started.set()
                    progress.clear()
                    if wrote_text:
                        sys.stdout.write("\n")
                        sys.stdout.flush()
                    print(f"orch: task {task_id}: {data.get('tokens_out', 0)} tokens in {data.get('decode_time_ms', 0)} ms "
                          f"({data.get('finish_reason', 'done')})", file=sys.stderr)
                    return 0
                elif event == "error":
                    started.set()
                    progress.clear()
                    if wrote_text:
                        sys.stdout.write("\n")
                    raise CliError(f"task {task_id} failed: {data.get('code')}: {data.get('message')}")
        raise CliError(f"the stream of task {task_id} ended before the task did")
    except KeyboardInterrupt:
        started.set()
        progress.clear()
        _cancel_quietly(api, task_id)
        return EXIT_INTERRUPTED
    finally:
        started.set()
        watcher.join(timeout=5)


def _queued_line(admitted: dict[str, Any], position: int) -> str:
    start = admitted.get("predicted_start_ms", 0)
    eta = f", predicted start in {start / 1000:.1f} s" if start else ""
    return f"orch: task {admitted['task_id']} on pool {admitted['pool_id']}: queue position {position}{eta}"


def _watch_queue(api: Api, admitted: dict[str, Any], started: threading.Event, progress: Progress) -> None:
    """Keep the progress line's queue position current until the task starts."""
    task_id = admitted["task_id"]
    with httpx.Client(base_url=api.url, headers=api.headers, timeout=httpx.Timeout(5.0)) as client:
        deadline = time.monotonic() + 24 * 3600
        while not started.wait(QUEUE_WATCH_INTERVAL_S) and time.monotonic() < deadline:
            try:
                response = client.get("/v2/tasks", params={"limit": QUEUE_WATCH_LIMIT})
            except httpx.HTTPError:
                continue
            if response.status_code != 200:
                return  # a server without the task list: the first position stays shown
            mine = next((t for t in response.json().get("tasks", []) if t.get("task_id") == task_id), None)
            if mine is None or mine.get("state") != "queued" or started.is_set():
                continue
            progress.show(_queued_line(admitted, mine.get("queue_position") or 0))


def _cancel_quietly(api: Api, task_id: str) -> None:
    try:
        api.request("POST", f"/v2/tasks/{task_id}/cancel", ok=(204, 404), timeout=10.0)
        print(f"orch: interrupted; cancelled task {task_id}", file=sys.stderr)
    except CliError as exc:
        print(f"orch: interrupted; cancelling task {task_id} failed: {exc}", file=sys.stderr)


def cmd_cancel(api: Api, args: argparse.Namespace) -> int:
    response = api.request("POST", f"/v2/tasks/{args.task_id}/cancel", ok=(204,))
    sent = response.headers.get("x-tokens-sent", "?")
    print(f"cancelled {args.task_id} ({sent} tokens were sent)")
    return 0


def _pool_rows(api: Api) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Readiness and each pool's health; a pool whose health cannot be read keeps its readiness row."""
    readiness = api.get_json("/readyz", ok=(200, 503))
    pools = []
    for pool_id in sorted(readiness.get("pools", {})):
        row = dict(readiness["pools"][pool_id], pool_id=pool_id)
        try:
            row["health"] = api.get_json(f"/v2/pools/{pool_id}/health")
        except ApiError as exc:
            row["health"] = None
            row["last_error"] = row.get("last_error") or f"{exc.code}: {exc.message}"
        pools.append(row)
    return readiness, pools


def cmd_pools(api: Api, args: argparse.Namespace) -> int:
    _, pools = _pool_rows(api)
    rows = []
    for pool in pools:
        health = pool["health"] or {}
        metrics = health.get("metrics") or {}
        queue = f"{metrics['queue_depth']}/{metrics['queue_capacity']}" if metrics else "?"
        active = f"{metrics['active_slots']}/{metrics['slots']}" if metrics else "?"
        error = pool.get("last_error") or health.get("last_error") or ""
        rows.append([pool["pool_id"], _yes(pool.get("ready")), _yes(pool.get("draining")), health.get("model_ref", "?"),
                     queue, active, error])
    print(_table(["POOL", "READY", "DRAINING", "MODEL", "QUEUE", "ACTIVE/SLOTS", "LAST ERROR"], rows))
    return 0


def cmd_status(api: Api, args: argparse.Namespace) -> int:
    version = api.get_json("/v2/meta/version")
    readiness, pools = _pool_rows(api)
    ready_count = sum(1 for p in pools if p.get("ready") and not p.get("draining"))
    commit = version.get("build_commit")
    build = f", commit {commit[:12]}" if commit else ""
    print(f"orchestrator  {api.url}")
    print(f"version       {version.get('package_version')} (API {version.get('api_version')}{build})")
    print(f"ready         {_yes(readiness.get('ready'))} ({ready_count} of {len(pools)} pools admit work)")
    for index, pool in enumerate(pools):
        metrics = (pool["health"] or {}).get("metrics") or {}
        state = "ready" if pool.get("ready") else "not ready"
        if pool.get("draining"):
            state += ", draining"
        if metrics:
            state += f", queue {metrics['queue_depth']}/{metrics['queue_capacity']}, active {metrics['active_slots']}/{metrics['slots']}"
        if pool.get("last_error"):
            state += f", last error: {pool['last_error']}"
        print(f"{'pools' if index == 0 else '':<14}{pool['pool_id']}: {state}")
    return 0


def cmd_models(api: Api, args: argparse.Namespace) -> int:
    if args.models_command == "pull":
        return _pull_model(api, args)
    capabilities = api.get_json("/v2/meta/capabilities")
    rows = [[p["pool_id"], p["model"], p["engine"], _yes(p["ready"]), p["ctx_max"], ", ".join(p["workloads"])]
            for p in capabilities.get("pools", [])]
    print(_table(["POOL", "MODEL", "ENGINE", "READY", "CTX", "WORKLOADS"], rows))
    names = _optional_json(api, "/v1/models")
    if names is not None:
        served = ", ".join(card["id"] for card in names.get("data", [])) or "(none: no pool is Ready)"
        print(f"\nnames for 'model' in requests: {served}")
    catalog = _optional_json(api, "/v2/catalog/models")
    if catalog is None:
        print("\ncatalog: not available on this server")
    else:
        entries = catalog.get("models", [])
        print(f"\ncatalog: {len(entries)} model(s)")
        if entries:
            print(_table(["ID", "REF", "STATE", "SIZE"],
                         [[m["id"], m["ref"], m.get("state", ""), _size(m.get("size_bytes"))] for m in entries]))
    return 0


def _optional_json(api: Api, path: str) -> Optional[Any]:
    """The JSON at ``path``, or None where the server has no such route."""
    try:
        return api.get_json(path)
    except ApiError as exc:
        if exc.status in (404, 405):
            return None
        raise


def _size(size: Optional[int]) -> str:
    if size is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def _pull_model(api: Api, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"ref": args.ref}
    if args.id:
        body["id"] = args.id
    if args.digest:
        body["digest"] = args.digest
    progress = Progress(sys.stderr)
    outcome: dict[str, Any] = {}

    def pull() -> None:
        try:
            outcome["response"] = api.request("POST", "/v2/catalog/models", json=body, ok=(200, 201, 202),
                                              timeout=httpx.Timeout(None, connect=5.0))
        except Exception as exc:  # handed to the main thread, which reports it
            outcome["error"] = exc

    worker = threading.Thread(target=pull, daemon=True)
    started = time.monotonic()
    worker.start()
    while worker.is_alive():
        progress.show(f"orch: pulling {args.ref} ({time.monotonic() - started:.0f} s)")
        worker.join(timeout=1.0)
    progress.clear()
    error = outcome.get("error")
    if isinstance(error, ApiError) and error.status in (404, 405) and error.message.startswith(("no route", "method")):
        raise CliError(f"catalog support is not available on the orchestrator at {api.url}")
    if error is not None:
        raise error
    model = outcome["response"].json()
    print(f"pulled {model.get('id')} ({model.get('ref')}, {_size(model.get('size_bytes'))}, {model.get('digest', '')})")
    return 0


def cmd_provision(api: Api, args: argparse.Namespace) -> int:
    """Plan (``--plan``: steps and preflight, nothing runs) or provision an engine through
    ``POST /v2/catalog/engines``; a provisioned engine is handed off to the pools."""
    spec: dict[str, Any] = {"mode": args.mode, "engine": args.engine}
    for name, value in (("version", args.engine_version), ("url", args.engine_url), ("package", args.package),
                        ("image", args.image), ("sha256", args.sha256), ("source", args.source), ("ref", args.ref),
                        ("target", args.target)):
        if value:
            spec[name] = value
    if args.cmake_flag:
        spec["cmake_flags"] = list(args.cmake_flag)
    body: dict[str, Any] = {"spec": spec, "dry_run": bool(args.plan)}
    for name, value in (("id", args.id), ("pool_id", args.pool), ("model_ref", args.model), ("node_id", args.node)):
        if value:
            body[name] = value
    result = api.request("POST", "/v2/catalog/engines", json=body, ok=(200, 201),
                         timeout=httpx.Timeout(None, connect=5.0)).json()
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.plan:
        print(f"plan {result['handoff_id']}: {result['mode']} {result['engine']} {result.get('version') or ''}".rstrip())
        for index, step in enumerate(result["steps"], 1):
            print(f"{index:>2}. {step['kind']:<13} {json.dumps(step['detail'], sort_keys=True)}")
        for item in result.get("missing", []):
            print(f"missing: {item['tool']} (needed for {item['needed_for']}); install it: {item['how']}")
        print("preflight: ok" if result.get("preflight_ok") else "preflight: tools are missing on the node")
    else:
        where = result.get("binary_path") or result.get("url") or result.get("package") or result.get("image") or ""
        print(f"handed off {result['id']}: {result.get('mode')} {result['engine']} "
              f"{result.get('engine_version') or ''} {where}".replace("  ", " ").rstrip())
    return EXIT_FAILED if args.plan and result.get("missing") else 0


def cmd_up(args: argparse.Namespace) -> int:
    """Start Ray (or join RAY_ADDRESS / --address), Serve and the orchestrator app; serve until
    Ctrl-C or SIGTERM, then remove what was started."""
    import socket

    from orch.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    host = config.server.host
    port = args.port or config.server.port
    config = config.model_copy(update={"server": config.server.model_copy(update={"port": port})})
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another port with --port") from None

    import ray
    from ray import serve

    from orch.pools.actor import shutdown_pools
    from orch.serve.deployment import build_application

    address = args.address or os.environ.get("RAY_ADDRESS")
    url = f"http://{host}:{port}"
    deployed = False
    _stop_on_signals()
    try:
        ray.init(address=address or "local", namespace="serve", include_dashboard=args.dashboard,
                 log_to_driver=not args.quiet)
        _stop_on_signals()  # again: ray.init put in a SIGTERM handler that prints a stack trace first
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        deployed = True  # from here on, clean-up removes the app, even one only half deployed
        try:
            serve.run(build_application(config), name=args.name, route_prefix="/")
        except ConfigError as exc:
            raise CliError(str(exc)) from None
        print(f"orch: serving {url} (status page {url}/ui, metrics {url}/metrics); Ctrl-C stops it", flush=True)
        _report_readiness(url, config.server.token(), args.ready_timeout)
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        print("orch: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if ray.is_initialized():
            if deployed:
                _stop_quietly(lambda: serve.delete(args.name))
            _stop_quietly(lambda: shutdown_pools(config))
            if not address:
                _stop_quietly(serve.shutdown)
            _stop_quietly(ray.shutdown)


def _stop_on_signals() -> None:
    """SIGTERM stops the service like Ctrl-C does; Ctrl-C works even where the shell started
    this with SIGINT ignored (a background job)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop_quietly(step: Callable[[], Any]) -> None:
    try:
        step()
    except Exception as exc:  # one failed clean-up step must not skip the others
        print(f"orch: clean-up step failed: {exc}", file=sys.stderr)


def _report_readiness(url: str, token: Optional[str], timeout_s: float) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(base_url=url, headers=headers, timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get("/readyz")
                if response.status_code == 200:
                    print(f"orch: ready at {url}", flush=True)
                    return
                pools = response.json().get("pools", {})
                last = "; ".join(f"{pid}: {p.get('last_error') or 'loading'}" for pid, p in pools.items()) or last
            except (httpx.HTTPError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.5)
    print(f"orch: not ready after {timeout_s:.0f} s ({last}); still serving, see {url}/readyz", file=sys.stderr, flush=True)


# -- argument parsing -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orch", description="Run and operate the llama-orch orchestrator.")
    _connection_options(parser, argparse.ArgumentParser.add_argument, defaults=True)
    # The same options after the command name too (``orch pools --url ...``).
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, argparse.ArgumentParser.add_argument, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", parents=[common], help="start the orchestrator from a config and serve until Ctrl-C")
    up.add_argument("--config", default="configs/home.yaml", help="orchestrator config (default: configs/home.yaml)")
    up.add_argument("--port", type=int, help="HTTP port (default: the config's server.port)")
    up.add_argument("--address", help="join this Ray cluster instead of starting one (default: $RAY_ADDRESS)")
    up.add_argument("--name", default="orch", help="Serve application name (default: orch)")
    up.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with a new Ray instance")
    up.add_argument("--quiet", action="store_true", help="do not relay the replicas' and pools' logs here")
    up.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for a Ready pool before saying so")

    submit = commands.add_parser("submit", parents=[common], help="enqueue a completion and stream its tokens")
    submit.add_argument("prompt")
    submit.add_argument("--max-tokens", type=int, default=128)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--priority", choices=["interactive", "batch"], default="interactive")
    submit.add_argument("--pool", help="pin the task to this pool")
    submit.add_argument("--model", help="model ref or alias the pool must serve")

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a queued or running task")
    cancel.add_argument("task_id")

    commands.add_parser("pools", parents=[common], help="pools' readiness, queues, slots and last errors")
    commands.add_parser("status", parents=[common], help="version, readiness and a pools summary")

    models = commands.add_parser("models", parents=[common], help="models served (and the catalog, where available)")
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION")
    pull = model_commands.add_parser("pull", parents=[common], help="provision a model into the catalog")
    pull.add_argument("ref", help="model ref: hf:org/repo/file.gguf, https://..., file:/path, pkg:...")
    pull.add_argument("--id", help="catalog id (default: from the ref's name)")
    pull.add_argument("--digest", help="expected sha256:<hex>; a mismatch fails the pull")

    provision = commands.add_parser("provision", parents=[common],
                                    help="plan or provision an engine (external, package, container, binary, source)")
    provision.add_argument("--plan", action="store_true", help="show the steps and the node's preflight; run nothing")
    provision.add_argument("--mode", required=True, choices=["external", "package", "container", "binary", "source"])
    provision.add_argument("--engine", default="llamacpp", help="engine name (default: llamacpp)")
    provision.add_argument("--engine-version", help="version to record in the handoff")
    provision.add_argument("--engine-url", help="external: the server's URL; binary: the download URL")
    provision.add_argument("--sha256", help="binary: the required sha256:<hex> of the download")
    provision.add_argument("--package", help="package: the pip requirement")
    provision.add_argument("--image", help="container: the image")
    provision.add_argument("--source", help="source: a git URL (default llama.cpp's) or file:/abs/dir")
    provision.add_argument("--ref", help="source: the git tag or commit to build")
    provision.add_argument("--target", help="source/binary: the executable (default: llama-server)")
    provision.add_argument("--cmake-flag", action="append", help="source: an extra -DNAME=value (repeatable)")
    provision.add_argument("--pool", help="hand the engine to this pool")
    provision.add_argument("--model", help="the model ref the engine serves")
    provision.add_argument("--id", help="handoff id (default: from the plan)")
    provision.add_argument("--node", help="Ray node id to provision on (default: the orchestrator's)")
    provision.add_argument("--json", action="store_true", help="print the answer as JSON")
    return parser


def _connection_options(parser: argparse.ArgumentParser, add: Callable, defaults: bool) -> None:
    url_default = os.environ.get("ORCH_URL", DEFAULT_URL) if defaults else argparse.SUPPRESS
    token_default = os.environ.get("ORCH_TOKEN") if defaults else argparse.SUPPRESS
    add(parser, "--url", default=url_default, help=f"orchestrator URL (default: $ORCH_URL or {DEFAULT_URL})")
    add(parser, "--token", default=token_default, help="bearer token (default: $ORCH_TOKEN)")


COMMANDS: dict[str, Callable[[Api, argparse.Namespace], int]] = {
    "submit": cmd_submit,
    "cancel": cmd_cancel,
    "pools": cmd_pools,
    "status": cmd_status,
    "models": cmd_models,
    "provision": cmd_provision,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            return cmd_up(args)
        api = Api(args.url, args.token)
        try:
            return COMMANDS[args.command](api, args)
        finally:
            api.close()
    except CliError as exc:
        print(f"orch: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
