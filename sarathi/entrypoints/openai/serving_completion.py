"""POST /v1/completions: prompts (text, token ids, or lists of either) -> text_completion."""
from __future__ import annotations

import json
import time
from typing import AsyncIterator, Dict, List, Optional, Sequence, Tuple, Union

from sarathi.outputs import CompletionOutput, PromptLogprobs, RequestOutput, SampleLogprobs

from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .serving_engine import APIError, OpenAIServing, bad_request, random_id, stop_reason, usage_of

Prompt = Tuple[str, List[int]]  # (text, token ids)


class OpenAIServingCompletion:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    def parse_prompts(self, prompt) -> List[Prompt]:
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
                prompts.append((item, s.tokenizer.encode(item, add_special_tokens=True)))
            else:
                ids = list(item)
                s.check_token_ids(ids, "prompt")
                prompts.append((s.tokenizer.decode(ids), ids))
        return prompts

    async def create(self, req: CompletionRequest) -> Union[CompletionResponse, AsyncIterator[str]]:
        s = self.serving
        model = s.model_name(req.model)
        if req.suffix is not None:
            raise bad_request("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
        prompts = self.parse_prompts(req.prompt)
        s.check_capacity()
        want_prompt_logprobs = req.echo and req.logprobs is not None
        params = []
        for _, ids in prompts:
            max_tokens = s.check_length(len(ids), req.max_tokens, "prompt")
            params.append(s.sampling_params(req, max_tokens, req.logprobs,
                                            prompt_logprobs=req.logprobs if want_prompt_logprobs else None))
        request_id = random_id("cmpl")
        streams = [s.generate(text, ids, p, f"{request_id}-{i}")
                   for i, ((text, ids), p) in enumerate(zip(prompts, params))]
        merged = s.merge(streams)
        if req.stream:
            return self._stream(req, model, request_id, prompts, merged)
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
            if req.echo:
                self._add_logprobs(logprobs, out.prompt_token_ids, out.prompt_logprobs, req.logprobs, 0)
            self._add_logprobs(logprobs, c.token_ids, c.logprobs, req.logprobs,
                               _next_offset(logprobs, 0))
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                                stop_reason=stop_reason(c))

    def _add_logprobs(self, into: CompletionLogprobs, token_ids: Sequence[int],
                      steps: Optional[Union[SampleLogprobs, PromptLogprobs]], num_top: int, offset: int) -> int:
        """Append tokens / token_logprobs / top_logprobs / text_offset; returns the next offset."""
        s = self.serving
        steps = steps or [None] * len(token_ids)
        for tid, step in zip(token_ids, steps):
            chosen = step.get(tid) if step else None
            token = s.token_text(tid, chosen)
            into.tokens.append(token)
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
            into.top_logprobs.append({s.token_text(t, lp): lp.logprob for t, lp in top})
        return offset

    async def _stream(self, req: CompletionRequest, model: str, request_id: str, prompts: List[Prompt],
                      merged: AsyncIterator[Tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        created = int(time.time())
        sent: Dict[Tuple[int, int], List[int]] = {}   # choice -> [text chars, tokens, text offset, done]
        finals: Dict[int, RequestOutput] = {}

        def chunk(choice: CompletionChoice) -> str:
            body = CompletionResponse(id=request_id, created=created, model=model, choices=[choice])
            return f"data: {body.model_dump_json(exclude={'usage'})}\n\n"

        try:
            async for i, out in merged:
                if out.finished:
                    finals[i] = out
                for c in out.outputs:
                    index = i * req.n + c.index
                    state = sent.get((i, c.index))
                    if state is None:
                        state = sent[(i, c.index)] = [0, 0, 0, 0]
                        if req.echo:
                            lp = None
                            if req.logprobs is not None:
                                lp = CompletionLogprobs()
                                state[2] = self._add_logprobs(lp, out.prompt_token_ids, out.prompt_logprobs,
                                                              req.logprobs, 0)
                            else:
                                state[2] = len(prompts[i][0])
                            yield chunk(CompletionChoice(index=index, text=prompts[i][0], logprobs=lp))
                    if state[3]:
                        continue
                    delta, new_ids = c.text[state[0]:], c.token_ids[state[1]:]
                    if not delta and not new_ids and c.finish_reason is None:
                        continue
                    lp = None
                    if req.logprobs is not None:
                        lp = CompletionLogprobs()
                        steps = (c.logprobs or [])[state[1]:]
                        self._add_logprobs(lp, new_ids, steps or None, req.logprobs, state[2])
                    state[0], state[1] = len(c.text), len(c.token_ids)
                    state[2] += len(delta)
                    state[3] = int(c.finish_reason is not None)
                    yield chunk(CompletionChoice(index=index, text=delta, logprobs=lp,
                                                 finish_reason=c.finish_reason, stop_reason=stop_reason(c)))
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = usage_of([finals.get(i) for i in range(len(prompts))])
                body = CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage)
                yield f"data: {body.model_dump_json()}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"


def _next_offset(lp: CompletionLogprobs, default: int) -> int:
    if not lp.tokens:
        return default
    return lp.text_offset[-1] + len(lp.tokens[-1])

