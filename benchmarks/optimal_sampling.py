"""Two-model optimal sampling: the in-engine exact form against the HTTP coordinator over two
of our servers, and the top-k approximation's error against the exact q*.

pi_theta is SmolLM2; pi_t is SmolLM2 plus the LoRA adapter fine-tuned on the Python-docs corpus
(benchmarks/lora_finetune.py writes it), so the two really differ. Prompts are held-out
Python-docs windows.

    .venv/bin/python benchmarks/optimal_sampling.py

Prints tables, writes benchmarks/results/optimal-sampling.json and .png (alpha histogram,
top-k errors).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))

import compare  # noqa: E402  (server start / stop)
from quantized import windows  # noqa: E402


def in_engine(llm, prompts, max_tokens, batch):
    from sarathi import SamplingParams
    from sarathi.sampling_params import OptimalSamplingParams

    params = [SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True,
                             optimal_sampling=OptimalSamplingParams("ft", "auto")) for i in range(len(prompts))]
    t0 = time.perf_counter()
    outs = []
    for start in range(0, len(prompts), batch):
        outs += llm.generate(prompt_token_ids=prompts[start:start + batch], sampling_params=params[start:start + batch])
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    alphas = [a for o in outs for a in o.outputs[0].optimal_sampling.alpha_history]
    return {"batch": batch, "prompts": len(prompts), "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}, alphas


def coordinator(theta_url, t_url, tokenizer, prompts, max_tokens, concurrency, top_k):
    from sarathi.optimal_sampling.coordinator import Coordinator, CoordinatorConfig

    texts = [tokenizer.decode(p) for p in prompts]
    config = CoordinatorConfig(theta_url, t_url, t_model="ft", top_k=top_k, timeout=600)

    async def go():
        async with Coordinator(config, tokenizer) as c:
            t0 = time.perf_counter()
            outs = await c.generate_batch(texts, max_tokens, seed=0, concurrency=concurrency, progress=False)
            return outs, time.perf_counter() - t0
    outs, dt = asyncio.run(go())
    tokens = sum(len(o.generated_tokens) for o in outs)
    return {"batch": concurrency, "prompts": len(prompts), "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt,
            "errors": sum(1 for o in outs if o.error)}


def top_k_table(model, adapter, wins, ks, positions):
    """Exact alpha from full logits (HF + peft) vs the top-k coordinator's approximation."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sarathi.model_executor.model_loader import resolve_model_dir
    from sarathi.optimal_sampling.kl import diagnostics, kl, merge_top_k, q_star, solve_alpha

    base = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(model)), dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor(wins)
        lt = torch.log_softmax(base(ids).logits.double(), -1)
        peft = PeftModel.from_pretrained(base, str(adapter)).eval()
        lh = torch.log_softmax(peft(ids).logits.double(), -1)
    lt, lh = lt.reshape(-1, lt.shape[-1]), lh.reshape(-1, lh.shape[-1])
    pick = torch.linspace(0, lt.shape[0] - 1, positions).long()
    lt, lh = lt[pick], lh[pick]
    exact = solve_alpha(lt, lh, tol=1e-8)
    rows = []
    for k in ks:
        errs, gaps, covered, ess_ratio = [], [], [], []
        for i in range(lt.shape[0]):
            top = lambda lp: {int(j): float(lp[j]) for j in torch.topk(lp, k).indices}  # noqa: E731
            m = merge_top_k(top(lt[i]), top(lh[i]), lt.shape[-1])
            a = float(solve_alpha(m.logp_theta[None], m.logp_t[None], tol=1e-8)[0])
            errs.append(abs(a - float(exact[i])))
            q = torch.zeros_like(lt[i])
            q[m.token_ids] = q_star(m.logp_theta, m.logp_t, a)  # what the coordinator samples from
            lq = torch.where(q > 0, q.log(), torch.full_like(q, float("-inf")))
            gaps.append(abs(kl(lq, lt[i]) - kl(lq, lh[i])))
            covered.append(min(m.covered_theta, m.covered_t))
            d = diagnostics(lt[i], lh[i], a)
            ess_ratio.append(d["ess_ratio"])
        n = len(errs)
        rows.append({"k": k, "alpha_abs_error_mean": sum(errs) / n, "alpha_abs_error_max": max(errs),
                     "kl_symmetry_error_mean": sum(gaps) / n, "covered_mass_mean": sum(covered) / n,
                     "ess_ratio_mean": sum(ess_ratio) / n})
    exact_gap = [abs(diagnostics(lt[i], lh[i], float(exact[i]))["kl_gap"]) for i in range(lt.shape[0])]
    return rows, {"positions": int(lt.shape[0]), "exact_kl_symmetry_error_mean": sum(exact_gap) / len(exact_gap)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", default=str(REPO / ".cache" / "lora-finetune" / "adapter-none"))
    p.add_argument("--heldout", default=str(HERE / "data" / "python-docs" / "heldout.txt"))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch1-prompts", type=int, default=4, help="prompts run one at a time (batch 1)")
    p.add_argument("--uncached-batch", type=int, default=8,
                   help="batch (and prompts) of the coordinator run compared with and without prefix caching "
                        "(without it every token re-prefills the whole context)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 50, 100, 200])
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--server-args", default="", help="extra flags for both servers (e.g. prefix caching)")
    p.add_argument("--port", type=int, default=8781)
    p.add_argument("--skip-coordinator", action="store_true")
    p.add_argument("--warmup-tokens", type=int, default=4,
                   help="tokens of a warm-up run (other prompts) before each measured level; 0: none")
    p.add_argument("--result-dir", default=str(HERE / "results"))
    args = p.parse_args()
    if args.warmup_tokens < 0:
        p.error("--warmup-tokens must be >= 0")
    if not (Path(args.adapter) / "adapter_model.safetensors").is_file():
        sys.exit(f"no adapter at {args.adapter}: run benchmarks/lora_finetune.py first (or pass --adapter)")
    from sarathi import LLM

    llm = LLM(model=args.model, enable_lora=True, lora_modules=[f"ft={args.adapter}"], max_lora_rank=64,
              max_model_len=512, kv_cache_memory="1GiB")
    tok = llm.get_tokenizer()
    heldout = Path(args.heldout).read_text(encoding="utf-8")
    prompts = windows(tok, heldout, args.prompts, args.prompt_len, seed=3)
    # Each level first runs a few tokens of other prompts (nothing of the measured prompts gets
    # cached): the first steps of a fresh engine or server map KV pages and warm caches.
    warm = windows(tok, heldout, args.prompts, args.prompt_len, seed=4)
    result = {"args": vars(args), "in_engine": [], "coordinator": []}
    if args.warmup_tokens > 0:
        in_engine(llm, warm[:1], args.warmup_tokens, 1)
    r, _ = in_engine(llm, prompts[:args.batch1_prompts], args.max_tokens, 1)
    result["in_engine"].append(r)
    if args.warmup_tokens > 0:
        in_engine(llm, warm, args.warmup_tokens, args.prompts)
    r, alphas = in_engine(llm, prompts, args.max_tokens, args.prompts)
    result["in_engine"].append(r)
    result["alphas"] = alphas
    llm.engine.close()
    del llm
    if not args.skip_coordinator:
        # The same two servers with prefix caching on (the default) and off: every coordinator
        # token resends the whole context, which caching makes a one-token prefill.
        for caching in ("on", "off"):
            flags = (f"--max-logprobs {max(args.ks + [args.top_k])} --max-model-len 512 {args.server_args}"
                     + ("" if caching == "on" else " --no-enable-prefix-caching"))
            ns_theta = argparse.Namespace(gguf=None, sarathi_model=args.model, port=args.port, sarathi_args=flags)
            ns_t = argparse.Namespace(gguf=None, sarathi_model=args.model, port=args.port + 1,
                                      sarathi_args=f"{flags} --enable-lora --max-lora-rank 64 --lora-modules ft={args.adapter}")
            logs = REPO / ".cache" / "optimal-sampling-logs"
            for side in ("theta", "t"):
                (logs / side).mkdir(parents=True, exist_ok=True)
            levels = [(1, args.batch1_prompts), (args.uncached_batch, args.uncached_batch)]
            if caching == "on":
                levels.append((args.prompts, args.prompts))
            theta, theta_url = compare.start("sarathi", ns_theta, logs / "theta")
            try:
                t, t_url = compare.start("sarathi", ns_t, logs / "t")
                try:
                    for batch, n in levels:
                        if args.warmup_tokens > 0:
                            coordinator(theta_url, t_url, tok, warm[:n], args.warmup_tokens, batch, args.top_k)
                        r = coordinator(theta_url, t_url, tok, prompts[:n], args.max_tokens, batch, args.top_k)
                        r["prefix_caching"] = caching
                        result["coordinator"].append(r)
                        print(json.dumps(r), flush=True)
                finally:
                    compare.stop(t)
            finally:
                compare.stop(theta)
    rows, exact = top_k_table(args.model, args.adapter, prompts[:8], args.ks, args.positions)
    result["top_k"], result["exact"] = rows, exact

    print("\n| form | server prefix caching | batch | prompts x tokens | tokens/s |\n|---|---|---|---|---|")
    for form in ("in_engine", "coordinator"):
        for r in result[form]:
            print(f"| {form.replace('_', '-')} | {r.get('prefix_caching', '-')} | {r['batch']} | "
                  f"{r['prompts']} x {args.max_tokens} | {r['tokens_per_s']:.1f} |")
    speed = {}
    for r in result["in_engine"]:
        same = [c for c in result["coordinator"] if c["batch"] == r["batch"] and c.get("prefix_caching") == "on"]
        if same:
            speed[str(r["batch"])] = r["tokens_per_s"] / same[0]["tokens_per_s"]
            print(f"batch {r['batch']}: in-engine / coordinator (caching on) = {speed[str(r['batch'])]:.1f}x")
    result["in_engine_over_coordinator"] = speed
    print("\n| k | covered mass | mean abs alpha error | KL-symmetry error | ESS ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['covered_mass_mean']:.4f} | {r['alpha_abs_error_mean']:.2e} | "
              f"{r['kl_symmetry_error_mean']:.2e} | {r['ess_ratio_mean']:.3f} |")
    print(f"exact form: KL-symmetry error {exact['exact_kl_symmetry_error_mean']:.2e} over {exact['positions']} positions")
    res_dir = Path(args.result_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "optimal-sampling.json").write_text(json.dumps(result, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    a1.hist(alphas, bins=40)
    a1.set_xlabel("alpha* per token (in-engine, exact)")
    a1.set_ylabel("tokens")
    a2.semilogy([r["k"] for r in rows], [r["kl_symmetry_error_mean"] for r in rows], "o-", label="KL-symmetry error")
    a2.semilogy([r["k"] for r in rows], [r["alpha_abs_error_mean"] for r in rows], "s-", label="|alpha_k - alpha*|")
    a2.set_xlabel("top-k")
    a2.legend()
    fig.tight_layout()
    fig.savefig(res_dir / "optimal-sampling.png", dpi=120)
    print(f"saved {res_dir / 'optimal-sampling.json'} and .png")


if __name__ == "__main__":
    main()
