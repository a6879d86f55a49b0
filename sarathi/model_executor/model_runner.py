"""Runs one scheduled step through the model: applies the step's memory operations, builds
the flat batch, runs the forward pass and samples.

The runner never decides policy: it gets the scheduler's output (sequences, token counts,
slots, block tables, memory operations) and returns what it sampled. Per-sequence sampling
state (seeded generators) lives here, in the input batch, between steps.

Plug-in points (set by the engine, imported by nothing here):
- `adapters`: activates per-row weights for a step's rows (the LoRA manager);
- `second_models`: components that bring rows of another model into the step and draw the
  tokens of the sequences they claim (optimal sampling's target; a draft model next);
- `masks`: components that say, in one token bitmask for all their rows, what the sequences
  they constrain may sample next (the sampler's pass applies it), and learn the tokens drawn
  (structured outputs' grammars);
- `proposer`: a component that verifies the draft tokens a sequence runs this step (it gets
  their 1 + k logits rows) and proposes drafts for the next step once every token is drawn
  (speculative decoding).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from sarathi.config import EngineConfig, torch_dtype
from sarathi.model_executor.kv_cache import KVBackend, KVCacheSpec, StepBatch, kv_backend_class
from sarathi.model_executor.layers.linear import Linear
from sarathi.model_executor.model_loader import gguf_source, load_hf_config, load_model, pick_quantization
from sarathi.model_executor.sampler import SampleRequest, SampleResult, apply_token_bitmask, prompt_logprobs, sample
from vattention_ext.threads import set_native_threads

_DEFAULT_THREADS = torch.get_num_threads()  # torch's default (the cores), before a runner changes it

logger = logging.getLogger("sarathi")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class RunSeq:
    """One sequence of a step, in batch order (prefills first)."""

    slot: int
    token_ids: List[int]        # the tokens to run this step
    context_len: int            # tokens already in the cache
    logits_rows: Tuple[int, int]  # which of this sequence's rows to return logits for: [start, end)
    block_table: Optional[List[int]] = None
    lora_name: Optional[str] = None   # the LoRA adapter this sequence runs with (None: the base)

    @property
    def num_logits(self) -> int:
        return self.logits_rows[1] - self.logits_rows[0]


@dataclass(eq=False)
class SeqPlan:
    """One scheduled sequence of a step: the forward's input and what to do with its logits."""

    seq: Any                      # core.sequence.Sequence
    run: RunSeq
    samples: bool                 # the chunk ends at the last token: sample the next one
    want_prompt_logprobs: bool
    draft_token_ids: List[int] = field(default_factory=list)   # run after the last token, to verify
    mapped_len: int = 0           # KV positions mapped for this sequence (scheduler lookahead; 0: unknown)


# A group of rows that runs in one forward pass: (sequences, how many are prefills, their KV).
Group = Tuple[List[RunSeq], int, KVBackend]


@dataclass
class ModelRunnerOutput:
    """What one step produced, by seq_id (vLLM's ModelRunnerOutput, per sequence)."""

    sampled_token_ids: Dict[int, int] = field(default_factory=dict)
    samples: Dict[int, SampleResult] = field(default_factory=dict)       # the token's logprob, rank, top-N
    # Speculating sequences: the tokens verified after the first (accepted drafts, then the
    # target's own token), and the drafts proposed for the next step.
    verified_token_ids: Dict[int, List[int]] = field(default_factory=dict)
    verified: Dict[int, List[SampleResult]] = field(default_factory=dict)
    draft_token_ids: Dict[int, List[int]] = field(default_factory=dict)
    spec_stats: Optional[Any] = None                           # what the proposer counted this step
    prompt_logprobs: Dict[int, List[Dict[int, Tuple[float, int]]]] = field(default_factory=dict)
    token_info: Dict[int, Any] = field(default_factory=dict)   # what a second model adds to a token (e.g. α)
    failed: Dict[int, str] = field(default_factory=dict)       # rows that failed: their requests fail
    error: Optional[str] = None                                # the step failed as a whole
    retain_failed: List[int] = field(default_factory=list)     # cached blocks the backend could not keep


