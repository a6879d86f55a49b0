"""The engine: requests in, one scheduled model step at a time, outputs out.

`step()` is the whole contract: the scheduler says what runs, the runner runs it (memory
operations, forward, sampling), the scheduler takes the tokens, the output processor turns
them into text. Features live behind those four: block reuse in the KV manager, the rest in
`plugins.py` (wired onto the runner's seams at start-up, asked with `bind` what each new
request needs: the adapter it runs with, what salts its cached KV, what it keeps loaded, what
it waits for before it may be scheduled).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Dict, Iterable, List, Optional, Union

from sarathi.config import EngineConfig
from sarathi.core.kv_manager import KVManager
from sarathi.core.limits import EngineLimits
from sarathi.core.scheduler import make_scheduler
from sarathi.core.sequence import Sequence
from sarathi.engine.output_processor import OutputProcessor, RequestState
from sarathi.engine.plugins import Plugins
from sarathi.lora.request import LoRARequest
from sarathi.model_executor.model_loader import resolve_model_dir
from sarathi.model_executor.model_runner import ModelRunner, ModelRunnerOutput
from sarathi.outputs import RequestMetrics, RequestOutput
from sarathi.sampling_params import SamplingParams
from sarathi.transformers_utils.tokenizer import get_tokenizer

logger = logging.getLogger("sarathi")

# A forward pass that fails this many times in a row means the engine itself is broken.
MAX_CONSECUTIVE_FAILURES = 3


def cache_namespace(model_dir, quantization: str, dtype: str, tokenizer) -> bytes:
    """The root of every prefix-cache block identity: what, besides the tokens, decides the
    KV (the model's weights, format and dtype; the tokenizer's vocabulary, which an
    AdaptiVocab PatchTokenizer changes)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    parts = [str(Path(model_dir).resolve()), quantization, dtype, hashlib.sha256(vocab).hexdigest()]
    return "\0".join(parts).encode()


def eos_token_ids(tokenizer, hf_config: dict) -> frozenset:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), hf_config.get("eos_token_id")):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


@dataclass
class StepStats:
    time: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    step_time: float


