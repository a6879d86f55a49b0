"""A smaller model with the same tokenizer as the draft (`"method": "draft_model"`): its own
runner and its own KV in vAttention slots that mirror the served model's (the scheduler's
slot operations reach it through `runner.second_models`: a freed slot frees its pages).

It keeps, per slot, the tokens its KV holds; before drafting it feeds whatever of the
sequence it has not seen (the whole prompt the first time, after a preemption, or the
tokens verified since its last draft), so a rejected draft costs nothing to undo and a
prefix-cache hit of the served model needs nothing from it."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from sarathi.model_executor.model_loader import load_hf_config, resolve_model_dir
from sarathi.model_executor.model_runner import ModelRunner, ModelRunnerOutput, SeqPlan
from sarathi.model_executor.models import model_args
from sarathi.spec_decode.drafting import DraftRun, draft

logger = logging.getLogger("sarathi")


def load_draft_model(config, runner: ModelRunner, tokenizer, model: str) -> "DraftModel":
    """The draft's runner, after checking that it speaks the served model's vocabulary."""
    from sarathi.transformers_utils.tokenizer import get_tokenizer

    draft_dir = resolve_model_dir(model)
    draft_vocab = get_tokenizer(draft_dir, config.model_config.patch_tokenizer).get_vocab()
    if draft_vocab != tokenizer.get_vocab():
        raise ValueError(f"--speculative-config: the draft model {model!r} has a different tokenizer than the "
                         "served model; drafts must be token ids of the same vocabulary")
    args = model_args(load_hf_config(draft_dir))
    spec = runner.mirror_kv_spec(args.num_layers, args.num_kv_heads, args.head_dim)
    # the draft is loaded as its checkpoint is (GGUF blocks stay blocks), whatever --quantization
    # the served model was given: a float target with a quantized draft is the usual pairing
    dconfig = config.replace(model=model, enable_lora=False, lora_modules=None, optimal_sampling_target=None,
                             speculative_config=None, quantization="auto")
    draft_runner = ModelRunner(dconfig, draft_dir, max_model_len=runner.max_model_len, kv_spec=spec)
    if draft_runner.vocab_size != runner.vocab_size:
        raise ValueError(f"--speculative-config: the draft model has {draft_runner.vocab_size} logits, the served "
                         f"model {runner.vocab_size}")
    logger.info("draft model %s: %s weights, KV %.0f MB", draft_dir, draft_runner.formats, spec.kv_cache_memory / 1e6)
    return DraftModel(draft_runner)


class DraftModel:
    """model_runner.SecondModel for the slot operations (it claims no sequence), plus `draft`."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.runners = [runner]
        self.seen: Dict[int, List[int]] = {}   # slot -> the tokens whose KV the draft holds

    def draft(self, wanted: List[Tuple[SeqPlan, List[int], int]], requests, shared: torch.Generator
              ) -> List[Tuple[List[int], Optional[torch.Tensor]]]:
        runs = []
        for (p, tokens, k), request in zip(wanted, requests):
            seen = self.seen.get(p.run.slot, [])
            n = min(len(seen), len(tokens) - 1)
            differ = np.flatnonzero(np.asarray(seen[:n]) != np.asarray(tokens[:n]))   # rejected drafts
            common = int(differ[0]) if differ.size else n
            runs.append(DraftRun(p.run.slot, p.run.block_table, None, common, tokens[common:], k, request))
        runner = self.runner
        out = draft(lambda seqs, prefills: runner.forward([(seqs, prefills, runner.kv_backend)]), runs, shared)
        for (p, tokens, _), (drafts, _) in zip(wanted, out):
            self.seen[p.run.slot] = tokens + drafts[:-1]
        return out

    # ---- model_runner.SecondModel ------------------------------------------------------
    def claims(self, seq) -> bool:
        return False

    def extra_groups(self, plan, num_prefills):
        return []

    def sample(self, plan, rows, extra_logits, shared, generators, out: ModelRunnerOutput) -> None:
        pass

    def free_slot(self, slot: int) -> None:
        self.seen.pop(slot, None)
        self.runner.kv_backend.free_slot(slot)

    def release_front(self, slot: int, pages: int) -> None:
        self.runner.kv_backend.release_front(slot, pages)

    def close(self) -> None:
        self.runner.close()
