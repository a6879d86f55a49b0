"""What the completions and chat handlers share: request checks, SamplingParams,
OpenAI-shaped errors, and a generate() wrapper that aborts the engine request when
the client goes away and records metrics and one log line when it finishes."""
from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from sarathi.engine.engine_client import EngineClient, EngineDead, ReplicaFailed, RequestFailed
from sarathi.lora.request import LoRARequest
from sarathi.outputs import CompletionOutput, Logprob, RequestOutput
from sarathi.sampling_params import InvalidParam, SamplingParams, StructuredOutputsParams

from .metrics import ServerMetrics
from .protocol import PromptTokensDetails, SamplingFields, UsageInfo

logger = logging.getLogger("sarathi.entrypoints.openai")

RETRY_AFTER_S = 1
ADMISSION_TIMEOUT_S = 30.0   # a place reserved in the queue that never reached the engine lapses

# Where a request may give its structured-output constraint: field -> StructuredOutputsParams key.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# Fields of SamplingFields that are not sampling parameters (or are set by the endpoint).
_NOT_SAMPLING = {"model", "stream", "stream_options", "user", "logit_bias", "max_tokens", "logprobs",
                 "response_format", "structured_outputs", *_GUIDED}


class APIError(Exception):
    """An error answered in OpenAI's {"error": {...}} shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    @property
    def headers(self) -> Dict[str, str]:
        """A 503 tells the client when to come back."""
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def short(value: object, limit: int = 80) -> str:
    """A client-supplied value, cut so that an error message never echoes megabytes."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def check_text(text: str, param: str) -> str:
    """Text must be valid Unicode: a lone surrogate (\\ud800 in JSON) cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} contains invalid Unicode (a lone surrogate)", param=param) from None
    return text


def stop_reason(c: CompletionOutput) -> Optional[object]:
    """vLLM's extra field: the stop string or stop token id that ended the choice."""
    return c.stop_reason if isinstance(c.stop_reason, (int, str)) else None


