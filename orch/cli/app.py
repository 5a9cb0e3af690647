"""The ``orch`` command line: arguments, and which command runs."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from orch.cli.client import EXIT_FAILED, EXIT_INTERRUPTED, Api, CliError
from orch.cli.commands import cmd_cancel, cmd_models, cmd_pools, cmd_provision, cmd_status, cmd_submit
from orch.cli.up import cmd_up

DEFAULT_URL = "http://127.0.0.1:8000"


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
    for action, text in (("load", "load a model of the model set now"), ("unload", "unload a model of the model set"),
                         ("pin", "pin a model: never evicted"), ("unpin", "unpin a model")):
        model_commands.add_parser(action, parents=[common], help=text).add_argument("model_id")

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