class SecondModel(Protocol):
    """A runner-side component with a model of its own in the step (see the module docstring)."""

    runners: List["ModelRunner"]   # runners it owns (thread split, closing)

    def claims(self, seq) -> bool:
        """This component draws the sequence's tokens (not the plain sampler)."""

    def extra_groups(self, plan: List[SeqPlan], num_prefills: int) -> List[Group]:
        """Rows to compute in the model's own forward, after the step's (same weights)."""

    def sample(self, plan: List[SeqPlan], rows: Dict[SeqPlan, torch.Tensor], extra_logits: torch.Tensor,
               shared: torch.Generator, generators: "InputBatch", out: ModelRunnerOutput) -> None:
        """Draw the tokens of the sequences it claims (those it sets in out.samples)."""

    def free_slot(self, slot: int) -> None: ...

    def release_front(self, slot: int, pages: int) -> None:
        """The served model's sliding window passed these pages of `slot` (see KVBackend)."""

    def close(self) -> None: ...


class LogitsMask(Protocol):
    """A runner-side component that constrains what some sequences sample (see the module docstring)."""

    def claims(self, seq) -> bool:
        """This component constrains the sequence."""

    def bitmask(self, seqs: Sequence[Any], drafts: Optional[Sequence[Sequence[int]]] = None
                ) -> Optional[Tuple[torch.Tensor, List[int]]]:
        """What the sequences it claims may sample next: an int32 bitmask (bit k of word w allows
        token 32 w + k) whose row i belongs to seqs[i], and the rows it filled (None: none). With
        drafts (speculative decoding) seqs[i] has 1 + len(drafts[i]) rows in turn, row j for the
        position after drafts[i][:j]."""

    def allowed_prefix(self, seqs: Sequence[Any], drafts: Sequence[Sequence[int]]) -> List[int]:
        """How many leading tokens of drafts[i] the sequence may be verified with (len: all)."""

    def accept(self, seqs: Sequence[Any], tokens: Sequence[int]) -> Dict[int, str]:
        """The tokens drawn (tokens[i] for seqs[i]); returns {seq_id: why} for rows that failed."""

    def drop(self, seq_ids: Sequence[int]) -> None:
        """Forget finished sequences."""


class Proposer(Protocol):
    """Speculative decoding's runner-side component (see the module docstring)."""

    def verify(self, plan: List[SeqPlan], rows: Dict[SeqPlan, torch.Tensor], batch: "InputBatch",
               out: ModelRunnerOutput) -> None:
        """Draw the tokens of the plans with drafts (rows[p]: their 1 + k logits rows): the
        first in out.samples, the rest in out.verified; failures in out.failed."""

    def propose(self, plan: List[SeqPlan], out: ModelRunnerOutput) -> None:
        """Drafts for the next step of the sequences that drew tokens (out.draft_token_ids)."""

    def drop(self, seq_ids: Sequence[int]) -> None: ...


class InputBatch:
    """Per-sequence sampling state kept between steps: a seeded request's generator per
    sample (created on first sight, kept across preemption, dropped when it finishes)."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.shared = torch.Generator(device=device).manual_seed(seed)
        self._generators: Dict[int, Optional[torch.Generator]] = {}

    def generator(self, seq) -> Optional[torch.Generator]:
        """The sequence's own generator (None: it draws from the shared one)."""
        if seq.seq_id not in self._generators:
            seed = seq.params.seed
            self._generators[seq.seq_id] = None if seed is None else \
                torch.Generator(device=self.device).manual_seed((seed + seq.index * 1_000_003) % 2**64)
        return self._generators[seq.seq_id]

    def drop(self, seq_ids: Sequence[int]) -> None:
        for sid in seq_ids:
            self._generators.pop(sid, None)


