"""Log formats: JSON lines with context fields, the console mode, and narration."""

from __future__ import annotations

import asyncio
import json
import logging

from orch.observability.logs import JsonLinesFormatter, PrettyFormatter, bind


def record(msg: str, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("orch.test", logging.INFO, __file__, 1, msg, (), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_carry_context_and_narration():
    line = json.loads(JsonLinesFormatter().format(record(
        "started", task_id="t-1", pool_id="default", engine="llamacpp", human="Started on pool default.")))
    assert line["msg"] == "started" and line["level"] == "info" and line["logger"] == "orch.test"
    assert line["task_id"] == "t-1" and line["pool_id"] == "default" and line["engine"] == "llamacpp"
    assert line["human"] == "Started on pool default." and line["ts"].endswith("Z")


def test_bound_context_reaches_lines_of_the_same_request_only():
    async def request(correlation: str) -> dict:
        bind(correlation_id=correlation, session_id=f"s-{correlation}")
        await asyncio.sleep(0)
        return json.loads(JsonLinesFormatter().format(record("x")))

    async def both():
        return await asyncio.gather(asyncio.create_task(request("a")), asyncio.create_task(request("b")))

    first, second = asyncio.run(both())
    assert (first["correlation_id"], first["session_id"]) == ("a", "s-a")
    assert (second["correlation_id"], second["session_id"]) == ("b", "s-b")


def test_console_mode_leads_with_the_sentence():
    text = PrettyFormatter().format(record("end", human="Finished on pool default: 5 token(s).", task_id="t-9"))
    assert "Finished on pool default: 5 token(s)." in text and "task_id=t-9" in text
