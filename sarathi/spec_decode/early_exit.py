"""Self-speculative drafts: the served model's first L layers, then its own final norm and
LM head (LayerSkip / Draft & Verify without retraining). The draft reads and writes the
target's KV of layers < L; what it writes at drafted positions is overwritten when the
target verifies them, so nothing is copied and no memory is added."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from sarathi.model_executor.model_runner import ModelRunner
from sarathi.spec_decode.drafting import DraftRun, draft

# Measured on the embedded SmolLM2-135M (30 layers), whose middle layers were never trained to
# be read by the LM head (benchmarks/spec_decode.py --sweep-layers, results/spec_decode_layers.json:
# greedy acceptance 3-6 % for L = 6..18, 18 % at 22, 31 % at 26). No L pays on it: a draft that
# is accepted often costs nearly a full pass. At L <= 18 the drafts fail at once and the
# sequence rests (speculator.py), so the loss stays within a few per cent; half the layers is
# the default for that reason, and a model trained with early-exit loss (LayerSkip) is where
# this method earns its keep.
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

    def draft(self, runs: List[DraftRun], shared: torch.Generator) -> List[Tuple[List[int], Optional[torch.Tensor]]]:
        """One forward of the first L layers per drafted position, all sequences together; each
        run feeds its last token first (its KV in layers < L is what the target wrote)."""
        runner = self.runner
        return draft(lambda seqs, prefills: runner.forward([(seqs, prefills, runner.kv_backend)],
                                                           num_layers=self.num_layers), runs, shared)
