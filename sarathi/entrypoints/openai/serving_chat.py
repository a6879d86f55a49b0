"""POST /v1/chat/completions: messages rendered with the chat template -> chat.completion.

Tools (tool_calls.py): the tools go to the chat template; tool_choice "required" or a named
function constrains the output with a JSON schema built from the tools' parameters; "auto" reads
calls from free text with --tool-call-parser. Calls come back as `message.tool_calls` (streamed
as `delta.tool_calls` whose argument pieces concatenate to the non-streamed arguments)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Union

from sarathi.outputs import CompletionOutput, RequestOutput

from .protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatResponseMessage, ChatTokenLogprob,
                       DeltaFunctionCall, DeltaMessage, DeltaToolCall, ResponseFunctionCall, ResponseToolCall,
                       TopLogprob)
from .serving_engine import (ChoiceCursor, OpenAIServing, bad_request, check_text, first_output,
                             optimal_sampling_fields, random_id, sse, stop_reason, usage_of)
from .tool_calls import NamedCall, RequiredCalls, call_id, complete_calls, make_parser, tool_constraint


def _arguments(value: Any, k: int) -> Any:
    """A call's arguments for the template: an object (templates render it with tojson)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise bad_request(f"messages[{k}].tool_calls: arguments must be JSON text", param="messages") from None