class ModelRunner:
    """The model, its KV backend and the device; `execute` runs one step."""

    def __init__(self, config: EngineConfig, model_dir: Path, max_model_len: Optional[int] = None,
                 kv_spec: Optional[KVCacheSpec] = None):
        """kv_spec overrides the config's KV geometry (a second model sized to mirror the first)."""
        model, cache = config.model_config, config.cache_config
        torch.set_num_threads(config.parallel_config.num_threads or _DEFAULT_THREADS)
        self.hf_config = load_hf_config(model_dir)
        self.max_model_len = max_model_len or model.max_model_len or \
            self.hf_config.get("max_position_embeddings", 2048)
        self.device = pick_device(model.device)
        self.dtype = torch_dtype(model.dtype, self.device.type)
        gguf_path = gguf_source(model.model)
        self.quantization = pick_quantization(model.quantization, self.hf_config, gguf_path)
        self.model = load_model(model_dir, self.hf_config, self.dtype, self.device, self.quantization, gguf_path)
        self.kernel_isa = self._kernel_isa()
        self.formats = self.weight_formats()
        logger.info("model %s: %s weights (%s), %.0f MB, kernels: %s", model_dir.name, self.quantization,
                    self.formats, self.weight_bytes() / 1e6, self.kernel_isa)
        a = self.model.args
        self.vocab_size = a.vocab_size
        self.scale = a.attn_scale
        # A given kv_spec brings the geometry; the attention options stay this model's own.
        attention = dict(sliding_windows=a.sliding_windows, attn_softcap=a.attn_logit_softcap)
        kv_dtype = self._kv_dtype(cache)
        self.kv_spec = dataclasses.replace(kv_spec, **attention) if kv_spec else KVCacheSpec(
            num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, dtype=kv_dtype,
            act_dtype=None if kv_dtype == self.dtype else self.dtype,
            device=self.device, max_model_len=self.max_model_len, max_num_seqs=config.scheduler_config.max_num_seqs,
            kv_cache_memory=cache.kv_cache_memory, block_size=cache.block_size,
            page_size=cache.page_size, async_mapping=cache.async_kv_mapping, **attention)
        self.kv_backend_name = cache.kv_cache_backend
        self.kv_backend: KVBackend = kv_backend_class(cache.kv_cache_backend)(self.kv_spec)
        self.needs_block_tables = self.kv_backend.needs_block_tables
        self.kv_bytes_per_token = self.kv_spec.bytes_per_token
        self.batch = InputBatch(self.device, model.seed)
        self.adapters = None                      # set by the engine: activate(names, rows)
        self.second_models: List[SecondModel] = []
        self.masks: List[LogitsMask] = []
        self.proposer: Optional[Proposer] = None
        self.torch_threads = torch.get_num_threads()

    def _kv_dtype(self, cache) -> torch.dtype:
        """The KV cache's element type: --kv-cache-dtype, or the model's dtype (auto). Another type
        than the model's needs the vattention backend's CPU kernel, which reads it into float32."""
        if cache.kv_cache_dtype == "auto":
            return self.dtype
        kv = torch_dtype(cache.kv_cache_dtype, self.device.type)
        if kv != self.dtype:
            from vattention_ext.kernel import QUERY_DTYPES

            if self.device.type != "cpu" or cache.kv_cache_backend != "vattention" \
                    or kv not in QUERY_DTYPES.get(self.dtype, ()):
                raise ValueError(f"--kv-cache-dtype {cache.kv_cache_dtype} with {str(self.dtype)[6:]} activations "
                                 f"needs the vattention backend on CPU with float32 activations (here: "
                                 f"{cache.kv_cache_backend} on {self.device.type}); use --kv-cache-dtype auto")
        return kv

    # ---- threads --------------------------------------------------------------
    @property
    def native_matmuls(self) -> bool:
        """Every linear layer runs in our native kernels (CPU, all quantized)."""
        linears = self._linears()
        return self.device.type == "cpu" and bool(linears) and all(m.qweight is not None for m in linears)

    def _kernel_isa(self) -> str:
        if self.quantization == "none" or self.device.type != "cpu":
            return "torch"
        from sarathi.model_executor.quantization.kernels import kernel_isa
        return kernel_isa()

    def _linears(self) -> List[Linear]:
        return [m for m in self.model.modules() if isinstance(m, Linear)]

    def weight_formats(self) -> str:
        """The formats of the linear layers' weights, e.g. 'gguf Q4_1, gguf Q8_0'."""
        names = {m.qweight.source if m.qweight is not None else str(self.dtype).replace("torch.", "")
                 for m in self._linears()}
        return ", ".join(sorted(names))

    def weight_bytes(self) -> int:
        """Bytes of the weights a forward pass reads: float parameters plus quantized blocks."""
        floats = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return floats + sum(m.qweight.nbytes() for m in self._linears() if m.qweight is not None)

    # ---- KV geometry -----------------------------------------------------------
    def kv_layout(self) -> Tuple[int, int, int]:
        """(num_blocks, block_size, num_slots) for the scheduler's KVManager."""
        return type(self.kv_backend).layout(self.kv_spec)

    def kv_release_window(self) -> int:
        """The window behind which the scheduler may free blocks (0: it keeps them all). None
        beside a second model with runners of its own: its pages fall elsewhere than ours."""
        if any(model.runners for model in self.second_models):
            return 0
        return type(self.kv_backend).release_window(self.kv_spec)

    def kv_window_layers(self) -> Tuple[int, int]:
        """(sliding layers, layers): what a released window gives back (KVBackend.window_layers)."""
        return type(self.kv_backend).window_layers(self.kv_spec)

    def kv_block_bytes(self) -> Tuple[int, int]:
        """(bytes per block, bytes per token) in one layer: how tokens fall into blocks."""
        return type(self.kv_backend).block_bytes(self.kv_spec)

    def mirror_kv_spec(self, num_layers: int, num_kv_heads: int, head_dim: int) -> KVCacheSpec:
        """A second model's KV geometry in this runner's slots (KVBackend.mirror)."""
        return type(self.kv_backend).mirror(self.kv_spec, num_layers, num_kv_heads, head_dim)

    @property
    def supports_prefix_caching(self) -> bool:
        return self.kv_backend.supports_prefix_caching

    def kv_stats(self) -> Dict[str, int]:
        return self.kv_backend.stats()

    # ---- one step --------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched) -> ModelRunnerOutput:
        """Run a SchedulerOutput: memory operations first, then the forward pass and sampling.
        A failure of the step as a whole is returned in `error`, a failure of some rows in
        `failed`; neither raises."""
        out = ModelRunnerOutput()
        try:
            self._apply_kv_ops(sched.kv_ops, out)
            self.batch.drop(sched.finished_seq_ids)
            for m in self.masks:
                m.drop(sched.finished_seq_ids)
            if self.proposer is not None:
                self.proposer.drop(sched.finished_seq_ids)
            if not sched.prefills and not sched.decodes:
                return out
            plan = [self._plan(item) for item in sched.scheduled]
            num_prefills = len(sched.prefills)
            extras = [m.extra_groups(plan, num_prefills) for m in self.second_models]
            logits = self.forward([([p.run for p in plan], num_prefills, self.kv_backend),
                                   *(g for groups in extras for g in groups)])
        except Exception as e:  # noqa: BLE001 - the step failed: its requests fail, the engine decides the rest
            logger.exception("model step failed")
            out.error = f"{type(e).__name__}: {e}"
            return out
        n_main = sum(p.run.num_logits for p in plan)
        self._prompt_logprobs(plan, logits, out)
        rows = self._last_rows(plan, logits)
        offset = n_main
        for model, groups in zip(self.second_models, extras):
            n = sum(s.num_logits for seqs, _, _ in groups for s in seqs)
            try:
                model.sample(plan, rows, logits[offset:offset + n], self.batch.shared, self.batch, out)
            except Exception as e:  # noqa: BLE001 - fail the sequences it draws for, keep the rest
                logger.exception("second-model sampling failed")
                for p in plan:
                    if p in rows and model.claims(p.seq) and p.seq.seq_id not in out.samples:
                        out.failed.setdefault(p.seq.seq_id, f"{type(e).__name__}: {e}")
            offset += n
        verify = [p for p in plan if p.draft_token_ids and p in rows and p.seq.seq_id not in out.failed]
        if verify:
            self._verify(verify, rows, out)
        self._sample([p for p in plan if p in rows and not p.draft_token_ids and p.seq.seq_id not in out.samples
                      and p.seq.seq_id not in out.failed], rows, out)
        if self.proposer is not None:
            try:
                self.proposer.propose(plan, out)
            except Exception:  # noqa: BLE001 - no drafts this step; the tokens drawn stand
                logger.exception("proposing drafts failed")
                out.draft_token_ids = {}
        out.sampled_token_ids = {sid: r.token_id for sid, r in out.samples.items()}
        out.verified_token_ids = {sid: [r.token_id for r in rs] for sid, rs in out.verified.items()}
        return out

    def _verify(self, plan: List[SeqPlan], rows: Dict[SeqPlan, torch.Tensor], out: ModelRunnerOutput) -> None:
        """The proposer verifies the drafts of `plan`; a failure fails those sequences only."""
        try:
            if self.proposer is None:
                raise RuntimeError("draft tokens were scheduled but no proposer verifies them")
            self.proposer.verify(plan, rows, self.batch, out)
        except Exception as e:  # noqa: BLE001
            logger.exception("verifying drafts failed")
            for p in plan:
                out.samples.pop(p.seq.seq_id, None)
                out.verified.pop(p.seq.seq_id, None)
                out.failed.setdefault(p.seq.seq_id, f"{type(e).__name__}: {e}")

    def _apply_kv_ops(self, ops, out: ModelRunnerOutput) -> None:
        for op in ops:
            op.apply(self.kv_backend)
            for model in self.second_models:
                op.mirror(model)
        out.retain_failed, self.kv_backend.retain_failed = self.kv_backend.retain_failed, []

    def _plan(self, item) -> SeqPlan:
        """What the forward computes for one scheduled sequence, and which logits rows come back."""
        seq, n = item.seq, item.num_scheduled_tokens
        drafts = list(getattr(item, "draft_token_ids", ()))
        start = seq.num_computed_tokens
        samples = item.samples and seq.max_tokens > 0  # max_tokens 0: scoring the prompt only
        want_plp = (seq.params.prompt_logprobs is not None and seq.index == 0 and seq.num_preemptions == 0
                    and start < len(seq.prompt_token_ids) - 1)
        first_row = 0 if want_plp else n - 1 - len(drafts)   # a speculating decode: all 1 + k rows
        last_row = n if (samples or want_plp) else first_row
        run = RunSeq(item.slot, (seq.token_ids() + drafts)[start:start + n], start, (first_row, last_row),
                     item.block_table if self.needs_block_tables else None, seq.lora_name)
        return SeqPlan(seq, run, samples, want_plp, drafts, getattr(item, "mapped_len", 0))

    def forward(self, groups: Sequence[Group], num_layers: Optional[int] = None) -> torch.Tensor:
        """Float32 logits for the requested rows of every group, in order. Every linear layer
        multiplies all groups' rows at once (the weights are read once); each group attends
        over its own KV. num_layers: only the first layers run (then the final norm and LM
        head), writing only their KV."""
        ids: List[int] = []
        positions, spans, lora_names, query_lens = [], [], [], []
        start = 0
        for g_seqs, g_prefills, g_kv in groups:
            batch = StepBatch(
                slots=[s.slot for s in g_seqs], context_lens=[s.context_len for s in g_seqs],
                query_lens=[len(s.token_ids) for s in g_seqs],
                block_tables=[s.block_table for s in g_seqs] if self.needs_block_tables else None,
                num_prefills=g_prefills, device=self.device)
            n = sum(batch.query_lens)
            spans.append((start, start + n, g_kv, g_kv.begin_step(batch)))
            start += n
            ids.extend(t for s in g_seqs for t in s.token_ids)
            positions.append(batch.positions())
            lora_names.extend(s.lora_name for s in g_seqs)
            query_lens.extend(batch.query_lens)
        if self.adapters is not None:
            self.adapters.prepare(lora_names, query_lens)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        scale = self.scale

        if len(spans) == 1:
            _, _, one_kv, one_step = spans[0]

            def attend(layer, q, k, v):
                return one_kv.attend(layer, q, k, v, one_step, scale)
        else:
            def attend(layer, q, k, v):
                return torch.cat([g_kv.attend(layer, q[a:b], k[a:b], v[a:b], step, scale)
                                  for a, b, g_kv, step in spans])

        hidden = self.model(input_ids, positions[0] if len(positions) == 1 else torch.cat(positions), attend,
                            num_layers)
        rows, start = [], 0
        for g_seqs, _, _ in groups:
            for s in g_seqs:
                rows.extend(range(start + s.logits_rows[0], start + s.logits_rows[1]))
                start += len(s.token_ids)
        if not rows:
            return torch.empty(0, self.vocab_size)
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])

    # ---- sampling -------------------------------------------------------------
    def _prompt_logprobs(self, plan: List[SeqPlan], logits: torch.Tensor, out: ModelRunnerOutput) -> None:
        offset = 0
        for p in plan:
            count = p.run.num_logits
            if p.want_prompt_logprobs:
                start, prompt = p.run.context_len, p.seq.prompt_token_ids
                npos = min(len(prompt) - 1 - start, count)  # positions predicting a prompt token
                try:
                    out.prompt_logprobs[p.seq.seq_id] = prompt_logprobs(
                        logits[offset:offset + npos], prompt[start + 1:start + 1 + npos], p.seq.params.prompt_logprobs)
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    logger.exception("prompt logprobs failed")
                    out.failed[p.seq.seq_id] = f"{type(e).__name__}: {e}"
            offset += count

    @staticmethod
    def _last_rows(plan: List[SeqPlan], logits: torch.Tensor) -> Dict[SeqPlan, torch.Tensor]:
        """The logits row each sampling sequence draws its next token from (a speculating
        decode: its 1 + k rows, one per position it verifies)."""
        rows, offset = {}, 0
        for p in plan:
            offset += p.run.num_logits
            if p.samples:
                k = len(p.draft_token_ids)
                rows[p] = logits[offset - 1 - k:offset] if k else logits[offset - 1]
        return rows

    def _sample(self, plan: List[SeqPlan], rows: Dict[SeqPlan, torch.Tensor], out: ModelRunnerOutput) -> None:
        """One token per sequence with the plain sampler, after the masks (grammars) restricted
        their rows; a batch that fails is retried row by row so that only the rows at fault fail."""
        if not plan:
            return
        logits = torch.stack([rows[p] for p in plan])
        for m in self.masks:
            try:
                allowed = m.bitmask([p.seq for p in plan])
                if allowed is not None:
                    apply_token_bitmask(logits, *allowed)
            except Exception as e:  # noqa: BLE001 - the sequences it constrains fail, the rest sample
                logger.exception("logits mask failed")
                keep = [i for i, p in enumerate(plan) if not m.claims(p.seq)]
                for p in plan:
                    if m.claims(p.seq):
                        out.failed[p.seq.seq_id] = f"{type(e).__name__}: {e}"
                plan, logits = [plan[i] for i in keep], logits[keep]
        if not plan:
            return
        reqs = [SampleRequest(p.seq.params, p.seq.prompt_token_ids, p.seq.output_token_ids,
                              self.batch.generator(p.seq), tuple(p.seq.blocked_token_ids)) for p in plan]
        try:
            out.samples.update((p.seq.seq_id, r) for p, r in zip(plan, sample(logits, reqs, self.batch.shared)))
        except Exception:  # noqa: BLE001 - find the rows at fault
            logger.exception("batched sampling failed; sampling row by row")
            for i, (p, r) in enumerate(zip(plan, reqs)):
                try:
                    out.samples[p.seq.seq_id] = sample(logits[i:i + 1], [r], self.batch.shared)[0]
                except Exception as e:  # noqa: BLE001
                    out.failed[p.seq.seq_id] = f"sampling failed: {type(e).__name__}: {e}"
        drawn = [p.seq for p in plan if p.seq.seq_id in out.samples]
        for m in self.masks:
            try:
                refused = m.accept(drawn, [out.samples[s.seq_id].token_id for s in drawn])
            except Exception as e:  # noqa: BLE001
                logger.exception("logits mask failed to take the drawn tokens")
                refused = {s.seq_id: f"{type(e).__name__}: {e}" for s in drawn if m.claims(s)}
            for sid, why in refused.items():
                out.samples.pop(sid, None)
                out.failed[sid] = why

    def close(self) -> None:
        """Release the KV memory now (the engine is shutting down)."""
        self.kv_backend.close()
        for model in self.second_models:
            model.close()


def split_threads(threads: Optional[int], runners: Sequence[ModelRunner]) -> int:
    """The native kernels (attention, quantized linears, LoRA) take `threads`. When every
    linear layer of every model in the process is quantized, the matmuls all run on them and
    torch's own ops (norms, activations, sampling) get one thread: its OpenMP team spins
    after each region and holds the core our pool's helper waits for (measured: +25 %
    decode throughput on 2 cores). Otherwise torch keeps `threads`. Returns torch's count."""
    threads = threads or _DEFAULT_THREADS
    set_native_threads(threads)
    torch_threads = 1 if all(r.native_matmuls for r in runners) else threads
    torch.set_num_threads(torch_threads)
    for r in runners:
        r.torch_threads = torch_threads
    return torch_threads
