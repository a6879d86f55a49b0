"""Where a serving step's time goes: cProfile over engine steps at a fixed batch.

    .venv/bin/python benchmarks/profile_decode.py --batch 32 --prompt-len 256 --steps 20

Admits `--batch` requests of random `--prompt-len`-token prompts, runs until all are
decoding, times `--steps` decode steps plainly, then profiles as many and groups the profiled
time by stage (quantized matmuls, attention, RoPE, norms, the model's other Python and
elementwise ops, sampler, detokenizer, scheduler, the rest). The ~ms column spreads the plain
step time by the profiled shares (an estimate: cProfile slows Python more than native calls).
Prints a table and writes benchmarks/results/profile-decode.json.
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
    ("quantized matmuls (native kernel calls)", ("qlinear",)),
    ("float matmuls (torch)", ("_nn.linear", "matmul", ".mm>", "addmm", "bmm")),
    ("attention + KV store (native)", ("vattention_ext._C", "attention_reference", "scaled_dot_product",
                                       "kv_cache", "vattention_ext/kernel.py")),
    ("RoPE (tables + rotation)", ("rope.py", "rope_inplace")),
    ("RMSNorm", ("norm.py", "rms_norm", "rsqrt", "'mean'", "'pow'")),
    ("SiLU, residual adds, views (model Python)", ("silu", "decoder.py", "layers/fused.py", "linear.py", "split",
                                                   "torch.cat", "contiguous", "'view'", "'reshape'", "new_empty")),
    ("logits gather + sampler", ("sampler.py", "softmax", "topk", "sort", "multinomial", "argmax",
                                 "torch.stack", "'sum'", "'clone'")),
    ("detokenizer", ("detokenizer.py", "tokenizers", "decode")),
    ("scheduler + KV accounting", ("scheduler.py", "kv_manager.py", "sequence.py")),
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
    params = SamplingParams(temperature=0.0, max_tokens=2 * args.steps + 64, ignore_eos=True)  # timed + profiled
    for i in range(args.batch):
        ids = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
        engine.add_request(f"r{i}", None, params, prompt_token_ids=ids)
    # prefill everything (and one warm decode) outside the profile
    while any(s.is_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()

    # Wall time without the profiler (cProfile slows Python-heavy code more than native calls).
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    plain_ms = 1e3 * (time.perf_counter() - t0) / args.steps

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
    print(f"decode steps at batch {args.batch}, context ~{args.prompt_len}: {plain_ms:.2f} ms/step = "
          f"{1e3 * args.batch / plain_ms:.1f} output tok/s ({step_ms:.2f} ms/step under cProfile)")
    print(f"{'stage':<52}{'share':>8}{'calls/step':>12}{'~ms/step':>10}")
    rows = sorted(stage_time.items(), key=lambda kv: -kv[1])
    calls = {name: 0 for name in stage_time}
    for (file, _line, func), (_cc, nc, _own, _cum, _callers) in stats.stats.items():
        where = f"{file}:{func}"
        calls[next((name for name, keys in STAGES if any(k in where for k in keys)),
                   "python (engine loop, outputs)")] += nc
    for name, t in rows:
        print(f"{name:<52}{100 * t / profiled:>7.1f}%{calls[name] / args.steps:>12.0f}"
              f"{plain_ms * t / profiled:>10.2f}")
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]
    print("top functions by own time (ms/step under cProfile, calls/step):")
    for (file, line, func), (_cc, nc, own, _cum, _callers) in top:
        print(f"  {1e3 * own / args.steps:7.3f} {nc / args.steps:7.0f}  {Path(file).name}:{line}:{func}")
    write_result_file(args.out, json.dumps({
        "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps, "ms_per_step": plain_ms,
        "ms_per_step_profiled": step_ms, "share": {k: v / profiled for k, v in rows},
        "ms_per_step_by_stage": {k: plain_ms * v / profiled for k, v in rows},
        "calls_per_step": {k: calls[k] / args.steps for k, _ in rows},
        "top_functions": [{"where": f"{Path(f).name}:{ln}:{fn}", "own_ms_per_step_profiled": 1e3 * own / args.steps,
                           "calls_per_step": nc / args.steps} for (f, ln, fn), (_c, nc, own, _u, _r) in top],
    }, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
