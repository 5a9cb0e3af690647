"""``orch``: start the orchestrator, send it work and look at it from a terminal.

Every command except ``up`` talks to a running service over its HTTP API, so the package
imports Ray only inside ``up``. Failures are one line on stderr and exit status 2.
"""

from orch.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
