"""An external OpenAI-compatible server (vLLM's server, TGI's OpenAI route, llama-server,
Ollama...) as a pool's engine.

The pool keeps its own queue, slots, cancel and transcripts; each slot streams one
``/completions`` request upstream. Cancel closes the upstream stream. Upstream failures
map onto the stable codes: a 4xx refusal of the request is ``INVALID_PARAMS`` for that
task, an unreachable or failing server is a fatal engine error (the pool stops admitting
and its supervisor restarts it, which waits for the server to answer again). The upstream
API key comes from an environment variable (``api_key_env``) or a file (``api_key_file``,
a mounted secret) and never appears in
errors, logs, snapshots or transcripts.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, Optional

import httpx

from orch.api.errors import ErrorCode
from orch.api.events import FinishReason
from orch.engines.base import Emit, Engine, EngineError, GenerationParams, Piece, TokenLogprob

KNOWN_OPTIONS = {"base_url", "api_key_env", "api_key_file", "upstream_model", "timeout_s", "chars_per_token"}
_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")


class ExternalEngine(Engine):
    name = "external"

    def __init__(self, model: str, *, slots: int = 1, ctx: Optional[int] = None, **options: Any) -> None:
        unknown = set(options) - KNOWN_OPTIONS
        if unknown:
            raise EngineError(f"unknown external engine options: {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(KNOWN_OPTIONS))}")
        base_url = str(options.get("base_url", "")).rstrip("/")
        if not _URL.match(base_url):
            raise EngineError("external engine needs engine_options.base_url, e.g. http://127.0.0.1:8080/v1")
        self.base_url = base_url
        self.upstream_model = options.get("upstream_model") or model
        self.timeout_s = float(options.get("timeout_s", 30))
        self._ctx = int(ctx or 4096)
        self.chars_per_token = float(options.get("chars_per_token", 3.5))
        self._api_key = _read_key(options.get("api_key_env"), options.get("api_key_file"))
        self.slots = slots
        self._version = ""
        self._client: Optional[httpx.Client] = None
        self._lock = threading.Lock()

    # -- Engine interface ------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._version

    @property
    def ctx_max(self) -> int:
        return self._ctx

    def load(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout_s, read=None),
                                    limits=httpx.Limits(max_connections=self.slots + 2))
        try:
            response = self._client.get(f"{self.base_url}/models", timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise EngineError(f"external server at {self.base_url} is unreachable: {type(exc).__name__}",
                              fatal=True) from None
        if response.status_code in (401, 403):
            raise EngineError(f"external server at {self.base_url} refused our API key (HTTP {response.status_code})")
        if response.status_code != 200:
            raise EngineError(f"external server at {self.base_url} answered HTTP {response.status_code} to /models")
        server = response.headers.get("server", "openai-compatible").split("/")[0].strip() or "openai-compatible"
        models = [m.get("id") for m in response.json().get("data", []) if isinstance(m, dict)]
        if models and self.upstream_model not in models:
            raise EngineError(f"external server at {self.base_url} does not serve '{self.upstream_model}'; "
                              f"it serves: {', '.join(str(m) for m in models[:10])}")
        self._version = f"external:{server}"

    def count_tokens(self, prompt: str) -> int:
        """An estimate (the upstream tokenizer is not reachable through the OpenAI API); the
        server still enforces its real limit, and its refusal maps to INVALID_PARAMS."""
        return max(1, int(len(prompt) / self.chars_per_token) + 1)

    def generate(self, slot: int, prompt: str, params: GenerationParams, emit: Emit) -> FinishReason:
        if self._client is None:
            raise EngineError("external engine is not loaded")
        body: dict[str, Any] = {
            "model": self.upstream_model, "prompt": prompt, "max_tokens": params.max_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed % 2**31, "stream": True,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        body.update(sampling_extensions(params))
        finish = FinishReason.length
        done = False
        pieces = UpstreamPieces(prompt if params.prompt_logprobs is not None else None)
        try:
            with self._client.stream("POST", f"{self.base_url}/completions", json=body) as response:
                if response.status_code != 200:
                    raise self._refusal(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise EngineError(f"external server error: {self._scrub(_message(chunk['error']))}")
                    choice = (chunk.get("choices") or [{}])[0]
                    if not all(emit(piece) for piece in pieces.of(choice)):
                        return FinishReason.cancelled  # leaving the block closes the upstream stream
                    if choice.get("finish_reason") == "stop":
                        finish = FinishReason.stop
        except httpx.HTTPError as exc:
            raise EngineError(f"external server at {self.base_url} failed mid-stream: {type(exc).__name__}",
                              fatal=True) from None
        except ValueError:
            raise EngineError("external server sent a chunk that is not JSON") from None
        if not done:
            # Some servers answer 200 and then drop the stream when they refuse the request.
            raise EngineError("external server ended the stream early, without [DONE] "
                              "(it may have refused the request, e.g. a prompt longer than its context)")
        return finish

    def _refusal(self, response: httpx.Response) -> EngineError:
        response.read()
        try:
            body = response.json()
            message = _message(body.get("error", response.text) if isinstance(body, dict) else body)
        except ValueError:
            message = response.text
        message = self._scrub(message)
        if response.status_code in (400, 404, 413, 422):
            return EngineError(f"external server refused the request: {message}", code=ErrorCode.INVALID_PARAMS)
        if response.status_code in (401, 403):
            return EngineError(f"external server refused our API key (HTTP {response.status_code})", fatal=True)
        if response.status_code == 429:
            return EngineError(f"external server is overloaded: {message}", code=ErrorCode.POOL_UNAVAILABLE)
        return EngineError(f"external server answered HTTP {response.status_code}: {message}", fatal=True)

    def _scrub(self, text: str) -> str:
        """Upstream text reaches events, transcripts and logs: never with our key in it
        (some servers echo the Authorization header they refused)."""
        if self._api_key and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "[redacted]")
        return text[:300]  # cut only after redacting, so no part of the key survives a cut

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def sampling_extensions(params: GenerationParams) -> dict[str, Any]:
    """The sampling extensions and output shaping a request set, for the upstream body; unset
    ones are left out so an upstream without them still serves the plain request. Where vLLM's
    server and llama-server name a field differently, both names go (each server ignores the
    other's): the penalty (``repeat_penalty``), the schema (``json_schema``) and the grammar
    (vLLM's ``structured_outputs``)."""
    body: dict[str, Any] = {}
    if params.repetition_penalty is not None:
        body["repetition_penalty"] = body["repeat_penalty"] = params.repetition_penalty
    for name in ("min_p", "presence_penalty", "frequency_penalty", "typical_p"):
        if getattr(params, name) is not None:
            body[name] = getattr(params, name)
    if params.ignore_eos:
        body["ignore_eos"] = True
    if params.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
    if params.min_tokens:
        body["min_tokens"] = params.min_tokens
    if params.logprobs is not None or params.prompt_logprobs is not None:
        body["logprobs"] = max(params.logprobs or 0, params.prompt_logprobs or 0)
    if params.prompt_logprobs is not None:
        body["echo"] = True
    if params.json_schema is not None:
        schema = json.loads(params.json_schema)
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema,
                                                                          "strict": True}}
        body["json_schema"] = schema
    if params.grammar is not None:
        body["grammar"] = params.grammar
        body["structured_outputs"] = {"grammar": params.grammar}
    return body


