"""The commands that talk to a running orchestrator (everything except ``up``)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any, Optional, Sequence

import httpx

from orch.cli.client import EXIT_FAILED, EXIT_INTERRUPTED, Api, ApiError, CliError, Progress

#: Seconds between looks at a queued task's position while its stream waits to start.
QUEUE_WATCH_INTERVAL_S = 1.0
#: Tasks the queue watcher reads to find its own (the newest ones of every pool).
QUEUE_WATCH_LIMIT = 500


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


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
    if args.models_command in ("load", "unload", "pin", "unpin"):
        model = api.request("POST", f"/v2/models/{args.model_id}/{args.models_command}", ok=(200, 202)).json()
        print(f"{model['id']}: {model['state']}{', pinned' if model['pinned'] else ''}")
        return 0
    capabilities = api.get_json("/v2/meta/capabilities")
    rows = [[p["pool_id"], p["model"], p["engine"], _yes(p["ready"]), p["ctx_max"], ", ".join(p["workloads"])]
            for p in capabilities.get("pools", [])]
    print(_table(["POOL", "MODEL", "ENGINE", "READY", "CTX", "WORKLOADS"], rows))
    if capabilities.get("models"):
        print("\nmodel set (loaded on demand):")
        print(_table(["MODEL", "STATE", "PINNED", "NODE", "GPUS", "SIZE", "IDLE S"], [
            [m["id"], m["state"], _yes(m["pinned"]), (m.get("node_id") or "")[:12], m.get("gpus") or "",
             _size(m.get("size_bytes")), f"{time.time() - m['last_used']:.0f}" if m.get("last_used") else ""]
            for m in capabilities["models"]]))
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
