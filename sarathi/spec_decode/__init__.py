"""Speculative decoding: a proposer drafts the next tokens of a sequence after a step samples,
the scheduler runs them as extra positions of that sequence's next decode, and the runner
verifies them all in one forward (greedy: the target's argmax; sampling: modified rejection
sampling), so the output is exactly what decoding without speculation gives.

`config` (no torch, read by `sarathi.config`), `ngram` (prompt lookup), `drafting` (drafting
with a model, a position at a time), `early_exit` (the served model's first layers as the
draft), `draft_model` (a smaller model with its own KV in mirrored slots), `rejection`
(verification), `speculator` (the runner-side component the engine plugs in)."""