class LLMEngine:
    """`add_request`, `step`, `abort_request`: the synchronous core of every entry point."""

    def __init__(self, config: EngineConfig):
        if config.parallel_config.distributed_executor_backend != "uni":
            raise ValueError("LLM / LLMEngine run one engine in this process; engine replicas on Ray "
                             "(--distributed-executor-backend ray) are served by the OpenAI server")
        self.config = config
        model, cache, sched, serving = (config.model_config, config.cache_config, config.scheduler_config,
                                        config.serving_config)
        self.model_dir = resolve_model_dir(model.model)
        self.model_name = model.served_model_name or model.model
        self.tokenizer = get_tokenizer(self.model_dir, model.patch_tokenizer)
        self.runner = runner = ModelRunner(config, self.model_dir)
        self.max_model_len = runner.max_model_len
        self.eos_token_ids = eos_token_ids(self.tokenizer, runner.hf_config)
        self.plugins = Plugins.attach(config, runner, self.tokenizer, [self.model_name], self.eos_token_ids)

        num_blocks, block_size, num_slots = runner.kv_layout()
        page_bytes, token_bytes = runner.kv_block_bytes()
        caching = cache.enable_prefix_caching and runner.supports_prefix_caching
        if cache.enable_prefix_caching and not caching:
            logger.info("prefix caching is off: the %s KV backend on %s cannot share blocks",
                        cache.kv_cache_backend, runner.device)
        namespace = cache_namespace(self.model_dir, runner.quantization, str(runner.dtype), self.tokenizer)
        self.kv = KVManager(num_blocks, block_size, min(num_slots, sched.max_num_seqs), page_bytes=page_bytes,
                            token_bytes=token_bytes, enable_prefix_caching=caching, namespace=namespace,
                            window=runner.kv_release_window(), window_layers=runner.kv_window_layers())
        max_prefills = sched.max_prefills_per_step
        if max_prefills is None:   # packing prompts is nearly free on a GPU, not on a CPU (scheduler.py)
            max_prefills = 1 if runner.device.type == "cpu" else 0
        self.scheduler = make_scheduler(sched.scheduler, self.kv, sched.max_num_seqs, self.max_model_len,
                                        sched.chunk_size, sched.max_num_batched_tokens,
                                        self.plugins.lora.max_loras if self.plugins.lora else None, max_prefills,
                                        self.plugins.num_lookahead_tokens)
        self.limits = EngineLimits(self.max_model_len, runner.vocab_size, serving.max_logprobs, serving.max_n,
                                   self.kv.whole_tokens_before(num_blocks))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.step_stats: Deque[StepStats] = deque(maxlen=10000)
        self.prompt_tokens_total = 0
        self._seq_ids = itertools.count()
        self._pending: List[RequestOutput] = []     # outputs of aborts, returned by the next step
        self._consecutive_failures = 0

    # ---- requests ------------------------------------------------------------
    def encode_prompt(self, prompt: Optional[str], prompt_token_ids: Optional[List[int]]) -> List[int]:
        """The prompt's token ids, checked against this engine's limits (InvalidParam)."""
        if prompt_token_ids is None:
            if not isinstance(prompt, str) or prompt == "":
                raise ValueError("prompt must be a non-empty string (or pass prompt_token_ids)")
            prompt_token_ids = list(self.tokenizer.encode(prompt))
        self.limits.check_prompt(prompt_token_ids)
        return list(prompt_token_ids)

    def add_request(self, request_id: str, prompt: Optional[str], sampling_params: SamplingParams,
                    prompt_token_ids: Optional[List[int]] = None, arrival_time: Optional[float] = None,
                    lora_request: Optional[LoRARequest] = None) -> None:
        """Queue a request. Raises ValueError for bad input; nothing else is affected."""
        if not isinstance(request_id, str) or request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use (or not a string)")
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        p = sampling_params
        ids = self.encode_prompt(prompt, prompt_token_ids)
        self.limits.check(p)
        bound = self.plugins.bind(p, lora_request)
        adapter, salt = bound.adapter, bound.cache_salt
        self.kv.root(salt)   # hashed here, where a failure is this request's error, not the step's
        room = self.max_model_len - len(ids)
        max_tokens = room if p.max_tokens is None else min(p.max_tokens, room)
        now = arrival_time if arrival_time is not None else time.monotonic()
        req = RequestState(request_id, prompt, ids, p, [], RequestMetrics(arrival_time=now), bound.uses)
        for i in range(p.n):
            seq = Sequence(next(self._seq_ids), request_id, i, list(ids), now, max_tokens,
                           stop_token_ids=frozenset(p.stop_token_ids),
                           eos_token_ids=frozenset() if p.ignore_eos else self.eos_token_ids,
                           min_tokens=p.min_tokens, lora_name=adapter, cache_salt=salt, params=p)
            seq.cache_lookup = not p.reads_whole_prompt
            if self.kv.enable_prefix_caching and req.seqs and seq.cache_lookup:
                seq.prefix_leader = req.seqs[0]   # later samples share the first one's prompt pages
            req.seqs.append(seq)
        self.output_processor.add(req)
        for seq in req.seqs:
            self.scheduler.add(seq, bound.holds)
        self.prompt_tokens_total += len(ids)

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        """Stop requests now; their memory goes back before the next step runs."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            self._end(rid)

    def _end(self, request_id: str, error: Optional[str] = None) -> None:
        req = self.output_processor.requests.get(request_id)
        if req is not None:
            self._pending.append(self.output_processor.end(request_id, error))
            self.scheduler.finish(req.seqs)

    def requests_using(self, name: str) -> int:
        """Requests in flight that need the adapter or model `name` loaded."""
        return sum(1 for r in self.output_processor.requests.values() if name in r.uses)

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.requests)

    def has_pending_work(self) -> bool:
        """Requests in flight, or memory that finished ones hold until the next step frees it."""
        return self.has_unfinished_requests() or self.scheduler.has_pending_memory_ops()

    def is_waiting(self) -> bool:
        """Requests are in flight but none can run yet (each waits for its hold: a grammar
        compiling): a loop may sleep a moment instead of stepping."""
        return not self.scheduler.has_runnable() and not self.scheduler.has_pending_memory_ops() \
            and not self._pending

    # ---- one step ------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """Schedule and run one batch; return outputs of requests that made progress.

        A failure tied to some requests fails just those requests; a failed forward pass
        fails the requests of that batch. The engine carries on, unless forward passes keep
        failing (MAX_CONSECUTIVE_FAILURES): then it raises."""
        start = time.monotonic()
        sched_out = self.scheduler.schedule()
        runner_out = self._execute(sched_out)
        self.scheduler.update_from_output(sched_out, runner_out)
        outputs, stopped = self.output_processor.process(sched_out, runner_out)
        self.scheduler.finish(stopped)
        outputs[:0], self._pending = self._pending, []
        if not sched_out.is_empty:
            self._count(sched_out, runner_out, start)
        return outputs

    def _execute(self, sched_out) -> ModelRunnerOutput:
        try:
            return self.runner.execute(sched_out)   # returns its failures; this catches a broken runner
        except Exception as e:  # noqa: BLE001
            logger.exception("the runner failed")
            return ModelRunnerOutput(error=f"{type(e).__name__}: {e}")

    def _count(self, sched_out, runner_out, start: float) -> None:
        end = time.monotonic()
        self.step_stats.append(StepStats(end, sched_out.num_prefill_tokens, sched_out.num_decode_tokens,
                                         len(sched_out.scheduled), end - start))
        if runner_out.error is None:
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        logger.error("engine step failed (%d in a row): %s", self._consecutive_failures, runner_out.error)
        if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"the model step failed {self._consecutive_failures} times in a row: "
                               f"{runner_out.error}")

    def close(self) -> None:
        """Release the KV cache now; the engine cannot run afterwards."""
        self.runner.close()

    # ---- stats ---------------------------------------------------------------
    def get_stats(self) -> Dict[str, float]:
        kv, sched, runner = self.kv, self.scheduler, self.runner
        stats = {
            "num_running": len(sched.running), "num_waiting": len(sched.waiting),
            "num_waiting_requests": len({s.request_id for s in sched.waiting}), "kv_usage": kv.usage,
            "kv_blocks_total": kv.num_blocks, "kv_blocks_free": kv.num_free_blocks, "kv_block_tokens": kv.block_size,
            "kv_bytes_total": kv.num_blocks * kv.block_size * runner.kv_bytes_per_token,
            "num_preemptions_total": sched.num_preemptions, "prompt_tokens_total": self.prompt_tokens_total,
            "requests_finished_total": self.output_processor.requests_finished,
            "prefix_cache_queries": kv.num_queried_tokens, "prefix_cache_hits": kv.num_hit_tokens,
            "prefix_cache_blocks": kv.num_cached_blocks,
            "generation_tokens_total": self.output_processor.generation_tokens,
            "model_info": {"quantization": runner.quantization, "kernel_isa": runner.kernel_isa,
                           "weight_formats": runner.formats},
        }
        stats["kv_bytes_used"] = int(stats["kv_bytes_total"] * kv.usage)
        stats.update({f"kv_cache_{k}": v for k, v in runner.kv_stats().items()})
        stats.update(self.plugins.stats(sched))
        # the web UI's dashboard: the last 64 steps' composition and each slot's occupancy
        stats["steps"] = [{"time": s.time, "prefill_tokens": s.num_prefill_tokens, "decode_tokens": s.num_decode_tokens,
                           "num_seqs": s.num_seqs, "step_time_s": s.step_time, "budget": sched.token_budget}
                          for s in list(self.step_stats)[-64:]]
        stats["kv_slots"] = kv.occupancy(sched.running)
        return stats

