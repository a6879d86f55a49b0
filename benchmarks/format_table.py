"""Every weight format from the same weights, through the engine: bytes per weight, decode step, c32.

The weights are the embedded SmolLM2-135M-Instruct's (its Q4_1 GGUF dequantised: the float model
the other variants are made from):

  Q4_1            the embedded GGUF file itself (its tied head / embedding is Q8_0)
  Q4_0, Q8_0      GGUF files re-encoded from those floats by the gguf package's quantizer (the
                  blocks llama-quantize writes), the Q8_0 embedding kept
  gptq4-g64       `sarathi quantize --method rtn` (GPTQ v1 layout; RTN: the kernels' speed does not
  gptq8-g32       depend on how the values were chosen), LM head float as GPTQ checkpoints have it
  gptq8-g32+head  the same with `--lm-head` (the head quantized too, as in the GGUF files)
  awq4-g64        `sarathi quantize --method awq` (a small calibration: speed only)

Group 128 does not divide SmolLM2's 576 inputs; a g128 (or any group >= 32) checkpoint is packed
exactly as g64 is (blocks of 32, each with its group's scale and minimum), so it runs at g64's speed
(benchmarks/decode_gemv.py measures gptq4-g128 on the ~1B's shapes).
  int8            per-output-channel int8 at load (`quantization="int8"`)

Q4_K_M needs llama.cpp's quantizer (no Python encoder for K-quants): measured when
benchmarks/peers/build/llama-quantize exists (benchmarks/peers/build_llama_server.sh builds it), else listed as skipped.

Per variant, through the offline engine (one at a time, greedy, ignore_eos): the decode step at
concurrency 1 = (time of 1 + N generated tokens - time of 1) / N, median of --reps alternations;
and output tok/s with 32 requests of --c32-tokens tokens each. bytes/weight = the bytes the
linear layers (LM head included) stream per token / their weights.

    .venv/bin/python benchmarks/format_table.py --build-only   # once: ~4-6 minutes (quantizing)
    .venv/bin/python benchmarks/format_table.py                # ~3 minutes on 2 cores

--servers adds, for each GGUF variant (Q4_0, Q4_1, Q4_K_M, Q8_0), our server and llama-server side by
side on that file (benchmarks/peers/compare.py: each server alone, the same streaming client):
TPOT at concurrency 1 and output tok/s at concurrency 32 over two full waves (--serve-prompts
requests of --serve-len prompt and output tokens). Needs benchmarks/peers/build/llama-server.

    .venv/bin/python benchmarks/format_table.py --servers      # + ~2-3 minutes per GGUF variant

Prints a markdown table; writes benchmarks/results/format_table.json.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adaptivocab.outdir import check_result_prefix, write_result_file  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LLAMA_QUANTIZE = REPO / "benchmarks" / "peers" / "build" / "llama-quantize"
ARGS = dict(max_model_len=512, max_num_seqs=32, kv_cache_memory="256MiB")


def reencode_gguf(src: Path, dst: Path, kind: str) -> None:
    """src's tensors re-quantized to `kind` (2-D weights other than the embedding), metadata copied."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), field.types[0], sub)
    qtype = gguf.GGMLQuantizationType[kind]
    for t in reader.tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight" and t.tensor_type != qtype:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, np.asarray(t.data))
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_variants(work: Path, only) -> dict:
    """name -> LLM keywords (building what is missing under `work`)."""
    from sarathi.model_executor.model_loader import _embedded_smollm2, resolve_model_dir

    work.mkdir(parents=True, exist_ok=True)
    src = _embedded_smollm2()
    fp32 = resolve_model_dir("smollm2-135m-instruct")
    calib = work / "calib.txt"
    if not calib.is_file():
        import difflib
        import textwrap

        calib.write_text(inspect.getsource(textwrap) + inspect.getsource(difflib))
    out = {}

    def want(name):
        return not only or name in only

    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        if not want(kind):
            continue
        path = src if kind == "Q4_1" else work / f"smollm2-135m.{kind.lower()}.gguf"
        if not path.is_file():
            print(f"writing {path}", flush=True)
            reencode_gguf(src, path, kind)
        out[kind] = dict(model=str(path), quantization="gguf")
    if want("Q4_K_M"):
        path = work / "smollm2-135m.q4_k_m.gguf"
        if not path.is_file() and LLAMA_QUANTIZE.is_file():
            subprocess.run([str(LLAMA_QUANTIZE), "--allow-requantize", str(src), str(path), "Q4_K_M"], check=True)
        if path.is_file():
            out["Q4_K_M"] = dict(model=str(path), quantization="gguf")
        else:
            print(f"Q4_K_M skipped: {LLAMA_QUANTIZE} not built", flush=True)
    quant = {"gptq4-g64": ("rtn", 4, 64, []), "gptq8-g32": ("rtn", 8, 32, []),
             "gptq8-g32+head": ("rtn", 8, 32, ["--lm-head"]),
             "awq4-g64": ("awq", 4, 64, ["--num-samples", "4", "--seq-len", "64", "--awq-grid", "4"])}
    for name, (method, bits, group, extra) in quant.items():
        if not want(name):
            continue
        path = work / name
        if not (path / "config.json").is_file():
            cmd = [sys.executable, "-m", "sarathi.quantize", "--model", str(fp32), "--method", method, "--bits",
                   str(bits), "--group-size", str(group), "--out", str(path), "--overwrite", "--quiet", *extra]
            if method == "awq":
                cmd += ["--calib", str(calib)]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
        out[name] = dict(model=str(path), quantization="auto")
    if want("int8"):
        out["int8"] = dict(model=str(fp32), quantization="int8")
    return out