async def render_messages(serving: OpenAIServing, messages: List[ChatMessage], add_generation_prompt: bool = True,
                          tools: Optional[List[Dict[str, Any]]] = None) -> str:
    """Messages (and tools) -> prompt text through the chat template (text parts only), off the event loop."""
    if not messages:
        raise bad_request("messages must contain at least one message", param="messages")
    plain = []
    for k, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{k}].content: only text parts are supported", param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        item: Dict[str, Any] = {"role": check_text(m.role, "messages"),
                                "content": check_text(content or "", "messages")}
        if m.name is not None:
            item["name"] = m.name
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments, k)}} for c in m.tool_calls]
        plain.append(item)
    kwargs: Dict[str, Any] = {}
    if tools:
        kwargs["tools"] = tools
    if serving.chat_template is not None:
        kwargs["chat_template"] = serving.chat_template
    try:
        return await asyncio.to_thread(serving.tokenizer.apply_chat_template, plain, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # noqa: BLE001 - template errors (bad roles, no template) are the client's to fix
        raise bad_request(f"messages could not be rendered with the chat template: {e}", param="messages") from None


@dataclass
class ToolCursor:
    """How much of one choice's tool calls a stream has sent: (id, argument characters) per call."""

    content: int = 0
    calls: List[List[Any]] = field(default_factory=list)


class OpenAIServingChat:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    def _tool_choice(self, req: ChatCompletionRequest) -> Optional[str]:
        """None (no tools), "none", "auto", "required" or the name of the function to call; checked."""
        s = self.serving
        choice = req.tool_choice
        name = choice.function.name if choice is not None and not isinstance(choice, str) else None
        if not req.tools:
            if choice not in (None, "none"):
                raise bad_request("tool_choice needs tools", param="tool_choice")
            return None
        names = [t.function.name for t in req.tools]
        if len(set(names)) != len(names):
            raise bad_request("tools has two functions of the same name", param="tools")
        if name is not None:
            if name not in names:
                raise bad_request(f"tool_choice names function {name[:80]!r}, which is not in tools",
                                  param="tool_choice")
            return name
        choice = choice or "auto"
        if choice == "auto" and s.tool_call_parser is None:
            raise bad_request('tool_choice "auto" needs a server started with --enable-auto-tool-choice and '
                              '--tool-call-parser (or use "required" or a named function)', param="tool_choice")
        return choice

    async def create(self, req: ChatCompletionRequest) -> Union[ChatCompletionResponse, AsyncIterator[str]]:
        s = self.serving
        model, lora = s.resolve_model(req.model)
        choice = self._tool_choice(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
        top = s.limits.max_logprobs
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= top:
            raise bad_request(f"top_logprobs must be between 0 and {top}, got {req.top_logprobs}", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        tools = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools or []]
        prompt = await render_messages(s, req.messages, req.add_generation_prompt, tools)
        # the template already holds the special tokens (BOS / role markers)
        ids = await s.encode(prompt, "messages", add_special_tokens=False)
        max_tokens = s.check_prompt(ids, max_tokens, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        functions = [t["function"] for t in tools]
        params = s.sampling_params(req, max_tokens, logprobs,
                                   structured=tool_constraint(functions, choice, req.parallel_tool_calls is not False))
        reader = None
        if choice == "required":
            reader = RequiredCalls()
        elif choice == "auto":
            reader = make_parser(s.tool_call_parser)
        elif choice not in (None, "none"):
            reader = NamedCall(choice)
        request_id = random_id("chatcmpl")
        stream = s.generate(prompt, ids, params, request_id, lora, s.check_capacity())
        if req.stream:
            if params.structured_outputs is not None:
                stream = await first_output(stream)   # a constraint that does not compile: a 400, not a stream
            return sse(self._stream(req, model, request_id, stream, reader, choice))
        final = None
        async for out in stream:
            final = out
        choices = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            message, finish = self._message(c, reader, choice)
            choices.append(ChatChoice(index=c.index, message=message,
                                      logprobs=self._logprobs(c.token_ids, c.logprobs, req) if req.logprobs else None,
                                      finish_reason=finish, stop_reason=stop_reason(c), **optimal_sampling_fields(c)))
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of([final]))

    @staticmethod
    def _finish(c: CompletionOutput, choice: Optional[str], has_calls: bool) -> Optional[str]:
        """OpenAI: "tool_calls" when the model chose to call ("auto", "required"); a named function
        ends with "stop"."""
        if has_calls and c.finish_reason == "stop" and choice in ("auto", "required"):
            return "tool_calls"
        return c.finish_reason

    def _message(self, c: CompletionOutput, reader, choice: Optional[str]):
        if reader is None:
            return ChatResponseMessage(content=c.text), c.finish_reason
        content, calls = reader.read(c.text, final=True)
        calls = complete_calls(calls)
        if calls is None:   # no call, or cut short (max_tokens): the text as it is
            return ChatResponseMessage(content=c.text), c.finish_reason
        tool_calls = [ResponseToolCall(id=call_id(), function=ResponseFunctionCall(name=t.name, arguments=t.arguments))
                      for t in calls]
        return ChatResponseMessage(content=content or None, tool_calls=tool_calls), self._finish(c, choice, True)

    def _logprobs(self, token_ids, steps, req: ChatCompletionRequest) -> ChatLogprobs:
        s = self.serving
        num_top = req.top_logprobs or 0
        content = []
        for tid, step in zip(token_ids, steps or []):
            chosen = step.get(tid)
            token = s.token_text(tid, chosen)
            top = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:num_top]
            content.append(ChatTokenLogprob(
                token=token, logprob=chosen.logprob if chosen else float("-inf"), bytes=s.token_bytes(tid, token),
                top_logprobs=[TopLogprob(token=s.token_text(t, lp), logprob=lp.logprob,
                                         bytes=s.token_bytes(t, s.token_text(t, lp))) for t, lp in top]))
        return ChatLogprobs(content=content)

    @staticmethod
    def _tool_deltas(c: CompletionOutput, reader, cursor: ToolCursor) -> DeltaMessage:
        """What is new in a choice read as tool calls: content, new calls (id and name), argument pieces."""
        content, calls = reader.read(c.text, final=c.finish_reason is not None)
        if c.finish_reason is not None and complete_calls(calls) is None and not cursor.calls:
            content = c.text   # no call after all: the text is the content
        delta = DeltaMessage(content=content[cursor.content:] or None)
        cursor.content = max(cursor.content, len(content))
        deltas = []
        for k, call in enumerate(calls):
            if k == len(cursor.calls):
                cursor.calls.append([call_id(), 0])
                deltas.append(DeltaToolCall(index=k, id=cursor.calls[k][0], type="function",
                                            function=DeltaFunctionCall(name=call.name, arguments="")))
            piece = call.arguments[cursor.calls[k][1]:]
            if piece:
                cursor.calls[k][1] = len(call.arguments)
                deltas.append(DeltaToolCall(index=k, function=DeltaFunctionCall(arguments=piece)))
        delta.tool_calls = deltas or None
        return delta

    async def _stream(self, req: ChatCompletionRequest, model: str, request_id: str,
                      stream: AsyncIterator[RequestOutput], reader, choice: Optional[str]) -> AsyncIterator[str]:
        created = int(time.time())
        cursors: Dict[int, ChoiceCursor] = {}
        tool_cursors: Dict[int, ToolCursor] = {}
        final: Optional[RequestOutput] = None

        def chunk(choice: ChatChunkChoice) -> str:
            body = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])
            return f"data: {body.model_dump_json(exclude={'usage'}, exclude_none=False)}\n\n"

        async for out in stream:
            if out.finished:
                final = out
            for c in out.outputs:
                cursor = cursors.get(c.index)
                if cursor is None:
                    cursor = cursors[c.index] = ChoiceCursor()
                    tool_cursors[c.index] = ToolCursor()
                    yield chunk(ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content="")))
                new = cursor.advance(c)
                if new is None:
                    continue
                delta, new_ids, first = new
                lp = self._logprobs(new_ids, (c.logprobs or [])[first:], req) if req.logprobs else None
                finish = c.finish_reason
                if reader is None:
                    message = DeltaMessage(content=delta)
                else:
                    tc = tool_cursors[c.index]
                    message = self._tool_deltas(c, reader, tc)
                    if finish is not None:
                        finish = self._finish(c, choice, bool(tc.calls))
                    if message.content is None and message.tool_calls is None and finish is None and lp is None:
                        continue
                yield chunk(ChatChunkChoice(index=c.index, delta=message, logprobs=lp, finish_reason=finish,
                                            stop_reason=stop_reason(c),
                                            **optimal_sampling_fields(c, first, len(new_ids))))
        if req.stream_options is not None and req.stream_options.include_usage:
            body = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                       usage=usage_of([final]))
            yield f"data: {body.model_dump_json()}\n\n"