def structured_outputs_of(req: SamplingFields) -> Optional[StructuredOutputsParams]:
    """The request's constraint, from whichever field holds it: response_format (json_object,
    json_schema), vLLM's structured_outputs, or guided_json / guided_regex / guided_choice /
    guided_grammar. Two of them is a 400 naming the second."""
    found: List[Tuple[str, Any]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise bad_request("response_format of type json_schema needs a json_schema object", param="response_format")
        found.append(("response_format", {"json": rf.json_schema.json_schema}))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", req.structured_outputs))
    found += [(name, {key: getattr(req, name)}) for name, key in _GUIDED.items() if getattr(req, name) is not None]
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(f"give one structured-output constraint; this request has {found[0][0]} and "
                          f"{found[1][0]}", param=found[1][0])
    param, value = found[0]
    try:
        return StructuredOutputsParams.from_value(value, param)
    except InvalidParam as e:
        raise bad_request(str(e), param=e.param) from None
    except TypeError:
        raise bad_request(f"{param} is not a valid constraint", param=param) from None


async def first_output(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Wait for a stream's first item, so that a failure before it (a constraint that does not
    compile) is a 400 before the response starts; then the stream as it was."""
    it = stream.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[Any]:
        if first is not None:
            yield first
        async for item in it:
            yield item
    return rest()


def usage_of(finals: Sequence[Optional[RequestOutput]]) -> UsageInfo:
    """Prompt tokens once per prompt, completion tokens over every choice."""
    prompt = sum(len(o.prompt_token_ids) for o in finals if o is not None)
    completion = sum(len(c.token_ids) for o in finals if o is not None for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in finals if o is not None)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class OpenAIServing:
    """Per-server state the endpoint handlers need (engine, names, limits, metrics)."""

    def __init__(self, engine: EngineClient, served_model_names: Sequence[str], metrics: ServerMetrics,
                 max_queue_len: Optional[int] = None, log_prompts: bool = False,
                 max_prompt_tokens: Optional[int] = None, chat_template: Optional[str] = None,
                 tool_call_parser: Optional[str] = None):
        """chat_template: overrides the model's; tool_call_parser: reads tool calls from free text
        (tool_choice "auto", --enable-auto-tool-choice)."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.served_model_names = list(served_model_names)
        self.limits = engine.limits
        self.max_model_len = int(engine.limits.max_model_len)
        self.metrics = metrics
        self.max_queue_len = max_queue_len
        self.max_prompt_tokens = max_prompt_tokens or engine.limits.max_kv_tokens
        self._admitting: Dict[int, float] = {}   # places reserved here, not yet in the engine's queue
        self._tickets = itertools.count(1)
        self.log_prompts = log_prompts
        self.chat_template = chat_template
        self.tool_call_parser = tool_call_parser
        self.vocab_size = len(self.tokenizer)
        # Longest text one token stands for: a text of more than max_model_len times this many
        # characters cannot fit the context, whatever its tokens, so it is refused untokenised.
        self.max_token_chars = max(len(t) for t in self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
                                   if isinstance(t, str))
        self._background: set = set()   # abort tasks, kept alive until they run
        self._special_ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        # byte-level BPE (GPT-2 alphabet) spells a space as "Ġ"; its tokens map back to exact bytes
        probe = self.tokenizer.convert_ids_to_tokens(self.tokenizer.encode(" a b", add_special_tokens=False))
        self._byte_level = any(isinstance(t, str) and t.startswith("Ġ") for t in probe)

    # ------------------------------------------------------------------ checks

    def loras(self) -> List[str]:
        return list(self.engine.list_loras())

    def resolve_model(self, requested: Optional[str]) -> Tuple[str, Optional[LoRARequest]]:
        """The model field -> (name to answer with, the LoRA adapter to run with or None)."""
        if requested is None or requested in self.served_model_names:
            return requested or self.served_model_names[0], None
        if requested in self.loras():
            return requested, LoRARequest(requested)
        if requested in self.engine.optimal_sampling_models():
            raise bad_request(f"`{short(requested)}` is loaded only as an optimal_sampling target; name it in "
                              f"optimal_sampling.target_model", param="model")
        # (adapters are tenants' names: an error never lists them)
        raise APIError(404, f"The model `{short(requested)}` does not exist; the base model is "
                            f"{self.served_model_names[0]!r}.", param="model", code="model_not_found")

    def model_name(self, requested: Optional[str]) -> str:
        return self.resolve_model(requested)[0]

    def check_capacity(self) -> Optional[int]:
        """Reserve a place among the waiting requests (--max-queue-len) or answer 503. Counting
        and reserving happen with no await between them, so a burst cannot all pass the count
        before any reaches the engine. Returns the reservation, handed to `generate`."""
        if self.max_queue_len is None:
            return None
        now = time.monotonic()
        for ticket, at in list(self._admitting.items()):
            if now - at > ADMISSION_TIMEOUT_S:
                del self._admitting[ticket]
        waiting = int((self.engine.get_stats() or {}).get("num_waiting_requests", 0)) + len(self._admitting)
        if waiting >= self.max_queue_len:
            raise APIError(503, f"server overloaded: {waiting} requests already waiting "
                                f"(--max-queue-len {self.max_queue_len}); retry later",
                           type="server_overloaded", code="overloaded")
        ticket = next(self._tickets)
        self._admitting[ticket] = now
        return ticket

    def check_prompt_total(self, num_tokens: int) -> None:
        """One request's prompts together (--max-prompt-tokens-per-request): a request of a hundred
        long prompts would hold the engine for minutes and cannot all fit the KV cache anyway."""
        if num_tokens > self.max_prompt_tokens:
            raise bad_request(f"the request's prompts have {num_tokens} tokens in all, more than "
                              f"--max-prompt-tokens-per-request {self.max_prompt_tokens}", param="prompt",
                              code="context_length_exceeded")

    def release(self, ticket: Optional[int]) -> None:
        """The reserved request reached the engine's own queue (or never will)."""
        self._admitting.pop(ticket, None)

    def check_prompt(self, ids: Sequence[int], max_tokens: Optional[int], param: str) -> int:
        """The engine's prompt check (EngineLimits.check_prompt) as a 400; returns max_tokens."""
        try:
            return self.limits.check_prompt(ids, max_tokens, param)
        except InvalidParam as e:
            raise bad_request(str(e), param=e.param, code=e.code) from None

    async def encode(self, text: str, param: str, add_special_tokens: bool = True) -> List[int]:
        """Tokenise on a worker thread (never on the event loop), after cheap size checks."""
        check_text(text, param)
        if len(text) > self.max_model_len * self.max_token_chars:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens; the {param} "
                              f"has {len(text)} characters, far more than that.", param=param,
                              code="context_length_exceeded")
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    def sampling_params(self, req: SamplingFields, max_tokens: Optional[int], logprobs: Optional[int],
                        prompt_logprobs: Optional[int] = None,
                        structured: Optional[StructuredOutputsParams] = None) -> SamplingParams:
        """SamplingParams from the request body, checked against this engine's limits. structured:
        the constraint tool_choice implies (the request's own constraint fields must be empty)."""
        if req.model_extra:
            logger.warning("ignoring unknown request fields: %s", sorted(req.model_extra)[:20])
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        logit_bias = None
        if req.logit_bias:
            try:
                logit_bias = {int(key): bias for key, bias in req.logit_bias.items()}
            except (ValueError, OverflowError):
                raise bad_request("logit_bias keys must be token ids", param="logit_bias") from None
        for stop in ([req.stop] if isinstance(req.stop, str) else req.stop or []):
            check_text(stop, "stop")
        own = structured_outputs_of(req)
        if own is not None and structured is not None:
            raise bad_request(f"{own.param} cannot be combined with tool_choice 'required' or a named function "
                              f"(it constrains the output already)", param=own.param)
        fields = {k: v for k, v in req.model_dump(exclude=_NOT_SAMPLING).items() if k not in req.model_extra}
        try:
            params = SamplingParams.from_request(fields, max_tokens=max_tokens, logprobs=logprobs,
                                                 prompt_logprobs=prompt_logprobs, logit_bias=logit_bias,
                                                 structured_outputs=structured or own)
            self.limits.check(params)
        except InvalidParam as e:
            raise bad_request(str(e), param=e.param) from None
        except (ValueError, TypeError) as e:
            raise bad_request(str(e)) from None
        return params

    # ------------------------------------------------------------------ generation

    async def generate(self, prompt: Optional[str], prompt_ids: List[int], params: SamplingParams,
                       request_id: str, lora_request: Optional[LoRARequest] = None,
                       ticket: Optional[int] = None) -> AsyncIterator[RequestOutput]:
        """engine.generate, plus: abort on early exit (client gone, error), metrics and a log line.
        ticket: the queue place check_capacity reserved; the engine counts the request from here."""
        finished = False
        self.release(ticket)
        try:
            kwargs = {} if lora_request is None else {"lora_request": lora_request}
            async for out in self.engine.generate(prompt, params, request_id, prompt_token_ids=prompt_ids, **kwargs):
                if out.finished:
                    finished = True
                    self._record(out)
                yield out
        except InvalidParam as e:
            finished = True
            raise bad_request(str(e), param=e.param, code=e.code) from None
        except ValueError as e:
            # the engine rejects a prompt (empty, too long) before yielding anything: nothing to abort
            finished = True
            raise bad_request(str(e), param="prompt") from None
        except RequestFailed as e:
            finished = True
            raise APIError(500, f"the engine failed this request: {e}", type="server_error") from None
        except EngineDead as e:
            finished = True
            raise APIError(503, str(e), type="server_unavailable", code="engine_dead") from None
        except ReplicaFailed as e:
            finished = True
            raise APIError(503, str(e), type="server_unavailable", code="replica_unavailable") from None
        finally:
            if not finished:
                self._abort_soon(request_id)

    def _abort_soon(self, request_id: str) -> None:
        """Abort from a fresh task: a cancelled handler cannot await anything itself."""
        logger.info("request %s: aborted before it finished (client disconnected or error)", request_id)
        self.metrics.finished.labels("abort").inc()
        try:
            result = self.engine.abort(request_id)
        except Exception:  # noqa: BLE001 - an abort must never take the server down
            logger.exception("abort of %s failed", request_id)
            return
        if inspect.isawaitable(result):
            task = asyncio.get_running_loop().create_task(result)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _record(self, out: RequestOutput) -> None:
        self.metrics.observe_finished(out)
        m = out.metrics
        ms = lambda v: f"{1e3 * v:.1f}ms" if v is not None else "-"  # noqa: E731
        line = (f"request {out.request_id}: prompt_tokens={len(out.prompt_token_ids)} "
                f"cached_tokens={out.num_cached_tokens} "
                f"output_tokens={sum(len(c.token_ids) for c in out.outputs)} "
                f"ttft={ms(m.ttft if m else None)} e2e={ms(m.e2e_latency if m else None)} "
                f"finish_reason={','.join(str(c.finish_reason) for c in out.outputs)}")
        if self.log_prompts:
            line += f" prompt={out.prompt!r}"
        logger.info(line)

    async def merge(self, streams: List[AsyncIterator[RequestOutput]]) -> AsyncIterator[Tuple[int, RequestOutput]]:
        """Interleave several prompts' output streams as (prompt index, output)."""
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    await queue.put((i, out))
                await queue.put((i, done))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    # ------------------------------------------------------------------ logprob text

    def token_text(self, token_id: int, lp: Optional[Logprob]) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id: int, text: str) -> List[int]:
        """The token's own bytes: exact for byte-level BPE, where a token may hold part of a
        multi-byte character and its decoded text would be a replacement char."""
        if self._byte_level and token_id not in self._special_ids:
            byte_decoder = _byte_decoder()
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(ch in byte_decoder for ch in piece):
                return [byte_decoder[ch] for ch in piece]
        return list(text.encode("utf-8"))


