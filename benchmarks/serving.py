"""Serving benchmark: a streaming load generator for any OpenAI-compatible endpoint.

In the spirit of vLLM's benchmark_serving.py. Requests arrive all at once
(--request-rate inf) or as a Poisson / gamma process (--burstiness), optionally capped
by --max-concurrency; each one streams and we time every chunk on the client side.

    .venv/bin/python benchmarks/serving.py --base-url http://127.0.0.1:8000 \
        --endpoint completions --dataset random --random-input-len 256 \
        --random-output-len 128 --num-prompts 64 --max-concurrency 8

Prints a table and writes JSON + PNG under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import httpx
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- datasets

@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int          # tokens, as our tokenizer counts them (the server's usage wins)
    output_len: int          # max_tokens sent


def load_tokenizer(name_or_path: Optional[str]):
    """A tokenizer from a model alias / HF dir / GGUF (local only), or None for word prompts."""
    if not name_or_path:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoTokenizer

    from sarathi.model_executor.model_loader import resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(name_or_path)))


def _range(mean: int, ratio: float, rng: random.Random) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float,
                    tokenizer, seed: int) -> List[BenchRequest]:
    """Prompts of random tokens (decoded by the tokenizer) or of random pseudo-words."""
    rng = random.Random(seed)
    out = []
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer else set()
    for _ in range(n):
        want = _range(input_len, range_ratio, rng)
        olen = _range(output_len, range_ratio, rng)
        if tokenizer is None:
            words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
                     for _ in range(want)]
            out.append(BenchRequest(" ".join(words), want, olen))
            continue
        ids = [rng.randrange(len(tokenizer)) for _ in range(want)]
        ids = [i for i in ids if i not in special]
        text = tokenizer.decode(ids)
        # decode->encode does not round-trip exactly; trim or pad a few times to land near `want`.
        for _ in range(4):
            got = tokenizer.encode(text, add_special_tokens=False)
            if len(got) == want:
                break
            if len(got) > want:
                text = tokenizer.decode(got[:want])
            else:
                text += tokenizer.decode([rng.randrange(len(tokenizer)) for _ in range(want - len(got))])
        out.append(BenchRequest(text, len(tokenizer.encode(text, add_special_tokens=False)), olen))
    return out


def jsonl_requests(path: str, n: int, output_len: int, tokenizer, seed: int) -> List[BenchRequest]:
    """One JSON object per line with a "prompt" (or "text") field; optional "max_tokens"."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            prompt = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{lineno}: needs a non-empty string field 'prompt' (or 'text')")
            rows.append((prompt, int(obj.get("max_tokens", output_len))))
    return _sample(rows, n, tokenizer, seed, path)


