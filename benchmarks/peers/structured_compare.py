"""JSON-schema outputs side by side: our server and llama.cpp's llama-server on the same GGUF,
the same schema (benchmarks/structured_outputs.py's 10 fields) and the same chat prompts.

    benchmarks/peers/build_llama_server.sh          # once
    .venv/bin/python benchmarks/peers/structured_compare.py --concurrency 1 8 --num-prompts 8 16

Each server runs alone (started, measured at every concurrency, stopped), as in compare.py. Every
request is `/v1/chat/completions` with `response_format: {"type": "json_schema", "json_schema":
{"name", "schema", "strict": true}}`, greedy, `max_tokens` 384. An answer is valid when Python's
`json` parses it and `jsonschema` (not the library that constrained it) accepts it. Output tok/s is
the completion tokens the servers report over the wall time of the level. Prints a markdown table
and writes structured-compare.json under --result-dir.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import httpx
import jsonschema

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import compare  # noqa: E402  (benchmarks/peers/compare.py: starting and stopping the servers)
import serving  # noqa: E402
from structured_outputs import PEOPLE, SCHEMA  # noqa: E402  (benchmarks/structured_outputs.py)

MAX_TOKENS = 384


def request_body(model: str, i: int, level: int) -> dict:
    who = PEOPLE[(i + 5 * level) % len(PEOPLE)]
    return {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": f"Describe {who} from city number {100 * level + i} "
                                                     f"as a JSON record."}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}}


def one(client: httpx.Client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=body, timeout=600)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:200]}", "tokens": 0, "latency_s": elapsed}
    data = r.json()
    choice = data["choices"][0]
    text = choice["message"].get("content") or ""
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        valid, why = True, ""
    except (ValueError, jsonschema.ValidationError) as e:
        valid, why = False, str(e).splitlines()[0][:160]
    return {"ok": True, "valid": valid, "why": why, "finish": choice.get("finish_reason"),
            "tokens": data.get("usage", {}).get("completion_tokens", 0), "latency_s": elapsed, "text": text}


def level(url: str, concurrency: int, n: int, index: int) -> dict:
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]   # the name each server serves
    bodies = [request_body(model, i, index) for i in range(n)]
    with httpx.Client() as client, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda b: one(client, url, b), bodies))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    valid = sum(1 for r in results if r.get("valid"))
    return {"concurrency": concurrency, "requests": n, "valid": valid, "valid_rate": valid / n,
            "errors": [r["error"] for r in results if not r["ok"]],
            "invalid": [{"why": r["why"], "finish": r["finish"], "text": r["text"][:300]}
                        for r in results if r["ok"] and not r["valid"]],
            "completion_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
            "mean_latency_s": sum(r["latency_s"] for r in results) / n,
            "mean_tokens": tokens / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", nargs="+", default=["sarathi", "llama-server"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    p.add_argument("--num-prompts", nargs="+", type=int, default=[8, 16], help="one per concurrency")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--threads", type=int, default=2, help="llama-server's CPU threads")
    p.add_argument("--gguf", default=None, help="default: the embedded SmolLM2 Q4_1 GGUF")
    p.add_argument("--sarathi-args", default="")
    p.add_argument("--llama-server-args", default="")
    p.add_argument("--result-dir", default=str(serving.RESULTS_DIR))
    args = p.parse_args()
    if len(args.num_prompts) != len(args.concurrency):
        p.error("--num-prompts needs one value per --concurrency")
    # compare.server_command reads these
    args.sarathi_model = None
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: List[Dict] = []
    for system in args.systems:
        if not compare.available(system):
            print(f"skip {system}: not built (benchmarks/peers/build_llama_server.sh)")
            continue
        proc, url = compare.start(system, args, out_dir)
        try:
            level(url, 1, 1, 99)   # warm-up: the schema compiles here on both servers
            for index, (conc, n) in enumerate(zip(args.concurrency, args.num_prompts)):
                row = {"system": system, **level(url, conc, n, index)}
                rows.append(row)
                print(f"{system} c{conc}: {row['valid']}/{n} valid, {row['output_tok_s']:.1f} output tok/s, "
                      f"{row['mean_tokens']:.0f} tokens/answer", flush=True)
        finally:
            compare.stop(proc)
    print("| system | concurrency | requests | valid | output tok/s | tokens / answer | mean latency (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['system']} | {r['concurrency']} | {r['requests']} | {r['valid']}/{r['requests']} | "
              f"{r['output_tok_s']:.1f} | {r['mean_tokens']:.0f} | {r['mean_latency_s']:.2f} |")
    path = out_dir / "structured-compare.json"
    path.write_text(json.dumps({"args": vars(args), "schema": SCHEMA, "rows": rows}, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
