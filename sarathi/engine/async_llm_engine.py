"""asyncio face of the engine: an engine thread runs steps back to back, each request gets a stream.

The engine thread owns the LLMEngine: requests, aborts and admin calls queued from the event
loop are applied between two steps, and each step's outputs are handed to the event loop
(call_soon_threadsafe), which delivers them to their streams (SSE formatting and writes) while
the next step computes. So nothing the event loop does sits between two steps, and the HTTP
handlers stay responsive while the model computes.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from sarathi.config import EngineConfig
from sarathi.engine.engine_client import EngineDead, EngineLimits, RequestFailed
from sarathi.engine.llm_engine import LLMEngine
from sarathi.lora.request import LoRARequest
from sarathi.outputs import RequestOutput
from sarathi.sampling_params import InvalidParam, SamplingParams

logger = logging.getLogger("sarathi")

IDLE_POLL_S = 0.002   # how often a loop with nothing runnable looks again


class AsyncLLMEngine:
    """An `EngineClient` over one in-process LLMEngine."""

    def __init__(self, config: EngineConfig):
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.model_path = str(self.engine.model_dir)
        self.limits: EngineLimits = self.engine.limits
        self.errored: Optional[BaseException] = None
        self.on_dead: List[Callable[[BaseException], None]] = []   # e.g. the server stops itself
        self._streams: Dict[str, asyncio.Queue] = {}
        self._new: List[Tuple[str, Optional[str], SamplingParams, List[int], float, Optional[LoRARequest]]] = []
        self._aborts: List[str] = []
        self._calls: List[Tuple[Callable[[], Any], asyncio.Future]] = []  # engine calls run between steps
        self._work = threading.Condition()   # guards _new, _aborts, _calls, _stopping; wakes the engine thread
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None   # the event loop that owns the streams
        self._stopping = False
        self._admitting = 0     # requests inside generate() that are not in _new yet

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    def health(self) -> Dict[str, Any]:
        return {"status": "down" if self.errored is not None else "ok"}

    def get_stats(self) -> dict:
        stats = self.engine.get_stats()
        # requests being tokenised or queued for the loop wait too (--max-queue-len counts them)
        stats["num_waiting_requests"] = stats.get("num_waiting_requests", 0) + len(self._new) + self._admitting
        return stats

    def _submit(self, queue: str, item) -> None:
        """Queue a request, abort or admin call (queue: the list's attribute name, read under the lock:
        the engine thread swaps the lists) for the engine thread (started on first use) and wake it."""
        with self._work:
            if self._thread is None:
                self._loop = asyncio.get_running_loop()
                self._thread = threading.Thread(target=self._run, name="sarathi-engine", daemon=True)
                self._thread.start()
            getattr(self, queue).append(item)
            self._work.notify()

    async def generate(self, prompt: Optional[str], sampling_params: SamplingParams, request_id: str,
                       prompt_token_ids: Optional[List[int]] = None,
                       lora_request: Optional[LoRARequest] = None) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs of one request; raises ValueError on bad input before any output."""
        if self.errored is not None or self._stopping:
            raise EngineDead("the engine is not running (it failed or is shutting down)")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        # Validate now so bad input fails here, not in the loop; tokenising runs off the event loop.
        self._admitting += 1
        try:
            ids = await asyncio.to_thread(self.engine.encode_prompt, prompt, prompt_token_ids)
            self.limits.check(sampling_params)
        finally:
            self._admitting -= 1
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._submit("_new", (request_id, prompt, sampling_params, ids, time.monotonic(), lora_request))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise InvalidParam(item.error_param, item.error) if item.error_param else RequestFailed(item.error)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away (client disconnect, cancellation)
                await self.abort(request_id)
            self._streams.pop(request_id, None)

    # ---- LoRA adapters (applied between steps) ----------------------------------
    def list_loras(self) -> List[str]:
        lora = self.engine.plugins.lora
        return [] if lora is None else lora.names()

    def optimal_sampling_models(self) -> List[str]:
        return list(self.engine.plugins.optimal_sampling.models)

    def lora_path(self, name: str) -> Optional[str]:
        lora = self.engine.plugins.lora
        return None if lora is None else lora.paths.get(name)

    async def add_lora(self, lora_request: LoRARequest) -> None:
        await self._between_steps(lambda: self._lora().add(lora_request))

    async def remove_lora(self, name: str) -> None:
        def remove():
            if self.engine.plugins.lora is None:
                raise KeyError(name)
            self.engine.plugins.lora.remove(name, self.engine.requests_using(name))
        await self._between_steps(remove)

    def _lora(self):
        if self.engine.plugins.lora is None:
            raise ValueError("LoRA adapters need an engine started with --enable-lora")
        return self.engine.plugins.lora

    async def reset_prefix_cache(self) -> int:
        """Forget every cached prefix block, between two steps; returns how many."""
        return await self._between_steps(self.engine.scheduler.reset_prefix_cache)

    async def _between_steps(self, fn: Callable[[], Any]) -> Any:
        if self.errored is not None or self._stopping:
            raise EngineDead("the engine is not running (it failed or is shutting down)")
        future = asyncio.get_running_loop().create_future()
        self._submit("_calls", (fn, future))
        return await future

    async def abort(self, request_id: str) -> None:
        """Stop a request; its KV slot is freed before the next step runs."""
        if self._thread is not None:
            self._submit("_aborts", request_id)

    def _run(self) -> None:
        """The engine thread: apply what the event loop queued, run a step, hand its outputs to the
        event loop, again; sleep when there is nothing to do."""
        try:
            self._serve()
        except Exception as e:  # noqa: BLE001 - the engine gave up (repeated step failures) or broke between steps
            self.errored = e
            self._to_loop(self._die, e)

    def _serve(self) -> None:
        while True:
            with self._work:
                while not (self._stopping or self._new or self._aborts or self._calls
                           or self.engine.has_pending_work()):
                    self._work.wait()
                if self._stopping:
                    return
                new, self._new = self._new, []
                calls, self._calls = self._calls, []
                aborts, self._aborts = self._aborts, []
            self._apply(new, calls, aborts)
            if self.engine.is_waiting():  # every request waits for its hold (a grammar compiling)
                with self._work:
                    self._work.wait(IDLE_POLL_S)
            elif self.engine.has_pending_work():
                outputs = self.engine.step()
                if outputs:
                    self._to_loop(self._deliver, outputs)

    def _to_loop(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the event loop (from the engine thread); dropped if that loop has closed."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass

    def _put(self, request_id: str, item) -> None:
        """On the event loop: an output or error to its request's stream, if that is still open."""
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(item)

    def _deliver(self, outputs: List[RequestOutput]) -> None:
        for out in outputs:
            self._put(out.request_id, out)

    def _refuse(self, refused: List[Tuple[str, ValueError]]) -> None:
        """Requests the engine refused at admission end their streams with the error."""
        for rid, error in refused:
            self._put(rid, error)

    def _die(self, error: BaseException) -> None:
        logger.error("engine loop stopped: %r", error)
        self.errored = error
        for q in self._streams.values():
            q.put_nowait(EngineDead(f"the engine failed: {type(error).__name__}; the server must restart"))
        for callback in self.on_dead:
            callback(error)

    def _apply(self, new: List, calls: List, aborts: List[str]) -> None:
        """On the engine thread, between steps. Requests first, then admin calls: an adapter unloaded
        in the same round is then in use by them and the unload is refused, rather than the
        requests failing mid-stream."""
        refused = []
        for rid, prompt, params, ids, arrival, lora in new:
            try:
                self.engine.add_request(rid, prompt, params, prompt_token_ids=ids, arrival_time=arrival,
                                        lora_request=lora)
            except ValueError as e:
                refused.append((rid, e))
        if refused:
            self._to_loop(self._refuse, refused)
        for fn, future in calls:
            try:
                result, error = fn(), None
            except Exception as e:  # noqa: BLE001 - handed to the caller
                result, error = None, e
            self._to_loop(_settle, future, result, error)
        if aborts:
            self.engine.abort_request(aborts)

    async def shutdown(self) -> None:
        """Stop the loop, end every open stream with an error, release the KV cache."""
        with self._work:
            self._stopping = True
            self._work.notify()
        if self._thread is not None:   # returns after the step in flight (the KV cache is in use until then)
            await asyncio.to_thread(self._thread.join)
        for q in self._streams.values():
            q.put_nowait(EngineDead("the server is shutting down"))
        for _, future in self._calls:
            if not future.done():
                future.set_exception(EngineDead("the server is shutting down"))
        self.engine.close()


def _settle(future: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    """On the event loop: an admin call's result to its caller (who may have gone)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
