"""Speculative decoding benchmark: output tokens per second of the offline engine on the
embedded model with speculation off, ngram (prompt lookup) and early_exit, greedy and at
temperature 0.7, one stream (concurrency 1, requests one after another) and 32 at once.

Workloads (fixed, in this file):
  grounded   the output copies spans of the prompt: repeat a passage, rewrite code with
             one identifier renamed, quote a sentence list back (chat template applied)
  open       open-ended questions (stories, explanations): little to copy

Every method is loaded in the same process; each cell (workload, temperature, concurrency)
runs the methods in turn, --repeats times interleaved, and reports the median, so that a
method and its baseline see the same machine load. Ratios are against "off" of the same
cell. Writes benchmarks/results/spec_decode.json and .png.

Two engines of the same configuration in one process can decode at speeds 10-20 % apart for
their whole life (the disabled rows of results/spec_decode_c1_v3_*.json ran at 0.83-1.11x of
off with the same steps), more than the 5 % a method may lose. So each
speculating engine is also run with speculation disabled ("<method>:disabled",
disable_by_batch_size 1: no step drafts, the plain path): `vs_disabled` is the method against
the same engine, and the disabled row against "off" is what the disabled path costs.

    flock /tmp/sarathi-bench.lock .venv/bin/python benchmarks/spec_decode.py
    .venv/bin/python benchmarks/spec_decode.py --sweep-layers      # early_exit acceptance by L
    .venv/bin/python benchmarks/spec_decode.py --step-cost         # decode step time by batch size
    .venv/bin/python benchmarks/spec_decode.py --adaptivocab       # bytes per accepted draft, patched vs base
    .venv/bin/python benchmarks/spec_decode.py --target T.gguf --methods off draft_model   # a draft model
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sarathi import LLM, SamplingParams  # noqa: E402

RESULTS = HERE / "results"

PASSAGE = ("The vAttention design keeps the KV cache of each request in virtually contiguous memory. "
           "Physical pages are mapped into a request's virtual range on demand, as the sequence grows, "
           "from a fixed pool. Attention kernels see a plain contiguous tensor per request slot, so no "
           "block tables are needed and existing kernels work unchanged.")
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
'''
GROUNDED = [
    f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
    f"Rewrite this Python function, renaming the variable `subtotal` to `net`. Output only the code.\n\n{CODE}",
    "Copy this list exactly, one item per line:\n- apples\n- oranges\n- bananas\n- grapes\n- pears\n- plums\n"
    "- cherries\n- lemons",
    f"Quote the first two sentences of this text:\n\n{PASSAGE}",
    "Convert to uppercase: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog.",
    f"Here is some code:\n{CODE}\nWrite it again, adding a docstring at the top of the function.",
    "Repeat after me: one two three four five six seven eight nine ten, one two three four five six seven "
    "eight nine ten.",
    f"Fix the indentation of this code and print it back:\n{CODE}",
]
OPEN = [
    "Write a short story about a robot learning to paint.",
    "Explain why the sky is blue to a ten year old.",
    "What are three good habits for staying healthy?",
    "Describe your ideal weekend.",
    "Give me some ideas for a birthday party.",
    "Why do cats purr?",
    "Write a poem about the sea.",
    "What is the history of the bicycle?",
]
METHODS = {
    "off": None,
    "ngram": '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}',
    "early_exit": '{"method": "early_exit", "num_speculative_tokens": 3}',
}


def chat_prompts(llm, texts):
    tok = llm.engine.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]


@contextlib.contextmanager
def speculation_disabled(llm):
    """The same engine with no step drafting (disable_by_batch_size 1), then as it was."""
    proposer = llm.engine.runner.proposer
    config = proposer.config
    proposer.config = dataclasses.replace(config, disable_by_batch_size=1)
    try:
        yield
    finally:
        proposer.config = config


def run(llm, prompts, concurrency, temperature, max_tokens):
    """Output tok/s: `concurrency` requests at once, until every prompt ran."""
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=0 if temperature else None)
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        outs = llm.generate(prompts[i:i + concurrency], params)
        tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
    elapsed = time.perf_counter() - t0
    return tokens / elapsed, tokens, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, "draft_model"])
    ap.add_argument("--repeats", type=int, default=3, help="runs per method and cell, interleaved; the median counts")
    ap.add_argument("--workloads", nargs="+", default=["grounded", "open"], choices=["grounded", "open"])
    ap.add_argument("--no-disabled", action="store_true",
                    help="skip the speculating engines' runs with speculation disabled")
    ap.add_argument("--sweep-layers", action="store_true", help="early_exit: acceptance and tok/s by exit layer")
    ap.add_argument("--step-cost", action="store_true",
                    help="decode step time by batch size, and the batch size where drafts stop paying")
    ap.add_argument("--adaptivocab", action="store_true",
                    help="ngram drafts with an AdaptiVocab patched tokenizer vs the base: bytes per accepted draft")
    ap.add_argument("--target", default=None,
                    help="serve this model instead of the embedded one; method draft_model drafts with the "
                         "embedded SmolLM2 Q4_1 (see benchmarks/peers/spec_compare.py for the files)")
    ap.add_argument("--quantization", default=None, help="the target's --quantization (e.g. none)")
    ap.add_argument("--out", default=None, help="default: results/spec_decode.json (spec_decode_draft_model.json "
                                                 "with --target)")
    args = ap.parse_args()
    engine_args = dict(kv_cache_memory="512MiB", max_model_len=2048)
    if args.target:
        engine_args.update(model=args.target)
        from sarathi.model_executor.model_loader import _embedded_smollm2

        METHODS["draft_model"] = json.dumps({"method": "draft_model", "model": str(_embedded_smollm2()),
                                             "num_speculative_tokens": 3})
    elif "draft_model" in args.methods:
        ap.error("draft_model needs --target (the embedded model is the draft)")
    if args.quantization:
        engine_args.update(quantization=args.quantization)
    args.out = args.out or str(RESULTS / ("spec_decode_draft_model.json" if args.target else "spec_decode.json"))

    if args.sweep_layers:
        sweep(engine_args, args)
        return
    if args.step_cost:
        step_cost(engine_args)
        return
    if args.adaptivocab:
        adaptivocab(engine_args, args)
        return
    # Every method is loaded once, then each cell runs the methods back to back, `--repeats`
    # times in turn (off, ngram, early_exit, then ngram, early_exit, off, ...), and the median counts: on a shared
    # machine the load drifts over minutes, and a method measured at another time than its
    # baseline measures the drift.
    llms = {m: LLM(speculative_config=METHODS[m], **engine_args) for m in args.methods}
    any_llm = next(iter(llms.values()))
    workloads = {"grounded": chat_prompts(any_llm, GROUNDED), "open": chat_prompts(any_llm, OPEN)}
    workloads = {w: workloads[w] for w in args.workloads}
    for llm in llms.values():
        # warm-up: every prompt once, so that every measured run finds them in the prefix cache
        # (the engine's default) and its memory mapped; a first run measures ~1.7x slower
        llm.generate([p for prompts in workloads.values() for p in prompts], SamplingParams(max_tokens=8))
    order = [(m, llm, False) for m, llm in llms.items()]
    if not args.no_disabled:
        order += [(f"{m}:disabled", llm, True) for m, llm in llms.items() if METHODS.get(m)]
    results = []
    for name, prompts in workloads.items():
        for temperature in args.temperatures:
            for c in args.concurrency:
                batch = prompts * max(1, c // len(prompts)) if c > 1 else prompts
                runs = {m: [] for m, _, _ in order}
                for rep in range(args.repeats):
                    # each repeat starts with the next method: no method always runs first (or last)
                    for method, llm, disabled in order[rep % len(order):] + order[:rep % len(order)]:
                        before = llm.engine.get_stats()
                        with speculation_disabled(llm) if disabled else contextlib.nullcontext():
                            tps, tokens, elapsed = run(llm, batch, c, temperature, args.max_tokens)
                        after = llm.engine.get_stats()
                        runs[method].append((tps, tokens, elapsed, *(
                            after.get(k, 0) - before.get(k, 0) for k in
                            ("spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total"))))
                for method, rs in runs.items():
                    rs.sort()
                    tps, tokens, elapsed, drafted, accepted = rs[len(rs) // 2]
                    row = dict(method=method, workload=name, temperature=temperature, concurrency=c,
                               output_tok_s=round(tps, 2), runs_tok_s=[round(r[0], 2) for r in rs], tokens=tokens,
                               seconds=round(elapsed, 2), draft_tokens=drafted, accepted_tokens=accepted,
                               acceptance=round(accepted / drafted, 3) if drafted else None)
                    results.append(row)
                    print(json.dumps(row), flush=True)
    for llm in llms.values():
        llm.engine.close()
    base = {(r["workload"], r["temperature"], r["concurrency"]): r["output_tok_s"]
            for r in results if r["method"] == "off"}
    own = {(r["workload"], r["temperature"], r["concurrency"], r["method"]): r["output_tok_s"] for r in results}
    for r in results:
        cell = (r["workload"], r["temperature"], r["concurrency"])
        b = base.get(cell)
        r["speedup"] = round(r["output_tok_s"] / b, 3) if b else None
        d = own.get((*cell, r["method"] + ":disabled"))
        r["vs_disabled"] = round(r["output_tok_s"] / d, 3) if d else None
    print("\n| workload | temp | conc | method | output tok/s | vs off | vs same engine disabled | drafted / accepted |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in results:
        own_ratio = "" if r["vs_disabled"] is None else f"{r['vs_disabled']:.2f}x"
        print(f"| {r['workload']} | {r['temperature']} | {r['concurrency']} | {r['method']} | {r['output_tok_s']:.1f} "
              f"| {r['speedup']:.2f}x | {own_ratio} | {r['draft_tokens']} / {r['accepted_tokens']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"max_tokens": args.max_tokens, "repeats": args.repeats, "engine_args": engine_args,
                               "draft": "embedded SmolLM2-135M-Instruct Q4_1" if args.target else None,
                               "methods": {k: v for k, v in METHODS.items() if k in args.methods},
                               "results": results}, indent=2))
    plot(results, out.with_suffix(".png"), Path(args.target).name if args.target else "SmolLM2-135M Q4_1")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(results, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["workload"], r["temperature"], r["concurrency"]) for r in results})
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]   # not the disabled runs
    fig, ax = plt.subplots(figsize=(max(6, len(keys) * 1.2), 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [next((r["speedup"] for r in results if r["method"] == m and
                      (r["workload"], r["temperature"], r["concurrency"]) == k), 0) for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=m)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{w}\nT={t} c={c}" for w, t, c in keys], fontsize=7)
    ax.set_ylabel("output tok/s vs off")
    ax.set_title(f"Speculative decoding, {model}, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sweep(engine_args, args) -> None:
    """Greedy acceptance of early-exit drafts and tok/s at concurrency 1, by exit layer."""
    rows = []
    for layers in (None, 6, 10, 14, 18, 22, 26):
        spec = None if layers is None else json.dumps({"method": "early_exit", "num_speculative_tokens": 3,
                                                       "num_early_exit_layers": layers})
        llm = LLM(speculative_config=spec, **engine_args)
        prompts = chat_prompts(llm, OPEN[:4] + GROUNDED[:4])
        tps, tokens, elapsed = run(llm, prompts, 1, 0.0, args.max_tokens)
        s = llm.engine.get_stats()
        drafted = s.get("spec_decode_num_draft_tokens_total", 0)
        acc = s.get("spec_decode_num_accepted_tokens_total", 0) / drafted if drafted else None
        rows.append(dict(layers=layers, output_tok_s=round(tps, 2), acceptance=acc))
        print(json.dumps(rows[-1]), flush=True)
        llm.engine.close()
    out = RESULTS / "spec_decode_layers.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


def adaptivocab(engine_args, args, num_new_tokens=1000) -> None:
    """How many bytes an accepted draft token covers with an AdaptiVocab patched tokenizer
    (n-tokens learnt from Python standard-library modules) against SmolLM2's own, with prompt
    lookup drafts, greedy, one stream: each prompt asks to copy a held-out standard-library
    code span. The patched model is SmolLM2 with the n-token rows initialised by `exp` and not
    fine-tuned. A verifying step's tokens are its accepted drafts then the target's own token,
    so the accepted drafts are read from each step's output delta."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from adaptivocab import PatchTokenizer
    from adaptivocab.patch_model import patch_model
    from adaptivocab_testutil import HELDOUT_MODULES, TRAIN_MODULES, stdlib_file
    from sarathi.model_executor.model_loader import resolve_model_dir

    work = HERE.parent / ".cache" / "spec-adaptivocab"
    base = Path(resolve_model_dir("smollm2-135m-instruct"))
    patched = work / f"patched-{num_new_tokens}"
    if not (patched / "config.json").is_file():
        tok = PatchTokenizer.build(str(base), [stdlib_file(n) for n in TRAIN_MODULES], num_new_tokens=num_new_tokens,
                                   max_ngram=4, show_progress=False)
        patch_model(base, tok, patched, init="exp")
    spans = []
    for name in HELDOUT_MODULES:
        text = stdlib_file(name).read_text()
        spans += ["def " + d.strip()[:400] for d in text.split("\ndef ")[1:3]]
    texts = [f"Repeat this Python code exactly:\n\n{span}" for span in spans[:8]]
    rows = []
    for name, model in (("base", base), ("patched", patched)):
        llm = LLM(**{**engine_args, "model": str(model)}, speculative_config=METHODS["ngram"])
        engine, tok = llm.engine, llm.get_tokenizer()
        prompts = chat_prompts(llm, texts)
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        accepted = accepted_bytes = tokens = out_bytes = steps = 0
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
            seen = 0
            while engine.has_unfinished_requests():
                outs = engine.step()
                if not outs:
                    continue
                ids = outs[0].outputs[0].token_ids
                delta, seen = ids[seen:], len(ids)
                if not delta:
                    continue
                steps += 1
                if len(delta) > 1:
                    accepted += len(delta) - 1
                    accepted_bytes += len(tok.decode(delta[:-1]).encode())
            tokens += seen
            out_bytes += len(outs[0].outputs[0].text.encode())
        elapsed = time.perf_counter() - t0
        s = engine.get_stats()
        drafted = s["spec_decode_num_draft_tokens_total"]
        rows.append(dict(tokenizer=name, output_tokens=tokens, output_bytes=out_bytes,
                         bytes_per_token=round(out_bytes / tokens, 3), accepted_drafts=accepted,
                         bytes_per_accepted_draft=round(accepted_bytes / accepted, 3) if accepted else None,
                         acceptance=round(s["spec_decode_num_accepted_tokens_total"] / drafted, 3) if drafted else None,
                         tokens_per_step=round(tokens / steps, 3), output_bytes_per_s=round(out_bytes / elapsed, 1)))
        print(json.dumps(rows[-1]), flush=True)
        engine.close()
    out = RESULTS / "spec_decode_adaptivocab.json"
    out.write_text(json.dumps(dict(num_new_tokens=num_new_tokens, method=METHODS["ngram"], max_tokens=args.max_tokens,
                                   engine_args=engine_args, rows=rows), indent=2))
    print(f"wrote {out}")


