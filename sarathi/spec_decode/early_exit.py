"""Self-speculative drafts: the served model's first L layers, then its own final norm and
LM head (LayerSkip / Draft & Verify without retraining). The draft reads and writes the
target's KV of layers < L; what it writes at drafted positions is overwritten when the
target verifies them, so nothing is copied and no memory is added."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from sarathi.model_executor.model_runner import ModelRunner, RunSeq
from sarathi.model_executor.sampler import SampleRequest, draw, processed_logits, sampling_probs

# Measured on the embedded SmolLM2-135M (30 layers), benchmarks/spec_decode.py --sweep-layers:
# greedy acceptance of the first draft token by L. The default is the fraction that paid best.
DEFAULT_EXIT_FRACTION = 0.5


def default_exit_layers(num_layers: int) -> int:
    return max(1, min(num_layers - 1, round(num_layers * DEFAULT_EXIT_FRACTION)))


class EarlyExitDrafter:
    def __init__(self, runner: ModelRunner, num_layers: Optional[int]):
        total = runner.model.args.num_layers
        self.num_layers = default_exit_layers(total) if num_layers is None else num_layers
        if not 1 <= self.num_layers < total:
            raise ValueError(f"--speculative-config: num_early_exit_layers must be in [1, {total - 1}] for this "
                             f"model ({total} layers), got {self.num_layers}")
        self.runner = runner

    def draft(self, runs: List[Tuple[RunSeq, List[int], int, SampleRequest]],
              shared: torch.Generator) -> List[Tuple[List[int], Optional[torch.Tensor]]]:
        """runs: (the sequence's run this step, its tokens so far, how many to draft, its sampling
        request). One forward of the first L layers per drafted position, all sequences together.
        Returns each sequence's drafts and, where it samples, the distributions they came from."""
        drafts: List[List[int]] = [[] for _ in runs]
        probs: List[List[torch.Tensor]] = [[] for _ in runs]
        last = [tokens[-1] for _, tokens, _, _ in runs]
        for j in range(max(k for _, _, k, _ in runs)):
            active = [i for i, (_, _, k, _) in enumerate(runs) if k > j]
            seqs = [RunSeq(runs[i][0].slot, [last[i]], len(runs[i][1]) - 1 + j, (0, 1), runs[i][0].block_table,
                           runs[i][0].lora_name) for i in active]
            logits = self.runner.forward([(seqs, 0, self.runner.kv_backend)], num_layers=self.num_layers)
            reqs = []
            for i in active:
                r = runs[i][3]
                reqs.append(SampleRequest(r.params, r.prompt_ids, r.output_ids + drafts[i], r.generator))
            processed = processed_logits(logits, reqs)
            chosen = processed.argmax(dim=-1).tolist()
            sampled = [n for n, r in enumerate(reqs) if not r.params.greedy]
            if sampled:
                p = sampling_probs(processed[sampled], [reqs[n] for n in sampled])
                picks = draw(p, [reqs[n].generator or shared for n in sampled])
                for m, n in enumerate(sampled):
                    chosen[n] = picks[m]
                    probs[active[n]].append(p[m])
            for n, i in enumerate(active):
                drafts[i].append(chosen[n])
                last[i] = chosen[n]
        return [(d, torch.stack(q) if q else None) for d, q in zip(drafts, probs)]