def optimal_sampling_fields(c: CompletionOutput, first: int = 0, count: Optional[int] = None) -> Dict[str, Any]:
    """The choice's `optimal_sampling` extension (α and diagnostics of tokens [first, first + count))."""
    info = c.optimal_sampling
    if info is None:
        return {}
    end = None if count is None else first + count
    return {"optimal_sampling": {"target_model": info.target_model,
                                 "alpha_history": info.alpha_history[first:end],
                                 "diagnostics": info.diagnostics[first:end]}}


@dataclass
class ChoiceCursor:
    """How much of one choice a stream has already sent."""

    text_chars: int = 0
    tokens: int = 0
    text_offset: int = 0          # completions logprobs: text_offset of the next token
    done: bool = False

    def advance(self, c: CompletionOutput) -> Optional[Tuple[str, List[int], int]]:
        """(new text, new token ids, index of the first new token), or None when nothing is new."""
        if self.done:
            return None
        delta, new_ids = c.text[self.text_chars:], c.token_ids[self.tokens:]
        if not delta and not new_ids and c.finish_reason is None:
            return None
        first = self.tokens
        self.text_chars, self.tokens, self.done = len(c.text), len(c.token_ids), c.finish_reason is not None
        return delta, new_ids, first


async def sse(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Server-sent events that always end with [DONE], after an error event if anything failed."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    except Exception:  # noqa: BLE001 - the client gets an error event, the log gets the details
        logger.exception("stream failed")
        yield f"data: {json.dumps(internal_error().body())}\n\n"
    yield "data: [DONE]\n\n"


def internal_error() -> APIError:
    """What a client sees of an unexpected failure (the details go to the log only)."""
    return APIError(500, "internal server error; the request was not completed", type="server_error")


_BYTE_DECODER: Optional[Dict[str, int]] = None


def _byte_decoder() -> Dict[str, int]:
    """GPT-2's printable-character alphabet for bytes, reversed (used by byte-level BPE)."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
            list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER
