"""Checks of a request's parameters for the llama.cpp engines, and its grammar.

``json_schema`` becomes GBNF through llama-cpp-python's converter (llama.cpp's own
json-schema-to-grammar, ported); llama.cpp compiles the GBNF into a grammar sampler. A schema
or grammar it cannot take is the client's error (INVALID_PARAMS) with llama.cpp's reason,
which llama.cpp only prints to stderr: ``compile_grammar`` reads it from there.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from typing import Any, Callable, Optional

from orch.api.errors import ErrorCode
from orch.engines.base import EngineError, GenerationParams

_stderr_lock = threading.Lock()


def invalid(message: str) -> EngineError:
    return EngineError(message, code=ErrorCode.INVALID_PARAMS)


def check_logit_bias(params: GenerationParams, n_vocab: int) -> None:
    for token, _ in params.logit_bias or ():
        if not isinstance(token, int) or not 0 <= token < n_vocab:
            raise invalid(f"logit_bias: token id {token!r} is not in this model's vocabulary "
                          f"(ids 0 to {n_vocab - 1})")


def grammar_of(params: GenerationParams) -> Optional[str]:
    """The GBNF a request's output must match (its ``grammar``, or its ``json_schema``
    converted), or None; refuses what llama.cpp cannot combine with a grammar."""
    schema, grammar = params.json_schema, params.grammar
    if schema is None and grammar is None:
        return None
    field = "json_schema" if schema is not None else "grammar"
    if schema is not None and grammar is not None:
        raise invalid("json_schema and grammar: give one of them, not both")
    if params.ignore_eos or (params.min_tokens or 0) > 0:
        # Once the grammar is complete only end-of-generation is allowed; banning it leaves no token.
        raise invalid(f"{field} cannot be combined with ignore_eos or min_tokens on llama.cpp: "
                      "the output ends when the grammar is complete")
    if grammar is not None:
        if not grammar.strip():
            raise invalid("grammar is empty; give a GBNF grammar with a 'root' rule")
        return grammar
    return schema_to_gbnf(schema)


def schema_to_gbnf(schema: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        parsed = json.loads(schema)
    except ValueError as exc:
        raise invalid(f"json_schema is not valid JSON: {exc}") from exc
    if parsed is True:
        parsed = {}
    if not isinstance(parsed, dict):
        raise invalid("json_schema must be a JSON object (a JSON Schema)")
    try:
        return json_schema_to_gbnf(json.dumps(parsed))
    except RecursionError as exc:
        raise invalid("json_schema nests too deeply to become a grammar") from exc
    except Exception as exc:  # the converter reports unsupported schemas with assertions and type errors
        raise invalid(f"json_schema cannot become a llama.cpp grammar: {exc}") from exc


def compile_grammar(llama_cpp: Any, vocab: Any, gbnf: str, field: str) -> Any:
    """llama.cpp's grammar sampler for ``gbnf`` (rule ``root``), or INVALID_PARAMS with
    llama.cpp's reason; the caller owns (adds to a chain, or frees) the sampler."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
    if sampler:
        return sampler
    # llama.cpp prints the parser's reason to stderr only: compile again (refused, so nothing
    # to free) with stderr in a file for that one call.
    printed = _stderr_during(lambda: llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root"))
    lines = [line.strip() for line in printed.splitlines() if line.strip()]
    reason = next((line.split("error parsing grammar:", 1)[1].strip() for line in lines
                   if "error parsing grammar:" in line), "")
    if not reason:
        reason = next((line for line in lines if "root" in line.lower() and "grammar" in line.lower()),
                      "llama.cpp could not parse it")
    what = "the grammar made from json_schema" if field == "json_schema" else "grammar"
    raise invalid(f"{field}: llama.cpp cannot compile {what}: {reason}")


def _stderr_during(call: Callable[[], Any]) -> str:
    """What ``call`` wrote to the process's stderr (file descriptor 2, redirected process-wide
    for the length of the call: only on a refused grammar, which takes well under 1 ms)."""
    with _stderr_lock, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(captured.fileno(), 2)
            call()
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return captured.read().decode("utf-8", errors="replace")
