"""Where a serving step's time goes: cProfile over engine steps at a fixed batch.

    .venv/bin/python benchmarks/profile_decode.py --batch 32 --prompt-len 256 --steps 20

Admits `--batch` requests of random `--prompt-len`-token prompts, runs until all are
decoding, then profiles `--steps` decode steps and groups the time by stage (model
matmuls, attention, sampler, detokenizer, scheduler, the rest). Prints a table and
writes benchmarks/results/profile-decode.json.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptivocab.outdir import write_result_file  # noqa: E402

# (stage, substrings of "file:function" whose *own* time belongs to it), first match wins.
# Tensor arithmetic written as operators (x * y) has no profile entry of its own: it is
# counted in the Python function that does it (the model's forward functions).
STAGES = [
    ("matmul (linear layers, lm_head)", ("_nn.linear", "matmul", ".mm>", "addmm", "bmm")),
    ("attention + KV cache", ("_C.attention", "attention_reference", "scaled_dot_product", "kv_cache")),
    ("logits gather + sampler", ("sampler.py", "softmax", "topk", "sort", "multinomial", "argmax",
                                 "torch.stack", "'sum'", "'clone'")),
    ("detokenizer", ("detokenizer.py", "tokenizers", "decode")),
    ("scheduler + KV accounting", ("scheduler.py", "kv_manager.py", "sequence.py")),
    ("other tensor ops (norms, RoPE, SiLU, elementwise)", ("silu", "models/llama.py", "'mean'", "'pow'",
                                                           "rsqrt", "torch.cat", "split", "contiguous")),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--engine-args", default="", help="extra engine flags as k=v pairs, e.g. chunk_size=256")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "profile-decode.json"))
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does (see api_server.main)

    from sarathi import SamplingParams
    from sarathi.config import EngineConfig
    from sarathi.engine.llm_engine import LLMEngine

    extra = dict(kv.split("=", 1) for kv in args.engine_args.split()) if args.engine_args else {}
    engine = LLMEngine(EngineConfig.from_kwargs(model=args.model, max_num_seqs=max(args.batch, 1), **extra))
    rng = random.Random(0)
    vocab = engine.runner.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 64, ignore_eos=True)
    for i in range(args.batch):
        ids = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
        engine.add_request(f"r{i}", None, params, prompt_token_ids=ids)
    # prefill everything (and one warm decode) outside the profile
    while any(s.is_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(args.steps):
        engine.step()
    prof.disable()
    wall = time.perf_counter() - t0

    stats = pstats.Stats(prof)
    stage_time = {name: 0.0 for name, _ in STAGES}
    stage_time["python (engine loop, outputs)"] = 0.0
    for (file, _line, func), (_cc, _nc, own, _cum, _callers) in stats.stats.items():
        where = f"{file}:{func}"
        for name, keys in STAGES:
            if any(k in where for k in keys):
                stage_time[name] += own
                break
        else:
            stage_time["python (engine loop, outputs)"] += own
    profiled = sum(stage_time.values())
    step_ms = 1e3 * wall / args.steps
    print(f"decode steps at batch {args.batch}, context ~{args.prompt_len}: {step_ms:.1f} ms/step "
          f"= {args.batch / (wall / args.steps):.1f} output tok/s (wall time under cProfile)")
    print(f"{'stage':<52}{'share':>8}")
    rows = sorted(stage_time.items(), key=lambda kv: -kv[1])
    for name, t in rows:
        print(f"{name:<52}{100 * t / profiled:>7.1f}%")
    write_result_file(args.out, json.dumps({"batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps,
                                            "ms_per_step_profiled": step_ms,
                                            "share": {k: v / profiled for k, v in rows}}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
