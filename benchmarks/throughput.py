"""Offline throughput: the engine vs HF transformers `generate` on the same requests, same run.

Workloads (random token prompts, ignore_eos so every request produces its full length):
  decode  64 requests, prompts 32-128 tokens, 256 output tokens
  mixed   64 requests, prompts 64-512 tokens, 128 output tokens
  single  1 request, 128-token prompt, 128 output tokens (single-stream decode)
  decode64 steady decode rate with 64 running sequences (for MFU)

Also measures this machine's fp32 matmul peak in the same run and reports model FLOP
utilisation (MFU) from the model's own FLOP count. Saves JSON + PNG.

  python benchmarks/throughput.py                      # full run (~15 min on 2 cores)
  python benchmarks/throughput.py --scale 0.25         # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sarathi import LLM, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak(seconds: float = 3.0, n: int = 2048) -> float:
    """Best fp32 GFLOP/s of a square matmul on this machine, now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def flops_per_token(args, context: float) -> float:
    """Matmul FLOPs of one token: 2 x linear weights (incl. LM head) + attention over `context`."""
    h, L = args.hidden_size, args.num_layers
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    linear = L * (h * (q + 2 * kv) + q * h + 3 * h * args.intermediate_size) + h * args.vocab_size
    attention = L * 4 * context * q
    return 2 * linear + attention


def make_workload(name: str, vocab: int, scale: float, rng: random.Random):
    n = max(1, int(64 * scale))
    if name == "decode":
        lens, out = [rng.randint(32, 128) for _ in range(n)], 256
    elif name == "mixed":
        lens, out = [rng.randint(64, 512) for _ in range(n)], 128
    elif name == "single":
        lens, out = [128], 128
    else:
        raise ValueError(name)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(k)] for k in lens]
    return prompts, out


def run_engine(llm: LLM, prompts, out_len: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    eng = llm.engine
    eng.step_stats.clear()
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "total_tok_s": (n_out + sum(map(len, prompts))) / dt}


def run_hf(model, prompts, out_len: int, batch: int, pad_id: int) -> dict:
    n_out, t = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        width = max(map(len, group))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=out_len,
                                 min_new_tokens=out_len, do_sample=False, pad_token_id=pad_id)
        n_out += (out.shape[1] - width) * len(group)
    dt = time.perf_counter() - t
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "total_tok_s": (n_out + sum(map(len, prompts))) / dt}


def steady_decode(llm: LLM, num_seqs: int, context: int, steps: int, rng: random.Random) -> dict:
    """Decode-only steps with num_seqs running sequences; tokens/s and step time."""
    eng = llm.engine
    vocab = eng.runner.vocab_size
    for i in range(num_seqs):
        eng.add_request(f"steady-{i}", None, SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True),
                        prompt_token_ids=[rng.randrange(100, vocab - 100) for _ in range(context)])
    while eng.scheduler.waiting or any(s.is_prefill for s in eng.scheduler.running):
        eng.step()
    eng.step()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    dt = time.perf_counter() - t
    eng.abort_request([f"steady-{i}" for i in range(num_seqs)])
    eng.step()
    return {"num_seqs": num_seqs, "context": context, "step_ms": 1000 * dt / steps, "tok_s": num_seqs * steps / dt}


def profile_step(llm: LLM, num_seqs: int, context: int, rng: random.Random) -> list:
    """Where the time of a decode step goes (torch profiler, top ops)."""
    from torch.profiler import ProfilerActivity, profile

    eng = llm.engine
    vocab = eng.runner.vocab_size
    for i in range(num_seqs):
        eng.add_request(f"prof-{i}", None, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True),
                        prompt_token_ids=[rng.randrange(100, vocab - 100) for _ in range(context)])
    while eng.scheduler.waiting or any(s.is_prefill for s in eng.scheduler.running):
        eng.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            eng.step()
    eng.abort_request([f"prof-{i}" for i in range(num_seqs)])
    eng.step()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--kv-cache-backend", default="vattention")
    ap.add_argument("--quantization", default="none",
                    help="engine weights (default none: fp32, like the HF baseline); see --quantization")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 64 requests to run")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--workloads", default="decode,mixed,single")
    ap.add_argument("--out", default=str(RESULTS / "throughput.json"))
    ns = ap.parse_args()
    rng = random.Random(0)
    threads = torch.get_num_threads()
    llm = LLM(model=ns.model, quantization=ns.quantization, kv_cache_backend=ns.kv_cache_backend,
              max_model_len=2048, max_num_seqs=64,
              kv_cache_memory="4GiB", chunk_size=512)
    args = llm.engine.runner.model.args
    vocab = args.vocab_size
    peak = matmul_peak()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s ({threads} threads)")
    results = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
                           "matmul_peak_gflops": peak},
               "model": ns.model, "kv_cache_backend": ns.kv_cache_backend, "workloads": {}}
    hf = None
    if not ns.skip_hf:
        from transformers import LlamaForCausalLM
        hf = LlamaForCausalLM.from_pretrained(str(llm.engine.model_dir), torch_dtype=torch.float32).eval()
    pad = llm.engine.tokenizer.eos_token_id or 0
    for name in ns.workloads.split(","):
        prompts, out_len = make_workload(name, vocab, ns.scale, rng)
        llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=4))  # warm-up
        eng_res = run_engine(llm, prompts, out_len)
        row = {"requests": len(prompts), "output_len": out_len, "engine": eng_res}
        if hf is not None:
            hf_res = run_hf(hf, prompts, out_len, 1 if name == "single" else ns.hf_batch, pad)
            row["hf"] = hf_res
            row["speedup"] = eng_res["output_tok_s"] / hf_res["output_tok_s"]
        results["workloads"][name] = row
        print(f"{name:7s} engine {eng_res['output_tok_s']:7.1f} out tok/s"
              + (f" | HF {row['hf']['output_tok_s']:6.1f} | x{row['speedup']:.2f}" if hf is not None else ""))
    n_steady = max(1, int(64 * ns.scale))
    steady = steady_decode(llm, n_steady, 128, 20, rng)
    flops = flops_per_token(args, context=128 + 10)
    steady["gflops"] = steady["tok_s"] * flops / 1e9
    steady["mfu"] = steady["gflops"] / peak
    results["decode64"] = steady
    print(f"decode @{n_steady} seqs: {steady['tok_s']:.1f} tok/s, step {steady['step_ms']:.1f} ms, "
          f"{steady['gflops']:.1f} GFLOP/s = {100 * steady['mfu']:.1f}% of peak")
    results["profile_decode64"] = profile_step(llm, n_steady, 128, rng)
    for r in results["profile_decode64"][:8]:
        print(f"  {r['share'] * 100:5.1f}%  {r['op']}  ({r['calls']} calls)")
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    _plot(results, out.with_suffix(".png"))
    print(f"saved {out} and {out.with_suffix('.png')}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["workloads"])
    eng = [results["workloads"][n]["engine"]["output_tok_s"] for n in names]
    hf = [results["workloads"][n].get("hf", {}).get("output_tok_s", 0) for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - 0.2 for i in x], eng, 0.4, label="sarathi engine")
    ax.bar([i + 0.2 for i in x], hf, 0.4, label="HF generate")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{results['model']} fp32, {results['machine']['torch_threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
