"""POST /v1/completions: prompts (text, token ids, or lists of either) -> text_completion."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Dict, List, Optional, Sequence, Tuple, Union

from sarathi.outputs import CompletionOutput, PromptLogprobs, RequestOutput, SampleLogprobs

from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .serving_engine import (ChoiceCursor, OpenAIServing, bad_request, first_output, optimal_sampling_fields,
                             random_id, sse, stop_reason, usage_of)

Prompt = Tuple[str, List[int]]  # (text, token ids)


class OpenAIServingCompletion:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def parse_prompts(self, prompt) -> List[Prompt]:
        """A string, a list of strings, a list of token ids, or a list of token-id lists."""
        s = self.serving
        if isinstance(prompt, str):
            items: list = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise bad_request("prompt must not be an empty list", param="prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append((item, await s.encode(item, "prompt")))
            else:
                ids = list(item)
                s.check_prompt(ids, None, "prompt")
                prompts.append((await asyncio.to_thread(s.tokenizer.decode, ids), ids))
        return prompts

    async def create(self, req: CompletionRequest) -> Union[CompletionResponse, AsyncIterator[str]]:
        s = self.serving
        model, lora = s.resolve_model(req.model)
        if req.suffix is not None:
            raise bad_request("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens must be at least 1 (0 is for scoring a prompt with echo)",
                              param="max_tokens")
        prompts = await self.parse_prompts(req.prompt)
        s.check_prompt_total(sum(len(ids) for _, ids in prompts))
        want_prompt_logprobs = req.echo and req.logprobs is not None
        params = []
        for _, ids in prompts:
            max_tokens = s.check_prompt(ids, req.max_tokens, "prompt")
            params.append(s.sampling_params(req, max_tokens, req.logprobs,
                                            prompt_logprobs=req.logprobs if want_prompt_logprobs else None))
        request_id = random_id("cmpl")
        ticket = s.check_capacity()
        streams = [s.generate(text, ids, p, f"{request_id}-{i}", lora, ticket if i == 0 else None)
                   for i, ((text, ids), p) in enumerate(zip(prompts, params))]
        merged = s.merge(streams)
        if req.stream:
            if params[0].structured_outputs is not None:
                merged = await first_output(merged)   # a constraint that does not compile: a 400, not a stream
            return sse(self._stream(req, model, request_id, prompts, merged))
        finals: List[Optional[RequestOutput]] = [None] * len(prompts)
        async for i, out in merged:
            finals[i] = out
        choices = []
        for i, out in enumerate(finals):
            for c in sorted(out.outputs, key=lambda c: c.index):
                choices.append(self._choice(req, i * req.n + c.index, prompts[i][0], out, c))
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of(finals))

    def _choice(self, req: CompletionRequest, index: int, prompt_text: str, out: RequestOutput,
                c: CompletionOutput) -> CompletionChoice:
        text = (prompt_text if req.echo else "") + c.text
        logprobs = None
        if req.logprobs is not None:
            logprobs = CompletionLogprobs()
            offset = 0
            if req.echo:
                offset = self._add_logprobs(logprobs, out.prompt_token_ids, out.prompt_logprobs, req.logprobs, 0,
                                            bool(req.return_tokens_as_token_ids))
            self._add_logprobs(logprobs, c.token_ids, c.logprobs, req.logprobs, offset,
                               bool(req.return_tokens_as_token_ids))
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                                stop_reason=stop_reason(c), **optimal_sampling_fields(c))

    def _add_logprobs(self, into: CompletionLogprobs, token_ids: Sequence[int],
                      steps: Optional[Union[SampleLogprobs, PromptLogprobs]], num_top: int, offset: int,
                      as_ids: bool = False) -> int:
        """Append tokens / token_logprobs / top_logprobs / text_offset; returns the next offset.
        as_ids: name tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
        s = self.serving
        steps = steps or [None] * len(token_ids)
        for tid, step in zip(token_ids, steps):
            chosen = step.get(tid) if step else None
            token = s.token_text(tid, chosen)
            into.tokens.append(f"token_id:{tid}" if as_ids else token)
            into.text_offset.append(offset)
            offset += len(token)
            if step is None:
                into.token_logprobs.append(None)
                into.top_logprobs.append(None)
                continue
            into.token_logprobs.append(chosen.logprob if chosen else None)
            top = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:num_top]
            if chosen is not None and tid not in dict(top):
                top.append((tid, chosen))
            into.top_logprobs.append({(f"token_id:{t}" if as_ids else s.token_text(t, lp)): lp.logprob
                                      for t, lp in top})
        return offset

    async def _stream(self, req: CompletionRequest, model: str, request_id: str, prompts: List[Prompt],
                      merged: AsyncIterator[Tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        created = int(time.time())
        cursors: Dict[Tuple[int, int], ChoiceCursor] = {}
        finals: Dict[int, RequestOutput] = {}

        def chunk(choice: CompletionChoice) -> str:
            body = CompletionResponse(id=request_id, created=created, model=model, choices=[choice])
            return f"data: {body.model_dump_json(exclude={'usage'})}\n\n"

        async for i, out in merged:
            if out.finished:
                finals[i] = out
            for c in out.outputs:
                index = i * req.n + c.index
                cursor = cursors.get((i, c.index))
                if cursor is None:
                    cursor = cursors[(i, c.index)] = ChoiceCursor()
                    if req.echo:
                        yield chunk(self._echo_choice(req, index, prompts[i][0], out, cursor))
                new = cursor.advance(c)
                if new is None:
                    continue
                delta, new_ids, first = new
                lp = None
                if req.logprobs is not None:
                    lp = CompletionLogprobs()
                    self._add_logprobs(lp, new_ids, (c.logprobs or [])[first:] or None, req.logprobs,
                                       cursor.text_offset, bool(req.return_tokens_as_token_ids))
                cursor.text_offset += len(delta)
                yield chunk(CompletionChoice(index=index, text=delta, logprobs=lp, finish_reason=c.finish_reason,
                                             stop_reason=stop_reason(c),
                                             **optimal_sampling_fields(c, first, len(new_ids))))
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = usage_of([finals.get(i) for i in range(len(prompts))])
            body = CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage)
            yield f"data: {body.model_dump_json()}\n\n"

    def _echo_choice(self, req: CompletionRequest, index: int, prompt_text: str, out: RequestOutput,
                     cursor: ChoiceCursor) -> CompletionChoice:
        """The first chunk of an echo stream: the prompt (with its logprobs when asked for)."""
        lp = None
        if req.logprobs is not None:
            lp = CompletionLogprobs()
            cursor.text_offset = self._add_logprobs(lp, out.prompt_token_ids, out.prompt_logprobs, req.logprobs, 0,
                                                bool(req.return_tokens_as_token_ids))
        else:
            cursor.text_offset = len(prompt_text)
        return CompletionChoice(index=index, text=prompt_text, logprobs=lp)