def linear_bytes(runner):
    """(bytes the linears stream per token, their weights)."""
    from sarathi.model_executor.layers.linear import Linear

    nbytes = weights = 0
    for m in runner.model.modules():
        if isinstance(m, Linear):
            weights += m.in_features * m.out_features
            nbytes += m.qweight.nbytes() if m.qweight is not None else m.weight.numel() * m.weight.element_size()
    return nbytes, weights


def measure(kw: dict, args) -> dict:
    from sarathi import LLM, SamplingParams

    llm = LLM(**kw, **ARGS)
    runner = llm.engine.runner
    nbytes, weights = linear_bytes(runner)
    prompt = [list(range(1000, 1032))]

    def run(n, prompts):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
        return time.perf_counter() - t

    run(4, prompt)  # warm-up
    steps = []
    for _ in range(args.reps):
        t1 = run(1, prompt)
        tn = run(1 + args.c1_tokens, prompt)
        steps.append((tn - t1) / args.c1_tokens)
    prompts = [list(range(1000 + 7 * i, 1032 + 7 * i)) for i in range(32)]
    t32 = min(run(args.c32_tokens, prompts) for _ in range(2))
    row = {"formats": runner.formats, "bytes_per_weight": nbytes / weights, "linear_mb_per_token": nbytes / 1e6,
           "c1_step_ms": statistics.median(steps) * 1e3, "c1_step_ms_best": min(steps) * 1e3,
           "c32_tok_s": 32 * args.c32_tokens / t32}
    del llm, runner
    gc.collect()
    return row


GGUF_VARIANTS = ("Q4_0", "Q4_1", "Q4_K_M", "Q8_0")


