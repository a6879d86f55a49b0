"""The runner-side component of speculative decoding (`runner.proposer`) and its request
plug-in face (`bind`, `stats`): verifies the drafts a step ran, proposes the next ones, and
adapts each sequence's k to how many of its drafts were accepted."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sarathi.core.sequence import Binding
from sarathi.model_executor.model_runner import InputBatch, ModelRunner, ModelRunnerOutput, SeqPlan
from sarathi.model_executor.sampler import SampleRequest, SampleResult
from sarathi.spec_decode.config import SpeculativeConfig
from sarathi.spec_decode.draft_model import DraftModel
from sarathi.spec_decode.drafting import DraftRun
from sarathi.spec_decode.early_exit import EarlyExitDrafter
from sarathi.spec_decode.ngram import propose_ngram
from sarathi.spec_decode.rejection import Verification, verify

logger = logging.getLogger("sarathi")

# A prompt-lookup sequence whose drafts failed twice running rests 1, 2, 4 ... this many steps.
# Not after one miss: it drafts one token next (k falls to 1), which costs a verified row (about
# a tenth of a step on the embedded model) and is accepted about a third of the time on
# open-ended text; resting after every miss drafted less and gained less
# (docs/speculative-decoding.md).
MAX_BACKOFF_STEPS = 16
# A model drafter that does not pay probes in steps 2, 4 ... this many steps apart, one
# drafted token each. A probe costs about 1.3 plain steps on the embedded model (one pass of
# the first layers, which includes the whole LM head, and one more verified row): 128 keeps
# probing under 1.5 % of the steps (docs/speculative-decoding.md).
MAX_PROBE_INTERVAL = 128
RATE_EMA = 0.3           # weight of a step's acceptance rate in the running rate
LOG_INTERVAL_S = 10.0    # how often the acceptance rate goes to the log while drafts are verified


@dataclass
class SeqSpec:
    """One sequence's speculation state: its current k, a rest after misses, and the draft
    distributions of its pending drafts (model drafts of a sampled row)."""

    k: int
    rest: int = 0
    misses: int = 0
    drafts: List[int] = field(default_factory=list)
    draft_probs: Optional[torch.Tensor] = None


class Speculator:
    """Drafts by prompt lookup (ngram), the model's first layers (early_exit) or a smaller model
    (draft_model), verified exactly."""

    def __init__(self, config: SpeculativeConfig, runner: ModelRunner, draft_model: Optional[DraftModel] = None):
        self.config = config
        self.runner = runner
        self.k = config.num_speculative_tokens
        self.drafter = EarlyExitDrafter(runner, config.num_early_exit_layers) \
            if config.method == "early_exit" else draft_model
        self.seqs: Dict[int, SeqSpec] = {}
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * self.k
        # A model drafter runs its passes for the whole batch at once: it pays only while the
        # acceptance rate beats what a drafted position costs (a fraction of a target pass).
        self.cost = self._draft_cost()
        self.rate = 1.0
        self._skip = 0
        self._probes = 0
        self._logged_at = time.monotonic()
        logger.info(self.describe())

    def _draft_cost(self) -> float:
        """What one drafted position costs, as a fraction of a target pass (0: prompt lookup)."""
        if isinstance(self.drafter, EarlyExitDrafter):
            return self.drafter.num_layers / self.runner.model.args.num_layers
        if self.drafter is not None:
            # a pass costs its weight bytes or, for a small model on a CPU, its per-layer
            # overhead: a Q4_1 draft of a 30-layer target with 30 layers costs about a target pass
            draft, target = self.drafter.runner, self.runner
            return max(draft.weight_bytes() / max(target.weight_bytes(), 1),
                       draft.model.args.num_layers / target.model.args.num_layers)
        return 0.0

    @property
    def num_lookahead_tokens(self) -> int:
        """KV positions past a step a model drafter writes (its KV positions are the target's)."""
        return self.k if self.drafter is not None else 0

    def describe(self) -> str:
        c = self.config
        what = f"ngram n={c.prompt_lookup_min}..{c.prompt_lookup_max}" if c.method == "ngram" else \
            f"early_exit L={self.drafter.num_layers}" if c.method == "early_exit" else f"draft_model {c.model}"
        return f"speculative decoding: {what}, k={self.k}" + \
            (f", off at batch size >= {c.disable_by_batch_size}" if c.disable_by_batch_size else "")

    # ---- request plug-in --------------------------------------------------------
    def bind(self, params, lora_request) -> Binding:
        if getattr(params, "optimal_sampling", None) is not None:
            raise ValueError("optimal_sampling cannot be combined with speculative decoding "
                             "(this engine was started with --speculative-config)")
        return Binding()

    def stats(self, scheduler) -> dict:
        return {"spec_decode_num_drafts_total": self.num_drafts,
                "spec_decode_num_draft_tokens_total": self.num_draft_tokens,
                "spec_decode_num_accepted_tokens_total": self.num_accepted_tokens,
                "spec_decode_num_accepted_tokens_per_pos": list(self.accepted_per_pos)}

    # ---- runner seam -------------------------------------------------------------
    def drop(self, seq_ids: Sequence[int]) -> None:
        for sid in seq_ids:
            self.seqs.pop(sid, None)

    def _request(self, p: SeqPlan, extra: List[int]) -> SampleRequest:
        seq = p.seq
        output = seq.output_token_ids + extra
        blocked = seq.stop_token_ids | seq.eos_token_ids if len(output) < seq.min_tokens else frozenset()
        return SampleRequest(seq.params, seq.prompt_token_ids, output, self.runner.batch.generator(seq),
                             tuple(blocked))

    def verify(self, plan: List[SeqPlan], rows: Dict[SeqPlan, torch.Tensor], batch: InputBatch,
               out: ModelRunnerOutput) -> None:
        items = []
        for p in plan:
            state = self.seqs.get(p.seq.seq_id)
            q = None
            if state is not None and state.draft_probs is not None and \
                    state.drafts[:len(p.draft_token_ids)] == p.draft_token_ids:
                q = state.draft_probs[:len(p.draft_token_ids)]
            reqs = [self._request(p, p.draft_token_ids[:j]) for j in range(len(p.draft_token_ids) + 1)]
            items.append(Verification(rows[p], p.draft_token_ids, q, reqs))
        plan, items, bitmasks = self._grammar_masks(plan, items, out)
        if not plan:
            return
        step_drafted = step_accepted = 0
        verified = verify(items, batch.shared, bitmasks)
        self._advance_grammars(plan, verified, out)
        for p, kept in zip(plan, verified):
            if p.seq.seq_id in out.failed:
                continue
            sid, k = p.seq.seq_id, len(p.draft_token_ids)
            out.samples[sid], out.verified[sid] = kept[0], kept[1:]
            accepted = len(kept) - 1
            self.num_drafts += 1
            self.num_draft_tokens += k
            self.num_accepted_tokens += accepted
            for j in range(accepted):
                self.accepted_per_pos[j] += 1
            step_drafted += k
            step_accepted += accepted
            self._adapt(sid, k, accepted)
        self._record_step(step_drafted, step_accepted)
        if time.monotonic() - self._logged_at >= LOG_INTERVAL_S:
            self._logged_at = time.monotonic()
            logger.info(self.summary())

    def _record_step(self, drafted: int, accepted: int) -> None:
        """The running acceptance rate a model drafter is gated by (_draft_cap); a probe that
        hit brings the next probe to the next step (easy text may have begun)."""
        if drafted:
            self.rate = (1 - RATE_EMA) * self.rate + RATE_EMA * accepted / drafted
            if accepted:
                self._probes = self._skip = 0

    def _grammar_masks(self, plan: List[SeqPlan], items: List[Verification], out: ModelRunnerOutput):
        """Each mask's bitmask over the 1 + k positions of every row (as plain sampling masks one);
        a mask that fails fails the sequences it constrains, the rest verify."""
        bitmasks = []
        for m in self.runner.masks:
            try:
                allowed = m.bitmask([p.seq for p in plan], [p.draft_token_ids for p in plan])
                if allowed is not None:
                    bitmasks.append(allowed)
            except Exception as e:  # noqa: BLE001
                logger.exception("logits mask failed on drafts")
                keep = [i for i, p in enumerate(plan) if not m.claims(p.seq)]
                for p in plan:
                    if m.claims(p.seq):
                        out.failed[p.seq.seq_id] = f"{type(e).__name__}: {e}"
                if len(keep) < len(plan):   # row numbers change: masks so far are redone
                    plan, items = [plan[i] for i in keep], [items[i] for i in keep]
                    return self._grammar_masks(plan, items, out) if plan else ([], [], [])
        return plan, items, bitmasks

    def _advance_grammars(self, plan: List[SeqPlan], verified: List[List[SampleResult]],
                          out: ModelRunnerOutput) -> None:
        """The masks learn the kept tokens, a position at a time for all rows."""
        seqs = [p.seq for p in plan]
        for j in range(max((len(kept) for kept in verified), default=0)):
            at = [n for n, kept in enumerate(verified) if len(kept) > j and seqs[n].seq_id not in out.failed]
            for m in self.runner.masks:
                try:
                    refused = m.accept([seqs[n] for n in at], [verified[n][j].token_id for n in at])
                except Exception as e:  # noqa: BLE001
                    logger.exception("logits mask failed to take the verified tokens")
                    refused = {seqs[n].seq_id: f"{type(e).__name__}: {e}" for n in at if m.claims(seqs[n])}
                for sid, why in refused.items():
                    out.failed[sid] = why

    def summary(self) -> str:
        rate = self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
        mean = 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0
        per_pos = ", ".join(f"{n / self.num_drafts:.2f}" if self.num_drafts else "0" for n in self.accepted_per_pos)
        return (f"speculative decoding: {self.num_drafts} drafts, {self.num_draft_tokens} draft tokens, acceptance "
                f"rate {rate:.1%}, {mean:.2f} tokens per verifying step; accepted by position: {per_pos}")

    def _adapt(self, sid: int, k: int, accepted: int) -> None:
        """Acceptance-driven k: twice as many after a fully accepted draft (a copied span is
        long, and the rows after the first cost little), else what was accepted plus one; after
        drafts that failed twice running, rest 1, 2, 4 ... 16 steps (a miss costs the step its
        verified positions; a model drafter is gated for the whole batch instead, _draft_cap)."""
        state = self.seqs.setdefault(sid, SeqSpec(self.k))
        state.k = min(2 * k, self.k) if accepted == k else max(accepted + 1, 1)
        if accepted == 0:
            state.misses += 1
            state.rest = min(2 ** (state.misses - 2), MAX_BACKOFF_STEPS) \
                if self.drafter is None and state.misses >= 2 else 0
        else:
            state.misses = 0
        state.drafts, state.draft_probs = [], None

    def propose(self, plan: List[SeqPlan], out: ModelRunnerOutput) -> None:
        limit = self.config.disable_by_batch_size
        if limit is not None and len(plan) >= limit:
            return
        cap = self._draft_cap()
        if cap == 0:
            return
        wanted: List[Tuple[SeqPlan, List[int], int]] = []
        for p in plan:
            seq, sid = p.seq, p.seq.seq_id
            if sid not in out.samples or self._claimed(seq):
                continue
            state = self.seqs.setdefault(sid, SeqSpec(self.k))
            if state.rest > 0:
                state.rest -= 1
                continue
            new = [out.samples[sid].token_id] + [r.token_id for r in out.verified.get(sid, ())]
            if any(t in seq.eos_token_ids or t in seq.stop_token_ids for t in new):
                continue   # it may stop here (the scheduler decides): no drafts spent on it
            room = seq.max_tokens - len(seq.output_token_ids) - len(new) - 1
            k = min(state.k, room, cap)
            if k <= 0:
                continue
            wanted.append((p, seq.prompt_token_ids + seq.output_token_ids + new, k))
        if not wanted:
            return
        if self.drafter is None:
            c = self.config
            drafted = [(propose_ngram(tokens, k, c.prompt_lookup_min, c.prompt_lookup_max), None)
                       for _, tokens, k in wanted]
            for (p, _, _), (drafts, _) in zip(wanted, self._allowed(wanted, drafted)):
                if drafts:
                    out.draft_token_ids[p.seq.seq_id] = drafts
            return
        # only into KV positions the scheduler mapped
        wanted = [(p, tokens, min(k, p.mapped_len - (len(tokens) - 1))) for p, tokens, k in wanted]
        wanted = [w for w in wanted if w[2] > 0]
        if not wanted:
            return
        requests = [self._request(p, tokens[len(p.seq.token_ids()):]) for p, tokens, _ in wanted]
        shared = self.runner.batch.shared
        if isinstance(self.drafter, EarlyExitDrafter):
            runs = [DraftRun(p.run.slot, p.run.block_table, p.run.lora_name, len(tokens) - 1, tokens[-1:], k, r)
                    for (p, tokens, k), r in zip(wanted, requests)]
            drafted = self.drafter.draft(runs, shared)
        else:
            drafted = self.drafter.draft(wanted, requests, shared)
        for (p, _, _), (drafts, q) in zip(wanted, self._allowed(wanted, drafted)):
            if not drafts:
                continue
            sid = p.seq.seq_id
            out.draft_token_ids[sid] = drafts
            state = self.seqs[sid]
            state.drafts, state.draft_probs = drafts, q

    def _draft_cap(self) -> int:
        """The most tokens a sequence may draft this step. A model drafter whose acceptance rate
        does not cover its cost drafts only in probe steps, 2, 4 ... MAX_PROBE_INTERVAL steps
        apart, one token each, to notice when the text turns easy; not even those when a
        drafted position costs a whole target pass (no rate can pay for it, and a probe costs
        the draft's catching up on the tokens it has not seen)."""
        if self.drafter is None or self.rate >= self.cost:
            self._probes = self._skip = 0
            return self.k
        if self.cost >= 1.0:
            return 0
        if self._skip > 0:
            self._skip -= 1
            return 0
        self._probes += 1
        self._skip = min(2 ** self._probes, MAX_PROBE_INTERVAL)
        return 1

    def _allowed(self, wanted, drafted):
        """Drafts cut before the first token a mask (a grammar) refuses after the tokens so far."""
        if not self.runner.masks:
            return drafted
        seqs = [p.seq for p, _, _ in wanted]
        keep = [len(d) for d, _ in drafted]
        for m in self.runner.masks:
            allowed = m.allowed_prefix(seqs, [d[:n] for (d, _), n in zip(drafted, keep)])
            keep = [min(a, b) for a, b in zip(keep, allowed)]
        return [(d[:n], None if q is None or n == 0 else q[:n]) for (d, q), n in zip(drafted, keep)]

    def _claimed(self, seq) -> bool:
        """Another model draws this sequence's tokens (optimal sampling): no drafts for it."""
        return any(m.claims(seq) for m in self.runner.second_models)

    def close(self) -> None:
        pass
