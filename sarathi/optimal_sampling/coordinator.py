"""The coordinator form of seed 003: two OpenAI-compatible endpoints (ours, vLLM, ...) each
asked for the next token's top-k log-probabilities, one token at a time, and a token drawn
from q* over the merged candidates (the top-k approximation; `kl.merge_top_k` states the rule
for a token one side did not list).

The context goes out as token ids (`prompt` as a list of ids) and the top-k comes back keyed
by id (`return_tokens_as_token_ids`, vLLM's extension, which our server honours), so nothing
is re-tokenised and nothing drifts. Decoding uses the model's real tokenizer and its EOS ids.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence

import httpx
import torch

from sarathi.optimal_sampling.kl import (diagnostics, log_normalize, merge_top_k, q_star, sample,
                                         solve_kl_symmetry)

logger = logging.getLogger("sarathi")


@dataclass
class CoordinatorConfig:
    theta_url: str
    t_url: str
    theta_model: Optional[str] = None       # the `model` field sent (default: each server's first model)
    t_model: Optional[str] = None
    top_k: int = 20
    alpha: object = "auto"                  # "auto" or a fixed number in [0, 1]
    tol: float = 1e-6
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 0.2                    # first retry delay (s); doubles, with jitter
    max_connections: int = 64
    api_key: Optional[str] = None


@dataclass
class GenerationOutput:
    prompt: str
    generated_text: str = ""
    generated_tokens: List[int] = field(default_factory=list)
    alpha_history: List[float] = field(default_factory=list)
    diagnostics: List[Dict[str, float]] = field(default_factory=list)
    error: Optional[str] = None


class EndpointError(RuntimeError):
    pass


class Coordinator:
    """`async with Coordinator(config, tokenizer) as c: out = await c.generate(prompt)`."""

    def __init__(self, config: CoordinatorConfig, tokenizer, transport: Optional[httpx.AsyncBaseTransport] = None,
                 sleep: Callable[[float], "asyncio.Future"] = asyncio.sleep):
        if not 1 <= config.top_k:
            raise ValueError("top_k must be >= 1")
        self.config, self.tokenizer, self._transport, self._sleep = config, tokenizer, transport, sleep
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        self.vocab_size = len(tokenizer)
        self._client: Optional[httpx.AsyncClient] = None
        self.stats = {"requests": 0, "retries": 0, "failures": 0}

    async def __aenter__(self) -> "Coordinator":
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        limits = httpx.Limits(max_connections=self.config.max_connections,
                              max_keepalive_connections=self.config.max_connections)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout, connect=10.0), limits=limits,
                                         headers=headers, transport=self._transport)
        for side in ("theta", "t"):
            if getattr(self.config, f"{side}_model") is None:
                url = getattr(self.config, f"{side}_url").rstrip("/")
                models = await self._call("GET", url + "/v1/models", None)
                setattr(self.config, f"{side}_model", models["data"][0]["id"])
        return self

    async def __aexit__(self, *exc) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _call(self, method: str, url: str, body: Optional[dict]) -> dict:
        """One HTTP call, retried on 5xx and connection failures with exponential backoff + jitter."""
        delay = self.config.backoff
        for attempt in range(self.config.max_retries + 1):
            self.stats["requests"] += 1
            try:
                r = await self._client.request(method, url, json=body)
                if r.status_code < 500:
                    if r.status_code != 200:
                        raise EndpointError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
                    return r.json()
                problem = f"HTTP {r.status_code}"
            except (httpx.TransportError, ValueError) as e:  # connection refused / dropped, bad JSON
                problem = f"{type(e).__name__}: {e}"
            if attempt == self.config.max_retries:
                self.stats["failures"] += 1
                raise EndpointError(f"{url}: {problem} (after {attempt + 1} attempts)")
            self.stats["retries"] += 1
            await self._sleep(delay * (1 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    async def _top_k(self, side: str, context: Sequence[int]) -> Dict[int, float]:
        url = getattr(self.config, f"{side}_url").rstrip("/") + "/v1/completions"
        body = {"model": getattr(self.config, f"{side}_model"), "prompt": list(context), "max_tokens": 1,
                "temperature": 0.0, "logprobs": self.config.top_k, "return_tokens_as_token_ids": True,
                "ignore_eos": True, "skip_special_tokens": False}
        data = await self._call("POST", url, body)
        try:
            top = data["choices"][0]["logprobs"]["top_logprobs"][0]
            return {int(k.removeprefix("token_id:")): float(v) for k, v in top.items()}
        except (KeyError, IndexError, TypeError, ValueError):
            raise EndpointError(f"{url}: the answer has no top_logprobs keyed by token id (does the server "
                                "accept return_tokens_as_token_ids?)") from None

    async def stream(self, prompt: str, max_tokens: int = 64, seed: Optional[int] = None,
                     out: Optional[GenerationOutput] = None) -> AsyncIterator[str]:
        """Yield the generated text piece by piece (filling `out`, if given, as it goes)."""
        out = out if out is not None else GenerationOutput(prompt)
        gen = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        context = list(self.tokenizer.encode(prompt))
        text_so_far = ""
        fixed = None if self.config.alpha == "auto" else float(self.config.alpha)
        for _ in range(max_tokens):
            top_theta, top_t = await asyncio.gather(self._top_k("theta", context), self._top_k("t", context))
            merged = merge_top_k(top_theta, top_t, self.vocab_size)
            # α over the candidates: each side renormalised on the merged set, as q* is.
            alpha = fixed if fixed is not None else solve_kl_symmetry(
                logprobs_theta=log_normalize(merged.logp_theta), logprobs_t=log_normalize(merged.logp_t),
                tol=self.config.tol)
            q = q_star(merged.logp_theta, merged.logp_t, alpha)
            token = int(merged.token_ids[sample(q, gen)])
            d = diagnostics(merged.logp_theta, merged.logp_t, alpha)
            d.update(covered_theta=merged.covered_theta, covered_t=merged.covered_t)
            out.alpha_history.append(alpha)
            out.diagnostics.append(d)
            if token in self.eos_ids:
                break
            out.generated_tokens.append(token)
            context.append(token)
            text = self.tokenizer.decode(out.generated_tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 character
                piece, text_so_far = text[len(text_so_far):], text
                out.generated_text = text
                if piece:
                    yield piece
        out.generated_text = self.tokenizer.decode(out.generated_tokens, skip_special_tokens=True)
        if len(out.generated_text) > len(text_so_far):
            yield out.generated_text[len(text_so_far):]

    async def generate(self, prompt: str, max_tokens: int = 64, seed: Optional[int] = None) -> GenerationOutput:
        """One prompt; an endpoint that keeps failing ends it with `error` set (what was generated stays)."""
        out = GenerationOutput(prompt)
        try:
            async for _ in self.stream(prompt, max_tokens, seed, out):
                pass
        except EndpointError as e:
            out.error = str(e)
        return out

    async def generate_batch(self, prompts: Sequence[str], max_tokens: int = 64, seed: Optional[int] = None,
                             concurrency: int = 8, progress: bool = True) -> List[GenerationOutput]:
        """Many prompts, at most `concurrency` at a time, in order; a tqdm bar when progress."""
        from tqdm.auto import tqdm

        limit = asyncio.Semaphore(max(1, concurrency))
        bar = tqdm(total=len(prompts), desc="optimal sampling", disable=not progress)

        async def one(i: int, prompt: str) -> GenerationOutput:
            async with limit:
                res = await self.generate(prompt, max_tokens, None if seed is None else seed + i)
            bar.update(1)
            return res

        try:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        finally:
            bar.close()