class UpstreamPieces:
    """An upstream completion stream's choices as pieces for ``emit``: with ``echo`` (the
    prompt's logprobs asked for) the prompt's text comes back first and becomes one prompt
    piece; each chunk's token count is its number of logprobs when it has them, else one."""

    def __init__(self, echoed: Optional[str]) -> None:
        self.echo_left = len(echoed) if echoed is not None else 0
        self.echoed = echoed
        self.prompt: list[TokenLogprob] = []

    def of(self, choice: dict[str, Any]) -> list[Any]:
        text = choice.get("text") or ""
        logprobs = _logprobs(choice.get("logprobs"))
        pieces: list[Any] = []
        if self.echo_left > 0:
            head = text[:self.echo_left]
            seen = len(self.echoed or "") - self.echo_left
            if head != (self.echoed or "")[seen:seen + len(head)]:
                raise EngineError("external server did not echo the prompt, so it cannot score it "
                                  "(prompt_logprobs / echo with logprobs)", code=ErrorCode.INVALID_PARAMS)
            self.echo_left -= len(head)
            cut = _tokens_within(choice.get("logprobs"), len(head))
            self.prompt += logprobs[:cut]
            text, logprobs = text[len(head):], logprobs[cut:]
            if self.echo_left <= 0:
                pieces.append(Piece(self.echoed or "", tokens=len(self.prompt), logprobs=tuple(self.prompt),
                                    prompt=True))
        if text or logprobs:
            tokens = len(logprobs) or 1
            pieces.append(Piece(text, tokens=tokens, logprobs=tuple(logprobs)) if logprobs or tokens > 1 else text)
        return pieces


def _logprobs(block: Any) -> list[TokenLogprob]:
    """The completions shape (tokens, token_logprobs, top_logprobs) as TokenLogprobs."""
    if not isinstance(block, dict) or not block.get("tokens"):
        return []
    values = block.get("token_logprobs") or []
    tops = block.get("top_logprobs") or []
    out = []
    for index, token in enumerate(block["tokens"]):
        value = values[index] if index < len(values) else None
        top = tops[index] if index < len(tops) and isinstance(tops[index], dict) else {}
        out.append(TokenLogprob(token=str(token), logprob=value, bytes=tuple(str(token).encode("utf-8")),
                                top=tuple(sorted(top.items(), key=lambda item: -item[1]))))
    return out


def _tokens_within(block: Any, chars: int) -> int:
    """How many of a chunk's tokens lie within its first ``chars`` characters."""
    if not isinstance(block, dict) or not block.get("tokens"):
        return 0
    offsets = block.get("text_offset")
    if offsets:
        start = offsets[0]
        return sum(1 for offset in offsets if offset - start < chars)
    total, count = 0, 0
    for token in block["tokens"]:
        if total >= chars:
            break
        total += len(str(token))
        count += 1
    return count


def _read_key(env: Optional[str], path: Optional[str]) -> str:
    """The upstream API key, from an environment variable or a file (a mounted secret)."""
    if env:
        key = os.environ.get(env, "")
        if not key:
            raise EngineError(f"external engine: environment variable {env} (api_key_env) is not set")
        return key
    if path:
        try:
            key = open(path, encoding="utf-8").read().strip()
        except OSError as exc:
            raise EngineError(f"external engine: cannot read api_key_file {path}: {exc.strerror}") from None
        if not key:
            raise EngineError(f"external engine: api_key_file {path} is empty")
        return key
    return ""


def _message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)
