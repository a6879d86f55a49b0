"""The engine: requests in, one scheduled model step at a time, outputs out."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Deque, Dict, Iterable, List, Optional, Tuple, Union

import torch

from sarathi.config import EngineConfig
from sarathi.core.kv_manager import KVManager
from sarathi.core.scheduler import ScheduledSeq, SchedulerOutput, make_scheduler
from sarathi.core.sequence import Sequence
from sarathi.engine.engine_client import EngineLimits
from sarathi.engine.output_processor import OutputProcessor, Request, SeqState
from sarathi.lora.request import LoRARequest
from sarathi.model_executor.model_loader import resolve_model_dir
from sarathi.model_executor.model_runner import ModelRunner, RunSeq
from sarathi.model_executor.sampler import SampleRequest, SampleResult, prompt_logprobs, sample
from sarathi.outputs import RequestMetrics, RequestOutput
from sarathi.sampling_params import InvalidParam, SamplingParams
from sarathi.transformers_utils.detokenizer import IncrementalDetokenizer
from sarathi.transformers_utils.tokenizer import get_tokenizer

if TYPE_CHECKING:
    from sarathi.optimal_sampling.engine import Target

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


@dataclass(eq=False)
class SeqPlan:
    """One scheduled sequence of a step: the runner's input and what to do with its logits."""

    seq: Sequence
    req: Request
    run: RunSeq
    samples: bool                 # the chunk ends at the last token: sample the next one
    want_prompt_logprobs: bool


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
        if config.distributed_executor_backend != "uni":
            raise ValueError("LLM / LLMEngine run one engine in this process; engine replicas on Ray "
                             "(--distributed-executor-backend ray) are served by the OpenAI server")
        self.config = config
        self.model_dir = resolve_model_dir(config.model)
        self.model_name = config.served_model_name or config.model
        self.tokenizer = get_tokenizer(self.model_dir, config.patch_tokenizer)
        self.runner = ModelRunner(config, self.model_dir)
        self.max_model_len = self.runner.max_model_len
        self.limits = EngineLimits(self.max_model_len, self.runner.vocab_size, config.max_logprobs, config.max_n)
        num_blocks, block_size, num_slots = self.runner.kv_layout()
        page_bytes, token_bytes = self.runner.kv_block_bytes()
        self.prefix_caching = config.enable_prefix_caching and self.runner.supports_prefix_caching
        if config.enable_prefix_caching and not self.prefix_caching:
            logger.info("prefix caching is off: the %s KV backend on %s cannot share blocks",
                        config.kv_cache_backend, self.runner.device)
        self.kv = KVManager(num_blocks, block_size, min(num_slots, config.max_num_seqs), page_bytes=page_bytes,
                            token_bytes=token_bytes, enable_prefix_caching=self.prefix_caching,
                            namespace=self._cache_namespace())
        max_prefills = config.max_prefills_per_step
        if max_prefills is None:   # packing prompts is nearly free on a GPU, not on a CPU (scheduler.py)
            max_prefills = 1 if self.runner.device.type == "cpu" else 0
        self.scheduler = make_scheduler(config.scheduler, self.kv, config.max_num_seqs, self.max_model_len,
                                        config.chunk_size, config.max_num_batched_tokens,
                                        config.max_loras if config.enable_lora else None, max_prefills)
        self.eos_token_ids = frozenset(self._eos_ids(self.runner.hf_config))
        self.generator = torch.Generator(device=self.runner.device).manual_seed(config.seed)
        self.requests: Dict[str, Request] = {}
        self._seq_counter = itertools.count()
        self.step_stats: Deque[StepStats] = deque(maxlen=10000)
        self.counters = {"prompt_tokens_total": 0, "requests_finished_total": 0}
        self.outputs = OutputProcessor(self.tokenizer)
        self._pending_outputs: List[RequestOutput] = []
        self._consecutive_failures = 0
        for name, path in config.lora_modules.items():
            self.add_lora(LoRARequest(name, 0, path))
        self.targets: Dict[str, "Target"] = {}   # optimal sampling's pi_t, by the name requests use
        if config.optimal_sampling_target:
            self._load_target_model(config)

    # ---- LoRA adapters -------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load an adapter under its name (raises ValueError: bad files, rank, targets, name taken)."""
        if self.runner.lora is None:
            raise ValueError("LoRA adapters need an engine started with --enable-lora")
        if not lora_request.lora_path:
            raise ValueError(f"adapter {lora_request.lora_name!r} has no lora_path to load it from")
        self.runner.lora.register(lora_request.lora_name, lora_request.lora_path)

    def remove_lora(self, name: str) -> None:
        """Unload an adapter; refused while requests run with it (KeyError: unknown name)."""
        if self.runner.lora is None or name not in self.runner.lora.paths:
            raise KeyError(name)
        busy = sum(1 for r in self.requests.values() if r.lora_name == name or (
            r.params.optimal_sampling is not None and r.params.optimal_sampling.target == name))
        if busy:
            raise ValueError(f"adapter {name!r} is in use by {busy} request(s); unload it once they finish")
        self.runner.lora.unregister(name)
        target = self.targets.pop(name, None)  # its KV as an optimal-sampling target
        if target is not None:
            target.close()

    def list_loras(self) -> List[str]:
        return [] if self.runner.lora is None else self.runner.lora.names()

    def _resolve_lora(self, lora_request: Optional[LoRARequest]) -> Optional[str]:
        """The adapter name a request runs with; loads it on first sight when it carries a path."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise ValueError("lora_request must be a LoRARequest")
        lora = self.runner.lora
        if lora is None:
            raise ValueError("this engine was started without --enable-lora; it serves no adapters")
        name = lora_request.lora_name
        if name not in lora.paths:
            if not lora_request.lora_path:
                raise ValueError(f"unknown LoRA adapter {name!r}; loaded: {lora.names()}")
            self.add_lora(lora_request)
        return name

    # ---- optimal sampling's second model ---------------------------------------
    def _load_target_model(self, config: EngineConfig) -> None:
        """Load --optimal-sampling-target with a KV cache that mirrors this engine's slots."""
        import dataclasses

        from sarathi.model_executor.kv_cache import KVCacheSpec
        from sarathi.model_executor.model_loader import load_hf_config
        from sarathi.model_executor.models.llama import LlamaArgs
        from sarathi.optimal_sampling.engine import ModelTarget, mirror_kv_memory

        name = config.optimal_sampling_target_name or config.optimal_sampling_target
        if name == self.model_name or name in self.list_loras():
            raise ValueError(f"--optimal-sampling-target-name {name!r} is already the name of a served model")
        target_dir = resolve_model_dir(config.optimal_sampling_target)
        tok = get_tokenizer(target_dir, config.patch_tokenizer)
        if tok.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"--optimal-sampling-target {config.optimal_sampling_target!r} has a different "
                             "tokenizer; q* needs both models over the same vocabulary")
        args = LlamaArgs.from_hf_config(load_hf_config(target_dir))
        main = self.runner.kv_spec
        page = self.runner.page_size()
        tspec = KVCacheSpec(args.num_layers, args.num_kv_heads, args.head_dim, main.dtype, main.device,
                            main.max_model_len, main.max_num_seqs, 0, main.block_size, page)
        memory = mirror_kv_memory(config.kv_cache_backend, main, self.runner.kv_layout(), tspec, page)
        tconfig = dataclasses.replace(config, model=config.optimal_sampling_target, enable_lora=False,
                                      lora_modules=None, optimal_sampling_target=None)
        runner = ModelRunner(tconfig, target_dir, max_model_len=self.max_model_len, kv_memory=memory,
                             page_size=page)
        if runner.vocab_size != self.runner.vocab_size:
            raise ValueError(f"--optimal-sampling-target has {runner.vocab_size} logits, this model "
                             f"{self.runner.vocab_size}")
        logger.info("optimal sampling target %r: %s, KV %.0f MB", name, target_dir, memory / 1e6)
        self.targets[name] = ModelTarget(name, runner)

    def optimal_sampling_targets(self) -> List[str]:
        """Names a request can give as optimal_sampling's target (models and LoRA adapters)."""
        from sarathi.optimal_sampling.engine import ModelTarget

        models = [n for n, t in self.targets.items() if isinstance(t, ModelTarget)]
        return list(dict.fromkeys(models + self.list_loras()))

    def _target(self, name: str) -> "Target":
        target = self.targets.get(name)
        if target is None:
            if self.runner.lora is None or name not in self.runner.lora.paths:
                raise InvalidParam("optimal_sampling", f"unknown optimal_sampling target {name!r}; targets: "
                                                       f"{self.optimal_sampling_targets()}")
            from sarathi.optimal_sampling.engine import AdapterTarget

            target = self.targets[name] = AdapterTarget(self.runner, name)
        return target

    def _release(self, slot: int) -> None:
        self.runner.free_slot(slot)
        for target in self.targets.values():
            target.free_slot(slot)

    def _cache_namespace(self) -> bytes:
        return cache_namespace(self.model_dir, self.runner.quantization, str(self.runner.dtype), self.tokenizer)

    def _eos_ids(self, hf_config: dict) -> set:
        ids = set()
        for value in (getattr(self.tokenizer, "eos_token_id", None), hf_config.get("eos_token_id")):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    # ---- requests ------------------------------------------------------------
    def encode_prompt(self, prompt: Optional[str], prompt_token_ids: Optional[List[int]]) -> List[int]:
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string (or pass prompt_token_ids)")
            if prompt == "":
                raise ValueError("prompt must not be empty")
            prompt_token_ids = list(self.tokenizer.encode(prompt))
        vocab = self.runner.vocab_size
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        self.scheduler.check_prompt(len(prompt_token_ids))
        return prompt_token_ids

    def check_params(self, p: SamplingParams) -> None:
        """Limits that depend on this engine: vocabulary, --max-logprobs, --max-n."""
        self.limits.check(p)

    def add_request(self, request_id: str, prompt: Optional[str], sampling_params: SamplingParams,
                    prompt_token_ids: Optional[List[int]] = None, arrival_time: Optional[float] = None,
                    lora_request: Optional[LoRARequest] = None) -> None:
        """Queue a request. Raises ValueError for bad input; nothing else is affected."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        ids = self.encode_prompt(prompt, prompt_token_ids)
        p = sampling_params
        self.check_params(p)
        lora_name = self._resolve_lora(lora_request)
        if p.optimal_sampling is not None:
            self._target(p.optimal_sampling.target)
        room = self.max_model_len - len(ids)
        max_tokens = room if p.max_tokens is None else min(p.max_tokens, room)
        now = arrival_time if arrival_time is not None else time.monotonic()
        req = Request(request_id, prompt, ids, p, [], RequestMetrics(arrival_time=now), lora_name=lora_name)
        # Prefix caching: an adapter changes the KV, so it salts every block identity too (with the
        # generation of its weights in memory: KV of an evicted or unloaded load is never reused).
        adapter = "" if lora_name is None else f"{lora_name}#{self.runner.lora.generation.get(lora_name, 0)}"
        salt = f"{adapter}\0{p.cache_salt or ''}"
        if p.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        for i in range(p.n):
            gen = None
            if p.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed((p.seed + i * 1_000_003) % 2**64)
            detok = IncrementalDetokenizer.after_prompt(self.tokenizer, ids, p.skip_special_tokens)
            seq = Sequence(next(self._seq_counter), request_id, i, list(ids), now, max_tokens,
                           stop_token_ids=frozenset(p.stop_token_ids),
                           eos_token_ids=frozenset() if p.ignore_eos else self.eos_token_ids,
                           min_tokens=p.min_tokens, lora_name=lora_name, cache_salt=salt,
                           data=SeqState(detok, gen, logprobs=[] if p.logprobs is not None else None,
                                         alpha_history=[] if p.optimal_sampling else None,
                                         diagnostics=[] if p.optimal_sampling else None))
            # Prompt logprobs need every prompt position computed, and optimal sampling's target
            # model mirrors this KV without the cache: such requests never hit.
            seq.cache_lookup = p.prompt_logprobs is None and p.optimal_sampling is None
            if self.prefix_caching and req.seqs and seq.cache_lookup:
                seq.prefix_leader = req.seqs[0]   # later samples share the first one's prompt pages
            req.seqs.append(seq)
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.counters["prompt_tokens_total"] += len(ids)

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        """Stop a request now; its KV slots are freed at once."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self._free(seq)
            req.finished = True
            req.metrics.finished_time = time.monotonic()
            self._pending_outputs.append(self.outputs.make_output(req))
            del self.requests[rid]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _free(self, seq: Sequence) -> None:
        slot = self.scheduler.finish(seq)
        self._retain_cached(seq)  # before its slot goes: the pages to retain are still there
        if slot is not None:
            self._release(slot)

    # ---- prefix caching ---------------------------------------------------------
    def _retain_cached(self, seq: Sequence) -> None:
        """The backend keeps the blocks the prefix cache just took from this sequence."""
        new, seq.newly_cached = seq.newly_cached, []
        for slot, page, block in new:
            try:
                handle = self.runner.retain_block(slot, page, block)
            except Exception:  # noqa: BLE001 - the block just is not cached
                logger.exception("could not retain a prefix-cache block")
                self.kv.uncache(block)
                continue
            if not self.kv.set_handle(block, handle):
                self.runner.release_blocks([handle])

    def _apply_prefix_cache(self, sched: SchedulerOutput) -> None:
        """Before the step runs: let go of evicted blocks, then map (or copy) every hit."""
        try:
            released = self.kv.take_released()
            if released:
                self.runner.release_blocks(released)
            for share in sched.shares:
                self.runner.share_prefix(share.slot, share.table, share.handles, share.copy_src)
        finally:
            self.kv.copies_done()

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (requests in flight keep theirs); returns how many."""
        n = self.kv.reset_prefix_cache()
        self.runner.release_blocks(self.kv.take_released())
        return n

    # ---- one step ------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """Schedule and run one batch; return outputs of requests that made progress.

        A failure tied to some requests (their sampling or text processing) fails just those
        requests; a failed forward pass fails the requests of that batch. The engine carries
        on, unless forward passes keep failing (MAX_CONSECUTIVE_FAILURES): then it raises."""
        outputs, self._pending_outputs = self._pending_outputs, []
        sched = self.scheduler.schedule()
        for seq in sched.preempted:
            self._retain_cached(seq)
            self.requests[seq.request_id].metrics.num_preemptions += 1
        for slot in sched.freed_slots:
            self._release(slot)
        if sched.is_empty:
            return outputs
        start = time.monotonic()
        try:
            touched = self._run(sched, start)
            self._consecutive_failures = 0
        except Exception as e:  # noqa: BLE001 - the forward pass failed: fail this batch, not the engine
            self._consecutive_failures += 1
            logger.exception("engine step failed (%d in a row)", self._consecutive_failures)
            if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise
            touched = []
            for rid in {item.seq.request_id for item in sched.scheduled}:
                self.fail_request(rid, f"the model step running this request failed: {type(e).__name__}")
        end = time.monotonic()
        self.step_stats.append(StepStats(end, sched.num_prefill_tokens, sched.num_decode_tokens,
                                         len(sched.scheduled), end - start))
        outputs.extend(self._pending_outputs)
        self._pending_outputs = []
        for req in touched:
            if req.request_id not in self.requests:
                continue  # failed during this step; its output is already in the list
            outputs.append(self.outputs.make_output(req))
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    def _run(self, sched: SchedulerOutput, now: float) -> List[Request]:
        """Build the runner's input, execute, sample, hand the tokens on."""
        self._apply_prefix_cache(sched)
        plan = [self._plan_seq(item, now) for item in sched.scheduled]
        logits, target_rows = self._forward(plan, len(sched.prefills))
        sampled = self._sample(plan, logits, target_rows)
        self.scheduler.postprocess(sched, [(p.seq, res.token_id) for p, res in sampled.items()])
        if self.prefix_caching:
            for item in sched.scheduled:
                seq = item.seq
                if not seq.is_finished and self.kv.holds(seq.seq_id):
                    # The head of the last block too once the prompt is done: n > 1 samples copy it.
                    prompt_done = seq.num_computed_tokens - item.num_scheduled_tokens < len(seq.prompt_token_ids) \
                        <= seq.num_computed_tokens
                    self.scheduler.cache_computed(seq, partial=prompt_done)
                    self._retain_cached(seq)
        now = time.monotonic()
        touched: Dict[str, Request] = {}
        for p in plan:
            res = sampled.get(p)
            if p.req.request_id not in self.requests or (res is None and p.seq.finish_reason is None):
                continue
            try:
                if res is not None:
                    self.outputs.process_token(p.req, p.seq, res, now)
            except Exception as e:  # noqa: BLE001 - e.g. a token the detokenizer cannot handle
                logger.exception("output processing failed for request %s", p.req.request_id)
                self.fail_request(p.req.request_id, f"processing this request's output failed: {type(e).__name__}")
                continue
            if p.seq.finish_reason is not None:
                self._finish(p.req, p.seq)
            touched[p.req.request_id] = p.req
        return list(touched.values())

    def _plan_seq(self, item: ScheduledSeq, now: float) -> "SeqPlan":
        """What the runner computes for one scheduled sequence, and which logits rows come back."""
        seq, n = item.seq, item.num_scheduled_tokens
        req = self.requests[seq.request_id]
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = now
        if seq.index == 0 and seq.num_cached_tokens is not None:
            req.metrics.num_cached_tokens = seq.num_cached_tokens
        start = seq.num_computed_tokens
        samples = item.samples and seq.max_tokens > 0  # max_tokens 0: scoring the prompt only
        want_plp = (req.prompt_logprobs is not None and seq.index == 0 and seq.num_preemptions == 0
                    and start < len(seq.prompt_token_ids) - 1)
        first_row = 0 if want_plp else n - 1
        last_row = n if (samples or want_plp) else first_row
        table = self.kv.block_table(seq.seq_id) if self.runner.needs_block_tables else None
        run = RunSeq(self.kv.slot(seq.seq_id), seq.token_ids()[start:start + n], start, (first_row, last_row), table,
                     seq.lora_name)
        return SeqPlan(seq, req, run, samples, want_plp)

    def _forward(self, plan: List["SeqPlan"], num_prefills: int
                 ) -> Tuple[torch.Tensor, Dict["SeqPlan", torch.Tensor]]:
        """The model's logits rows for the plan, and pi_t's row for each sequence that samples
        from q*. pi_t runs every chunk of those sequences (so its KV keeps up): a LoRA target
        in the same forward as the model (its rows beside the model's, its own KV), another
        model in a forward of its own."""
        groups: Dict[str, List[Tuple[int, SeqPlan]]] = {}
        for i, p in enumerate(plan):
            os_params = p.req.params.optimal_sampling
            if os_params is not None:
                groups.setdefault(os_params.target, []).append((i, p))
        fused, separate = [], []
        for name, members in groups.items():
            target = self._target(name)
            (fused if target.runner is self.runner else separate).append((target, members))
        extra = [target.group([p.run for _, p in members], sum(1 for i, _ in members if i < num_prefills))
                 for target, members in fused]
        logits = self.runner.execute([p.run for p in plan], num_prefills, extra=extra)
        n_main = sum(p.run.logits_rows[1] - p.run.logits_rows[0] for p in plan)
        main, offset = logits[:n_main], n_main
        rows: Dict[SeqPlan, torch.Tensor] = {}

        def take(members, block, offset):
            for _, p in members:
                offset += p.run.logits_rows[1] - p.run.logits_rows[0]
                if p.samples:
                    rows[p] = block[offset - 1]
            return offset

        for _, members in fused:
            offset = take(members, logits, offset)
        for target, members in separate:
            block = target.execute([p.run for _, p in members], sum(1 for i, _ in members if i < num_prefills))
            take(members, block, 0)
        return main, rows

    def _sample(self, plan: List["SeqPlan"], logits: torch.Tensor,
                target_rows: Optional[Dict["SeqPlan", torch.Tensor]] = None) -> Dict["SeqPlan", SampleResult]:
        """Prompt logprobs from each sequence's rows, then one token per sampling sequence
        (from q* for the sequences in target_rows)."""
        rows: List[Tuple[SeqPlan, SampleRequest]] = []
        row_index: List[int] = []
        optimal: List[Tuple[SeqPlan, int]] = []
        offset = 0
        for p in plan:
            count = p.run.logits_rows[1] - p.run.logits_rows[0]
            if p.want_prompt_logprobs:
                start, prompt = p.run.context_len, p.seq.prompt_token_ids
                npos = min(len(prompt) - 1 - start, count)  # positions predicting a prompt token
                block = logits[offset:offset + npos]
                lps = prompt_logprobs(block, prompt[start + 1:start + 1 + npos], p.req.params.prompt_logprobs)
                self.outputs.add_prompt_logprobs(p.req, lps)
            offset += count
            if p.samples and target_rows and p in target_rows:
                optimal.append((p, offset - 1))
            elif p.samples:
                seq = p.seq
                rows.append((p, SampleRequest(p.req.params, seq.prompt_token_ids, seq.output_token_ids,
                                              seq.data.generator, tuple(seq.blocked_token_ids))))
                row_index.append(offset - 1)
        out: Dict[SeqPlan, SampleResult] = self._sample_optimal(optimal, logits, target_rows) if optimal else {}
        if not rows:
            return out
        picked = logits if len(row_index) == logits.shape[0] else logits[row_index]
        try:
            results = sample(picked, [r for _, r in rows], self.generator)
            out.update({p: res for (p, _), res in zip(rows, results)})
            return out
        except Exception:  # noqa: BLE001 - find the rows at fault, fail their requests, keep the rest
            logger.exception("batched sampling failed; sampling row by row")
        for i, (p, r) in enumerate(rows):
            try:
                out[p] = sample(picked[i:i + 1], [r], self.generator)[0]
            except Exception as e:  # noqa: BLE001
                self.fail_request(p.req.request_id, f"sampling failed for this request: {type(e).__name__}: {e}")
        return out

    def _sample_optimal(self, optimal: List[Tuple["SeqPlan", int]], logits: torch.Tensor,
                        target_rows: Dict["SeqPlan", torch.Tensor]) -> Dict["SeqPlan", SampleResult]:
        """One token per sequence from q* over the full vocabulary; α and diagnostics recorded."""
        from sarathi.optimal_sampling.engine import OptimalRow, sample_rows

        out: Dict[SeqPlan, SampleResult] = {}
        try:
            rows = [OptimalRow(logits[i], target_rows[p], p.req.params.optimal_sampling.fixed_alpha,
                               p.req.params.optimal_sampling.tol, p.seq.data.generator,
                               tuple(p.seq.blocked_token_ids), p.req.params.logprobs) for p, i in optimal]
            results = sample_rows(rows, self.generator)
        except Exception as e:  # noqa: BLE001 - fail these requests, keep the rest of the batch
            logger.exception("optimal sampling failed")
            for p, _ in optimal:
                self.fail_request(p.req.request_id, f"optimal sampling failed: {type(e).__name__}: {e}")
            return out
        for (p, _), (res, alpha, diag) in zip(optimal, results):
            p.seq.data.alpha_history.append(alpha)
            p.seq.data.diagnostics.append(diag)
            out[p] = res
        return out

    def fail_request(self, request_id: str, message: str) -> None:
        """End a request with an error that its client sees; the rest of the engine goes on."""
        req = self.requests.get(request_id)
        if req is None:
            return
        self.abort_request(request_id)
        self._pending_outputs[-1].error = message

    def _finish(self, req: Request, seq: Sequence) -> None:
        self._free(seq)
        if all(s.is_finished for s in req.seqs):
            req.finished = True
            req.metrics.finished_time = time.monotonic()
            self.counters["requests_finished_total"] += 1

    def close(self) -> None:
        """Release the KV cache now; the engine cannot run afterwards."""
        self.runner.close()
        for target in self.targets.values():
            target.close()

    # ---- stats ---------------------------------------------------------------
    def get_stats(self) -> Dict[str, float]:
        running = len(self.scheduler.running)
        waiting = len(self.scheduler.waiting)
        stats = {
            "num_running": running, "num_waiting": waiting,
            "num_waiting_requests": len({s.request_id for s in self.scheduler.waiting}), "kv_usage": self.kv.usage,
            "kv_blocks_total": self.kv.num_blocks, "kv_blocks_free": self.kv.num_free_blocks,
            "kv_block_tokens": self.kv.block_size,
            "kv_bytes_total": self.kv.num_blocks * self.kv.block_size * self.runner.kv_bytes_per_token,
            "num_preemptions_total": self.scheduler.num_preemptions,
        }
        stats["kv_bytes_used"] = int(stats["kv_bytes_total"] * self.kv.usage)
        stats.update(self.counters)
        stats["prefix_cache_queries"] = self.kv.num_queried_tokens
        stats["prefix_cache_hits"] = self.kv.num_hit_tokens
        stats["prefix_cache_blocks"] = self.kv.num_cached_blocks
        stats["generation_tokens_total"] = self.outputs.generation_tokens
        stats["model_info"] = {"quantization": self.runner.quantization, "kernel_isa": self.runner.kernel_isa,
                               "weight_formats": self.runner.formats}
        stats.update({f"kv_cache_{k}": v for k, v in self.runner.kv_stats().items()})
        if self.runner.lora is not None:
            stats["lora"] = {
                "max_lora": self.runner.lora.max_loras,
                "running": sorted({s.lora_name for s in self.scheduler.running if s.lora_name}),
                "waiting": sorted({s.lora_name for s in self.scheduler.waiting if s.lora_name}),
            }
        stats.update(self._ui_stats())
        return stats

    # ---- the web UI's dashboard (issue 29): to be ported onto the rewritten engine -------------
    def _ui_stats(self) -> Dict[str, list]:
        """`steps`: the last 64 steps' composition, oldest first; `kv_slots`: each slot in use.

        Read from the server's thread while a step may run: work on copies, skip a sequence
        freed meanwhile."""
        sch = self.scheduler
        budget = {"sarathi": getattr(sch, "chunk_size", None),
                  "vllm": getattr(sch, "max_num_batched_tokens", None)}.get(self.config.scheduler)
        recent = list(self.step_stats)[-64:]
        steps = [{"time": s.time, "prefill_tokens": s.num_prefill_tokens, "decode_tokens": s.num_decode_tokens,
                  "num_seqs": s.num_seqs, "step_time_s": s.step_time, "budget": budget} for s in recent]
        slots = []
        for seq in list(sch.running):
            try:
                slots.append({"slot": self.kv.slot(seq.seq_id), "tokens": seq.num_computed_tokens,
                              "blocks": self.kv.blocks_held(seq.seq_id)})
            except KeyError:
                continue
        return {"steps": steps, "kv_slots": sorted(slots, key=lambda s: s["slot"])}