def step_cost(engine_args, batch_sizes=(1, 2, 4, 8, 16, 24, 32), steps=12) -> None:
    """The median time of a decode-only step of B sequences (speculation off), fitted as
    fixed + per_row * B. A speculating step of B sequences with k drafts each verifies B (1 + k)
    rows and yields B (1 + a k) tokens at acceptance a, so it pays while
    (1 + a k) (fixed + per_row B) > fixed + per_row B (1 + k), i.e. below the break-even batch
    B* = a fixed / (per_row (1 - a)) (independent of k). The default disable_by_batch_size
    comes from this (sarathi/spec_decode/config.py)."""
    llm = LLM(**engine_args, max_prefills_per_step=0)   # every prompt in the first steps: all B decode together
    engine = llm.engine
    prompt = chat_prompts(llm, OPEN[:1])[0]
    rows = []
    for b in batch_sizes:
        params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        for i in range(b):
            engine.add_request(f"{b}-{i}", prompt, params)
        times, started = [], False
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            if started and len(outs) == b:
                times.append(dt)
            started = started or (len(outs) == b and all(len(o.outputs[0].token_ids) >= 1 for o in outs))
        times.sort()
        rows.append(dict(batch=b, step_ms=round(1000 * times[len(times) // 2], 2), steps=len(times)))
        print(json.dumps(rows[-1]), flush=True)
    engine.close()
    n = len(rows)
    mx = sum(r["batch"] for r in rows) / n
    my = sum(r["step_ms"] for r in rows) / n
    per_row = sum((r["batch"] - mx) * (r["step_ms"] - my) for r in rows) / sum((r["batch"] - mx) ** 2 for r in rows)
    fixed = my - per_row * mx
    breakeven = {f"{a:.2f}": round(a * fixed / (per_row * (1 - a)), 1) for a in (0.1, 0.25, 0.44, 0.6, 0.74)}
    print(f"fixed {fixed:.2f} ms + {per_row:.3f} ms per row; break-even batch by acceptance: {breakeven}")
    out = RESULTS / "spec_decode_step_cost.json"
    out.write_text(json.dumps(dict(rows=rows, fixed_ms=round(fixed, 3), per_row_ms=round(per_row, 4),
                                   breakeven_batch_by_acceptance=breakeven), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
