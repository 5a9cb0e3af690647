"""``orch up``: Ray, Serve and the orchestrator app in this process, until Ctrl-C or SIGTERM.

Ray and Serve are imported inside ``cmd_up`` only: the other commands start without them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Optional

import httpx

from orch.cli.client import CliError
from orch.config import ConfigError, load_config


def cmd_up(args: argparse.Namespace) -> int:
    """Start Ray (or join RAY_ADDRESS / --address), Serve and the orchestrator app; serve until
    Ctrl-C or SIGTERM, then remove what was started."""
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

    from orch.pools.supervisor import shutdown_pools
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
