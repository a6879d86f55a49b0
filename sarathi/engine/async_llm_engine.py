"""asyncio face of the engine: a background loop runs steps, each request gets a stream.

The loop owns the LLMEngine: requests and aborts queued from the event loop are
applied between steps, and each step runs in a worker thread so the event loop
(HTTP handlers, streaming) stays responsive while the model computes. A step's outputs
are delivered while the next step computes.
"""
from __future__ import annotations

import asyncio
import logging
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
        self._wakeup: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
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

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

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
        self._new.append((request_id, prompt, sampling_params, ids, time.monotonic(), lora_request))
        self._ensure_loop()
        self._wakeup.set()
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
        self._calls.append((fn, future))
        self._ensure_loop()
        self._wakeup.set()
        return await future

    async def abort(self, request_id: str) -> None:
        """Stop a request; its KV slot is freed before the next step runs."""
        self._aborts.append(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    async def _run_loop(self) -> None:
        """Steps back to back: the next step starts as soon as one returns, and its outputs go
        to their streams (SSE formatting and writes, on this event loop) while it computes, so
        a token's delivery does not add to the time per output token. Requests, aborts and
        admin calls are applied between two steps, when none is in flight."""
        loop = asyncio.get_running_loop()
        step: Optional[asyncio.Future] = None
        try:
            while not self._stopping:
                if step is None:
                    if not self._new and not self._aborts and not self._calls and not self.engine.has_pending_work():
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    if self._stopping:
                        return
                    self._apply_pending()
                    step = loop.run_in_executor(None, self.engine.step)
                try:
                    outputs = await step
                except Exception as e:  # noqa: BLE001 - the engine gave up (repeated step failures)
                    step = None
                    self._die(e)
                    return
                step = None
                self._apply_pending()
                if not self._stopping and not self.engine.is_waiting() and self.engine.has_pending_work():
                    step = loop.run_in_executor(None, self.engine.step)
                for out in outputs:
                    q = self._streams.get(out.request_id)
                    if q is not None:
                        q.put_nowait(out)
                if step is None and self.engine.is_waiting():  # every request waits for its hold (a grammar compiling)
                    await asyncio.sleep(IDLE_POLL_S)
                await asyncio.sleep(0)
        finally:
            if step is not None:   # stopping: the step in flight uses the KV cache until it returns
                try:
                    await step
                except Exception:  # noqa: BLE001 - shutting down anyway
                    pass

    def _die(self, error: BaseException) -> None:
        logger.error("engine loop stopped: %r", error)
        self.errored = error
        for q in self._streams.values():
            q.put_nowait(EngineDead(f"the engine failed: {type(error).__name__}; the server must restart"))
        for callback in self.on_dead:
            callback(error)

    def _apply_pending(self) -> None:
        # Requests first, then admin calls: an adapter unloaded in the same round is then in
        # use by them and the unload is refused, rather than the requests failing mid-stream.
        calls, self._calls = self._calls, []
        new, self._new = self._new, []
        for rid, prompt, params, ids, arrival, lora in new:
            try:
                self.engine.add_request(rid, prompt, params, prompt_token_ids=ids, arrival_time=arrival,
                                        lora_request=lora)
            except ValueError as e:
                q = self._streams.get(rid)
                if q is not None:
                    q.put_nowait(e)
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)
        aborts, self._aborts = self._aborts, []
        if aborts:
            self.engine.abort_request(aborts)

    async def shutdown(self) -> None:
        """Stop the loop, end every open stream with an error, release the KV cache."""
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._loop_task is not None:
            await self._loop_task   # returns after the step in flight (the KV cache is in use until then)
        for q in self._streams.values():
            q.put_nowait(EngineDead("the server is shutting down"))
        for _, future in self._calls:
            if not future.done():
                future.set_exception(EngineDead("the server is shutting down"))
        self.engine.close()
