"""The offline API users know from vLLM: LLM(model=..., **engine_args).generate(...)."""
from __future__ import annotations

import itertools
import time
from typing import Dict, List, Optional, Sequence, Union

from tqdm import tqdm

from sarathi.config import EngineConfig
from sarathi.engine.llm_engine import LLMEngine
from sarathi.lora.request import LoRARequest
from sarathi.outputs import RequestOutput
from sarathi.sampling_params import SamplingParams


class LLM:
    """Offline batched generation. Every CLI flag is a keyword (dashes -> underscores)."""

    def __init__(self, model: Optional[str] = None, **engine_args):
        if model is not None:
            engine_args["model"] = model
        self.engine = LLMEngine(EngineConfig.from_kwargs(**engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix block; returns how many (their memory goes back now)."""
        n = self.engine.scheduler.reset_prefix_cache()
        self.engine.step()   # applies the release (no request is in flight between generate calls)
        return n

    def generate(self, prompts: Union[None, str, Sequence[str]] = None,
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 prompt_token_ids: Optional[Sequence[List[int]]] = None,
                 use_tqdm: bool = False,
                 lora_request: Union[None, LoRARequest, Sequence[Optional[LoRARequest]]] = None
                 ) -> List[RequestOutput]:
        """One RequestOutput per prompt, in the order given. lora_request: one adapter for all
        prompts or one per prompt (None: the base model)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is None and prompt_token_ids is None:
            raise ValueError("give prompts or prompt_token_ids")
        count = len(prompts) if prompts is not None else len(prompt_token_ids)
        if prompts is not None and prompt_token_ids is not None and len(prompt_token_ids) != count:
            raise ValueError("prompts and prompt_token_ids differ in length")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * count if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != count:
            raise ValueError("need one SamplingParams per prompt (or a single one)")
        loras = [lora_request] * count if lora_request is None or isinstance(lora_request, LoRARequest) \
            else list(lora_request)
        if len(loras) != count:
            raise ValueError("need one lora_request per prompt (or a single one)")
        ids = []
        try:
            for i in range(count):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(
                    rid, prompts[i] if prompts is not None else None, params[i],
                    prompt_token_ids=list(prompt_token_ids[i]) if prompt_token_ids is not None else None,
                    lora_request=loras[i])
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)
            self.engine.step()  # drain the abort outputs
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Union[List[Dict[str, str]], List[List[Dict[str, str]]]],
             sampling_params: Optional[SamplingParams] = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False, lora_request: Optional[LoRARequest] = None) -> List[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
                   for c in convs]
        token_ids = [list(tok.encode(p, add_special_tokens=False)) for p in prompts]
        return self.generate(prompts, sampling_params, prompt_token_ids=token_ids, use_tqdm=use_tqdm,
                             lora_request=lora_request)

    def _run(self, ids: List[str], use_tqdm: bool) -> List[RequestOutput]:
        done: Dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    bar.update(1)
            if self.engine.is_waiting():   # every request waits for its grammar to compile
                time.sleep(0.002)
        if self.engine.has_pending_work():
            self.engine.step()   # the memory of the last requests to finish goes back now
        bar.close()
        return [done[i] for i in ids]
