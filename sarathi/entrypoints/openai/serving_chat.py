"""POST /v1/chat/completions: messages rendered with the model's chat template -> chat.completion."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Dict, List, Optional, Union

from sarathi.outputs import RequestOutput

from .protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatResponseMessage, ChatTokenLogprob,
                       DeltaMessage, TopLogprob)
from .serving_engine import (ChoiceCursor, OpenAIServing, bad_request, check_text, optimal_sampling_fields,
                             random_id, sse, stop_reason, usage_of)


async def render_messages(serving: OpenAIServing, messages: List[ChatMessage],
                          add_generation_prompt: bool = True) -> str:
    """Messages -> prompt text through the tokenizer's chat template (text parts only), off the event loop."""
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
        plain.append({"role": check_text(m.role, "messages"), "content": check_text(content or "", "messages")})
    try:
        return await asyncio.to_thread(serving.tokenizer.apply_chat_template, plain, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - template errors (bad roles, no template) are the client's to fix
        raise bad_request(f"messages could not be rendered with the chat template: {e}", param="messages") from None


class OpenAIServingChat:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def create(self, req: ChatCompletionRequest) -> Union[ChatCompletionResponse, AsyncIterator[str]]:
        s = self.serving
        model, lora = s.resolve_model(req.model)
        if req.tools:
            raise bad_request("tools are not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("only response_format type 'text' is supported", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
        top = s.limits.max_logprobs
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= top:
            raise bad_request(f"top_logprobs must be between 0 and {top}, got {req.top_logprobs}", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        prompt = await render_messages(s, req.messages, req.add_generation_prompt)
        # the template already holds the special tokens (BOS / role markers)
        ids = await s.encode(prompt, "messages", add_special_tokens=False)
        max_tokens = s.check_prompt(ids, max_tokens, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = s.sampling_params(req, max_tokens, logprobs)
        request_id = random_id("chatcmpl")
        stream = s.generate(prompt, ids, params, request_id, lora, s.check_capacity())
        if req.stream:
            return sse(self._stream(req, model, request_id, stream))
        final = None
        async for out in stream:
            final = out
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=self._logprobs(c.token_ids, c.logprobs, req) if req.logprobs else None,
                              finish_reason=c.finish_reason, stop_reason=stop_reason(c), **optimal_sampling_fields(c))
                   for c in sorted(final.outputs, key=lambda c: c.index)]
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of([final]))

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

    async def _stream(self, req: ChatCompletionRequest, model: str, request_id: str,
                      stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        created = int(time.time())
        cursors: Dict[int, ChoiceCursor] = {}
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
                    yield chunk(ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content="")))
                new = cursor.advance(c)
                if new is None:
                    continue
                delta, new_ids, first = new
                lp = self._logprobs(new_ids, (c.logprobs or [])[first:], req) if req.logprobs else None
                yield chunk(ChatChunkChoice(index=c.index, delta=DeltaMessage(content=delta), logprobs=lp,
                                            finish_reason=c.finish_reason, stop_reason=stop_reason(c),
                                            **optimal_sampling_fields(c, first, len(new_ids))))
        if req.stream_options is not None and req.stream_options.include_usage:
            body = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                       usage=usage_of([final]))
            yield f"data: {body.model_dump_json()}\n\n"