def sharegpt_requests(path: str, n: int, output_len: Optional[int], tokenizer, seed: int) -> List[BenchRequest]:
    """ShareGPT format: a list of {"conversations": [{"from"/"role", "value"/"content"}, ...]};
    the first turn is the prompt, the second one's length sets max_tokens (unless --output-len)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    rows = []
    for conv in data:
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not turns or len(turns) < 2:
            continue
        text = [t.get("value", t.get("content", "")) for t in turns[:2]]
        if not text[0]:
            continue
        if output_len is not None:
            olen = output_len
        elif tokenizer is not None:
            olen = max(4, len(tokenizer.encode(text[1], add_special_tokens=False)))
        else:
            olen = max(4, len(text[1].split()))
        rows.append((text[0], olen))
    return _sample(rows, n, tokenizer, seed, path)


def _sample(rows, n, tokenizer, seed, path) -> List[BenchRequest]:
    if not rows:
        raise ValueError(f"{path}: no usable prompts")
    rng = random.Random(seed)
    picked = [rows[rng.randrange(len(rows))] for _ in range(n)] if n > len(rows) else rng.sample(rows, n)
    count = (lambda s: len(tokenizer.encode(s, add_special_tokens=False))) if tokenizer else (lambda s: len(s.split()))
    return [BenchRequest(p, count(p), o) for p, o in picked]


# ----------------------------------------------------------------------------- client

@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    output_bytes: int = 0    # UTF-8 bytes of the streamed text (compares tokenizers: bytes/s)
    ttft: float = 0.0
    e2e: float = 0.0
    itl: List[float] = field(default_factory=list)   # gaps between content chunks

    @property
    def tpot(self) -> Optional[float]:
        return (self.e2e - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


def build_payload(args, req: BenchRequest) -> Dict[str, Any]:
    body: Dict[str, Any] = {"model": args.model, "max_tokens": req.output_len, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": args.temperature}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.ban_token_id:
        # for servers without ignore_eos: a -100 logit bias on the end-of-generation ids has the same effect
        body["logit_bias"] = {str(t): -100 for t in args.ban_token_id}
    body.update(json.loads(args.extra_body) if args.extra_body else {})
    return body


async def send_request(client: httpx.AsyncClient, url: str, headers: Dict[str, str], body: Dict[str, Any],
                       req: BenchRequest, chat: bool, tokenizer) -> RequestResult:
    res = RequestResult(prompt_len=req.prompt_len)
    text, chunks, usage, finished = [], 0, None, False
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    res.error = f"stream error: {obj['error']}"
                    return res
                if obj.get("usage"):
                    usage = obj["usage"]
                for choice in obj.get("choices") or []:
                    finished = finished or bool(choice.get("finish_reason"))
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not piece:
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                    text.append(piece)
        res.e2e = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.output_bytes = len("".join(text).encode("utf-8"))
    if usage and usage.get("completion_tokens"):
        res.output_len = int(usage["completion_tokens"])
        res.prompt_len = int(usage.get("prompt_tokens") or res.prompt_len)
    elif tokenizer is not None:
        res.output_len = len(tokenizer.encode("".join(text), add_special_tokens=False))
    else:
        res.output_len = chunks
    if chunks == 0:
        res.ttft = res.e2e  # only special tokens (skipped) or nothing at all came back
    res.ok = finished or chunks > 0
    if not res.ok:
        res.error = "stream ended without content or a finish_reason"
    return res


async def arrivals(n: int, rate: float, burstiness: float, seed: int):
    """Yield request indices spaced by gamma(burstiness) gaps with mean 1/rate (Poisson at 1.0)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield i
        if rate != float("inf") and i < n - 1:
            await asyncio.sleep(float(rng.gamma(burstiness, 1.0 / (rate * burstiness))))


