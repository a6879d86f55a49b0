"""What serving adds to each output token at concurrency 1: the engine's own steps against the TPOT
a streaming client sees.

    .venv/bin/python benchmarks/server_overhead.py --num-prompts 4 --sarathi-args "--kv-cache-dtype float16"

Starts our server alone (as peers/compare.py does), streams --num-prompts requests one at a time
through benchmarks/serving.py's client, then reads the engine's record of its last 64 steps
(`GET /ui/stats`: each step's end time and duration, taken inside the server). Over the decode-only
steps of one sequence it reports the model step's time, the gap between one step's end and the next
one's start (time the engine loop spent outside the step: handing outputs over, admitting, waiting on
the event loop), and the client's TPOT; TPOT - step time is the whole per-token cost of serving,
including work that overlaps the step and slows it. Writes benchmarks/results/server-overhead.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))

import compare  # noqa: E402  (benchmarks/peers/compare.py: starts and stops a server alone)
import serving  # noqa: E402


def decode_steps(steps):
    """(step ms, gap ms before the next step) for consecutive single-sequence decode-only steps."""
    out = []
    for a, b in zip(steps, steps[1:]):
        if all(s["num_seqs"] == 1 and s["decode_tokens"] == 1 and s["prefill_tokens"] == 0 for s in (a, b)):
            start_b = b["time"] - b["step_time_s"]
            out.append((1000 * a["step_time_s"], 1000 * (start_b - a["time"])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--gguf", default=None, help="default: the embedded SmolLM2 Q4_1 GGUF")
    p.add_argument("--sarathi-args", default="", help="extra flags for our server")
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--out", default=str(HERE / "results" / "server-overhead.json"))
    args = p.parse_args()
    if args.num_prompts < 1 or args.output_len < 8:
        p.error("--num-prompts must be >= 1 and --output-len >= 8")
    server_args = argparse.Namespace(gguf=args.gguf, sarathi_model=None, sarathi_args=args.sarathi_args,
                                     port=args.port, threads=2, llama_server_args="")
    tokenizer = serving.load_tokenizer("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = compare.start("sarathi", server_args, Path(tmp))
        try:
            tpots, steps = [], []
            for i in range(args.num_prompts):   # one request at a time: its steps are the last ones recorded
                argv = ["--base-url", url, "--num-prompts", "1", "--seed", str(2000 + i), "--max-concurrency", "1",
                        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                        "--label", f"overhead-{i}", "--result-dir", tmp]
                s = serving.run(serving.add_args(argparse.ArgumentParser()).parse_args(argv), tokenizer)
                tpots.append(s["tpot_ms"]["median"])
                stats = httpx.get(url + "/ui/stats", timeout=30).json()
                steps.extend(decode_steps(stats["engine"]["steps"]))
        finally:
            compare.stop(proc)
    step_ms = statistics.median(s for s, _ in steps)
    gap_ms = statistics.median(g for _, g in steps)
    tpot_ms = statistics.median(tpots)
    result = dict(args=vars(args), decode_steps=len(steps), step_ms_median=round(step_ms, 3),
                  gap_ms_median=round(gap_ms, 3), gap_ms_p90=round(sorted(g for _, g in steps)[int(0.9 * len(steps))], 3),
                  client_tpot_ms_median=round(tpot_ms, 3), serving_ms_per_token=round(tpot_ms - step_ms, 3))
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