def serve_side_by_side(name: str, kw: dict, args) -> dict:
    """Our server and llama-server on one GGUF variant (compare.py, each alone): c1 TPOT, c32 tok/s."""
    result_dir = Path(args.work) / f"serve-{name}"
    result_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "peers" / "compare.py"), "--systems", "sarathi", "llama-server",
           "--gguf", kw["model"], "--concurrency", "1", "32", "--num-prompts", "4", str(args.serve_prompts),
           "--input-len", str(args.serve_len), "--output-len", str(args.serve_len), "--result-dir", str(result_dir)]
    if args.sarathi_args:
        cmd += ["--sarathi-args", args.sarathi_args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    rows = json.loads((result_dir / "serving-compare.json").read_text())["rows"]
    out = {}
    for r in rows:
        key = "ours" if r["system"] == "sarathi" else "llama_server"
        if r["concurrency"] == 1:
            out[f"{key}_c1_tpot_ms"] = r["tpot_median_ms"]
        else:
            out[f"{key}_c32_tok_s"] = r["output_throughput"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(REPO / ".cache" / "format-table"), help="where the variants are built")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--build-only", action="store_true", help="write the variants, measure nothing")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--c1-tokens", type=int, default=32)
    ap.add_argument("--c32-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS / "format_table"))
    ap.add_argument("--servers", action="store_true", help="also both servers on each GGUF variant (see above)")
    ap.add_argument("--serve-prompts", type=int, default=64, help="requests at c32 (two waves: 64)")
    ap.add_argument("--serve-len", type=int, default=64, help="prompt and output tokens per served request")
    ap.add_argument("--sarathi-args", default="", help="extra flags for our server, e.g. '--kv-cache-dtype float16'")
    args = ap.parse_args()
    llama_server = REPO / "benchmarks" / "peers" / "build" / "llama-server"
    if args.servers and not llama_server.exists():
        raise SystemExit(f"--servers needs {llama_server} (benchmarks/peers/build_llama_server.sh)")
    variants = build_variants(Path(args.work), set(args.only or ()))
    if args.build_only:
        return
    load0 = os.getloadavg()
    rows = {}
    for name, kw in variants.items():
        rows[name] = measure(kw, args)
        r = rows[name]
        print(f"  {name:15s} {r['bytes_per_weight']:5.2f} B/w  {r['linear_mb_per_token']:6.1f} MB/token  "
              f"c1 step {r['c1_step_ms']:6.2f} ms (best {r['c1_step_ms_best']:.2f})  c32 {r['c32_tok_s']:6.1f} tok/s",
              flush=True)
    if args.servers:
        for name in GGUF_VARIANTS:
            if name in variants:
                rows[name]["served"] = serve_side_by_side(name, variants[name], args)
    base = rows.get("Q4_1")
    print()
    print("| format | loaded as | bits/weight (linears) | MB/token | c1 decode step ms | vs Q4_1 x bytes ratio "
          "| c32 tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        rel = "-"
        if base:
            expect = base["c1_step_ms"] * r["linear_mb_per_token"] / base["linear_mb_per_token"]
            rel = f"{r['c1_step_ms'] / expect:.2f}"
        print(f"| {name} | {r['formats']} | {8 * r['bytes_per_weight']:.2f} | {r['linear_mb_per_token']:.1f} | "
              f"{r['c1_step_ms']:.2f} | {rel} | {r['c32_tok_s']:.1f} |")
    served = {name: r["served"] for name, r in rows.items() if "served" in r}
    if served:
        print()
        print(f"served, each server alone ({args.serve_len}-token prompts and outputs; c32: {args.serve_prompts} "
              f"requests):")
        print("| format | c1 TPOT ms ours / llama-server | ratio | c32 tok/s ours / llama-server | ratio |")
        print("|---|---|---|---|---|")
        for name, v in served.items():
            print(f"| {name} | {v['ours_c1_tpot_ms']:.1f} / {v['llama_server_c1_tpot_ms']:.1f} | "
                  f"{v['ours_c1_tpot_ms'] / v['llama_server_c1_tpot_ms']:.2f} | {v['ours_c32_tok_s']:.1f} / "
                  f"{v['llama_server_c32_tok_s']:.1f} | {v['ours_c32_tok_s'] / v['llama_server_c32_tok_s']:.2f} |")
    out = check_result_prefix(args.out)
    meta = {"model": "smollm2-135m-instruct (embedded Q4_1, dequantised)", "reps": args.reps,
            "c1_tokens": args.c1_tokens, "c32_tokens": args.c32_tokens, "loadavg_start": load0,
            "servers": args.servers, "serve_prompts": args.serve_prompts, "serve_len": args.serve_len,
            "sarathi_args": args.sarathi_args,
            "loadavg_end": os.getloadavg()}
    write_result_file(out.with_suffix(".json"), json.dumps({"config": meta, "rows": rows}, indent=2))
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