async def run_load(args, requests: List[BenchRequest], tokenizer) -> Dict[str, Any]:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    url = args.base_url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    conns = httpx.Limits(max_connections=max(args.max_concurrency or len(requests), 1) + 4)

    async with httpx.AsyncClient(timeout=timeout, limits=conns) as client:
        models = getattr(args, "models", None)

        async def one(req: BenchRequest, index: int = 0) -> RequestResult:
            body = build_payload(args, req)
            if models:  # spread round-robin over several served names (e.g. LoRA adapters)
                body["model"] = models[index % len(models)]
            if limit is None:
                return await send_request(client, url, headers, body, req, args.endpoint == "chat", tokenizer)
            async with limit:
                return await send_request(client, url, headers, body, req, args.endpoint == "chat", tokenizer)

        if args.warmup:
            for i in range(len(models or [None])):
                await one(BenchRequest(requests[0].prompt, requests[0].prompt_len, 4), i)
        tasks = []
        t0 = time.perf_counter()
        async for i in arrivals(len(requests), args.request_rate, args.burstiness, args.seed):
            tasks.append(asyncio.create_task(one(requests[i], i)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(args, results, duration)


# ----------------------------------------------------------------------------- metrics

def _stats(values: List[float], scale: float = 1000.0) -> Dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def parse_goodput(specs: Optional[List[str]]) -> Dict[str, float]:
    """['ttft:500', 'tpot:100'] -> SLOs in milliseconds (ttft, tpot, e2e)."""
    slos = {}
    for spec in specs or []:
        key, _, ms = spec.partition(":")
        if key not in ("ttft", "tpot", "e2e") or not ms:
            raise ValueError(f"--goodput entries look like ttft:500 tpot:100 e2e:5000 (ms), got {spec!r}")
        slos[key] = float(ms)
    return slos


def summarize(args, results: List[RequestResult], duration: float) -> Dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    slos = parse_goodput(args.goodput)

    def meets(r: RequestResult) -> bool:
        got = {"ttft": r.ttft * 1e3, "tpot": (r.tpot or 0.0) * 1e3, "e2e": r.e2e * 1e3}
        return all(got[k] <= v for k, v in slos.items())

    summary = {
        "label": args.label, "base_url": args.base_url, "model": args.model, "endpoint": args.endpoint,
        "request_rate": args.request_rate, "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency, "num_prompts": len(results),
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_output_bytes": sum(r.output_bytes for r in ok),
        "output_byte_throughput": sum(r.output_bytes for r in ok) / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
        "goodput_slos_ms": slos,
        "goodput": (sum(meets(r) for r in ok) / duration) if slos else None,
        "per_request": [{"prompt_len": r.prompt_len, "output_len": r.output_len, "output_bytes": r.output_bytes,
                         "ttft": r.ttft,
                         "tpot": r.tpot, "e2e": r.e2e} for r in results],
    }
    return summary


def print_table(s: Dict[str, Any]) -> None:
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
            ("Total input tokens", s["total_input_tokens"]), ("Total output tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Output byte throughput (bytes/s)", f"{s['output_byte_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    if s["goodput"] is not None:
        rows.append((f"Goodput (req/s) {s['goodput_slos_ms']}", f"{s['goodput']:.2f}"))
    for name in ("ttft", "tpot", "itl", "e2e"):
        st = s[f"{name}_ms"]
        rows += [(f"{name.upper()} {k} (ms)", f"{st[k]:.2f}") for k in ("mean", "median", "p99")]
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'=' * 16} Serving benchmark: {s['label']} {'=' * 16}")
    for k, v in rows:
        print(f"{k:<{width}}{v:>14}")
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")


def save(s: Dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"serving-{s['label']}"
    stem.with_suffix(".json").write_text(json.dumps(s, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    per = [r for r in s["per_request"] if r["e2e"] > 0]
    for ax, key, title in zip(axes, ("ttft", "tpot", "e2e"), ("TTFT", "TPOT", "E2E latency")):
        vals = sorted(1e3 * r[key] for r in per if r[key] is not None)
        if vals:
            ax.plot(vals, np.linspace(0, 1, len(vals)), drawstyle="steps-post")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{s['label']}: {s['output_throughput']:.1f} output tok/s, concurrency {s['max_concurrency']}")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)
    return stem.with_suffix(".json")


# ----------------------------------------------------------------------------- CLI

def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name sent in requests (default: first of /v1/models)")
    p.add_argument("--models", nargs="+", default=None,
                   help="spread requests round-robin over these model names (e.g. LoRA adapters)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--dataset", choices=["random", "jsonl", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None)
    p.add_argument("--tokenizer", default="smollm2-135m-instruct",
                   help="model alias / HF dir / .gguf whose tokenizer makes random prompts and counts tokens; "
                        "'none' for random words")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--output-len", type=int, default=None, help="jsonl/sharegpt: override max_tokens")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, <1 burstier")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ban-token-id", type=int, nargs="*", default=None,
                   help="send logit_bias -100 for these ids (EOS, end-of-generation) for servers without ignore_eos")
    p.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    p.add_argument("--goodput", nargs="*", default=None, help="SLOs in ms, e.g. ttft:1000 tpot:100")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="name of the result files (default derived from the run)")
    p.add_argument("--result-dir", default=str(RESULTS_DIR))
    return p


def make_requests(args, tokenizer) -> List[BenchRequest]:
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, tokenizer, args.seed)
    if not args.dataset_path:
        raise ValueError(f"--dataset {args.dataset} needs --dataset-path")
    if args.dataset == "jsonl":
        return jsonl_requests(args.dataset_path, args.num_prompts, args.output_len or args.random_output_len,
                              tokenizer, args.seed)
    return sharegpt_requests(args.dataset_path, args.num_prompts, args.output_len, tokenizer, args.seed)


def first_model(base_url: str, api_key: Optional[str]) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run(args, tokenizer=None) -> Dict[str, Any]:
    """Run one benchmark point; returns the summary dict (also printed and saved)."""
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.model is None:
        args.model = first_model(args.base_url, args.api_key)
    if args.label is None:
        args.label = f"{args.endpoint}-c{args.max_concurrency or 'inf'}-n{args.num_prompts}"
    requests = make_requests(args, tokenizer)
    summary = asyncio.run(run_load(args, requests, tokenizer))
    print_table(summary)
    path = save(summary, Path(args.result_dir))
    print(f"saved {path} and {path.with_suffix('.png')}")
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    args = add_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    tokenizer = None if args.tokenizer in (None, "", "none") else load_tokenizer(args.tokenizer)
    run(args, tokenizer)


if __name__ == "__main__":
    main()
