"""Prefix caching benchmark: our server with and without --enable-prefix-caching (and,
if its binary is given, llama.cpp's llama-server with its per-slot prompt cache) on
the same model, through the same streaming client (benchmarks/serving.py).

Workloads (fresh random text per workload, so nothing is cached from an earlier one):
  shared   N requests = one long system prompt + a short user turn each, concurrency C
  chat     K conversations of T turns, each turn resends the whole conversation so far
  n8       one prompt sampled n=8 times (our server), vs the same n=8 request with caching off

Memory: the server's KV pages committed as the kernel counts them (our /metrics
kv_backend_bytes_committed: memfd blocks, a page shared by many slots counts once),
polled during each workload (peak), and the process's resident set (VmRSS, also
for llama-server, whose KV cache is allocated up front).

    .venv/bin/python benchmarks/prefix_caching.py \
        --llama-server benchmarks/peers/build/llama-server

Writes benchmarks/results/prefix_caching.json and .png and prints a markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from adaptivocab.outdir import write_result_file  # noqa: E402

import serving  # noqa: E402  (benchmarks/serving.py: the streaming client)

RESULTS = HERE / "results"


# ----------------------------------------------------------------------------- servers

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: List[str], port: int, log: Path):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{name} did not start; see {log}")

    def rss(self) -> int:
        """VmRSS of the server process (bytes), from /proc."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def kv_bytes(self) -> Dict[str, int]:
        """committed: the pool's resident bytes (kernel; includes cached blocks no request
        holds); used: bytes of blocks running requests hold (a shared block once)."""
        try:
            text = httpx.get(self.url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            return {}
        names = {"sarathi:kv_backend_bytes_committed": "committed", "sarathi:kv_cache_bytes_used": "used"}
        out = {}
        for line in text.splitlines():
            head = line.split(" ", 1)[0]
            if head in names:
                out[names[head]] = int(float(line.split()[1]))
        return out

    def reset_cache(self) -> None:
        if self.name.startswith("sarathi"):
            httpx.post(self.url + "/reset_prefix_cache", timeout=60).raise_for_status()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


class PeakSampler:
    """Polls the server's KV bytes committed and VmRSS while a workload runs."""

    def __init__(self, server: Server, every: float):
        self.server, self.every = server, every
        self.kv_peak, self.used_peak, self.rss_peak = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kv = self.server.kv_bytes()
            self.kv_peak = max(self.kv_peak, kv.get("committed", 0))
            self.used_peak = max(self.used_peak, kv.get("used", 0))
            self.rss_peak = max(self.rss_peak, self.server.rss())
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def figures(self) -> Dict[str, int]:
        return {"kv_committed_peak_bytes": self.kv_peak, "kv_used_peak_bytes": self.used_peak,
                "rss_peak_bytes": self.rss_peak}


# ----------------------------------------------------------------------------- workloads

def text_of(tokenizer, rng: random.Random, n: int) -> str:
    """About n tokens of random words (decoded from random ids of ordinary tokens)."""
    ids = [rng.randrange(1000, 30000) for _ in range(n)]
    return tokenizer.decode(ids)


def client_args(url: str, args, max_tokens: int, concurrency: int, extra: Optional[dict] = None):
    return argparse.Namespace(base_url=url, endpoint="completions", model=args.model_name, api_key=None,
                              temperature=0.0, ignore_eos=True, ban_token_id=args.ban_token_id,
                              extra_body=json.dumps(extra) if extra else None, max_concurrency=concurrency,
                              request_rate=float("inf"), burstiness=1.0, seed=0, timeout=3600.0, warmup=False,
                              goodput=None, output_len=max_tokens)


async def _send_all(url: str, args, prompts: List[str], max_tokens: int, concurrency: int,
                    extra: Optional[dict] = None) -> List[serving.RequestResult]:
    cargs = client_args(url, args, max_tokens, concurrency, extra)
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0),
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def one(p: str):
            req = serving.BenchRequest(p, 0, max_tokens)
            async with limit:
                body = serving.build_payload(cargs, req)
                return await serving.send_request(client, url + "/v1/completions", {}, body, req, False, None)
        return await asyncio.gather(*(one(p) for p in prompts))


def shared_prompt(server: Server, args, tokenizer) -> Dict:
    rng = random.Random(args.seed * 7 + 1)
    system = text_of(tokenizer, rng, args.system_len)
    prompts = [system + "\n\nUser: " + text_of(tokenizer, rng, args.user_len) + "\nAssistant:"
               for _ in range(args.num_requests)]
    server.reset_cache()
    with PeakSampler(server, args.poll_interval) as peak:
        t0 = time.perf_counter()
        results = asyncio.run(_send_all(server.url, args, prompts, args.output_len, args.concurrency))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    if len(ok) != len(results):
        raise RuntimeError(f"{server.name}: {len(results) - len(ok)} requests failed: {results[0].error}")
    out_tokens = sum(r.output_len for r in ok)
    return {"requests": len(ok), "median_ttft_ms": 1e3 * statistics.median(r.ttft for r in ok),
            "p90_ttft_ms": 1e3 * sorted(r.ttft for r in ok)[int(0.9 * len(ok))],
            "output_tok_s": out_tokens / wall, "wall_s": wall, **peak.figures()}


def multi_turn(server: Server, args, tokenizer) -> Dict:
    rng = random.Random(args.seed * 7 + 2)
    convs = [text_of(tokenizer, rng, args.chat_first_len) for _ in range(args.conversations)]
    server.reset_cache()
    ttft: List[List[float]] = []
    with PeakSampler(server, args.poll_interval) as peak:
        for turn in range(args.turns):
            prompts = [c + "\nUser: " + text_of(tokenizer, rng, args.user_len) + "\nAssistant:" for c in convs]
            res = asyncio.run(_send_all(server.url, args, prompts, args.chat_output_len, len(prompts),
                                        extra={"max_tokens": args.chat_output_len}))
            if not all(r.ok for r in res):
                raise RuntimeError(f"{server.name}: a chat turn failed: {[r.error for r in res if not r.ok][:1]}")
            ttft.append([r.ttft for r in res])
            # The answer text is not returned by the client; the next turn resends the prompt plus
            # a fixed stand-in answer of the same length, which keeps every server's input equal.
            convs = [p + " " + text_of(tokenizer, random.Random(turn * 100 + i), args.chat_output_len)
                     for i, p in enumerate(prompts)]
    med = [1e3 * statistics.median(t) for t in ttft]
    return {"median_ttft_ms_by_turn": med, "turn_last_over_first": med[-1] / med[0], **peak.figures()}


def n_samples(server: Server, args, tokenizer) -> Dict:
    rng = random.Random(args.seed * 7 + 3)
    prompt = text_of(tokenizer, rng, args.n_prompt_len)
    server.reset_cache()
    body = {"model": args.model_name, "prompt": prompt, "n": 8, "max_tokens": args.n_output_len,
            "temperature": 0.8, "seed": 1, "ignore_eos": True}
    with PeakSampler(server, args.poll_interval) as peak:
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=3600)
        wall = time.perf_counter() - t0
    r.raise_for_status()
    usage = r.json()["usage"]
    return {"wall_s": wall, "choices": len(r.json()["choices"]), "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0), **peak.figures()}


# ----------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--model-name", default="bench")
    p.add_argument("--sarathi-args", default="", help="extra flags for our server")
    p.add_argument("--llama-server", default=None, help="path of a llama-server binary (skipped if absent)")
    p.add_argument("--llama-server-args", default="--cache-reuse 256")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--system-len", type=int, default=1500)
    p.add_argument("--user-len", type=int, default=40)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--chat-first-len", type=int, default=300)
    p.add_argument("--chat-output-len", type=int, default=48)
    p.add_argument("--n-prompt-len", type=int, default=1000)
    p.add_argument("--n-output-len", type=int, default=32)
    p.add_argument("--ban-token-id", type=int, nargs="*", default=None,
                   help="token ids given a -100 logit bias (for servers without ignore_eos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poll-interval", type=float, default=1.0,
                   help="seconds between memory polls; each scrape of our /metrics costs the server "
                        "~10 ms or more of CPU (it reads /proc/self/smaps)")
    p.add_argument("--out", default=str(RESULTS / "prefix_caching.json"))
    args = p.parse_args()
    if not args.poll_interval > 0:
        p.error(f"--poll-interval must be > 0 seconds, got {args.poll_interval}")

    from transformers import AutoTokenizer

    from sarathi.model_executor.model_loader import gguf_source, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if args.ban_token_id is None:
        args.ban_token_id = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    log_dir = RESULTS   # server-*.log there is git-ignored
    systems = {
        "sarathi (prefix caching)": ["--enable-prefix-caching"],
        "sarathi (no caching)": ["--no-enable-prefix-caching"],
    }
    runs: Dict[str, Dict] = {}
    for name, flags in systems.items():
        port = free_port()
        cmd = [sys.executable, "-m", "sarathi.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port",
               str(port), "--model", args.model, "--served-model-name", args.model_name, *flags,
               *args.sarathi_args.split()]
        runs[name] = run_system(name, cmd, port, log_dir, args, tokenizer, n8=True)
        write_result_file(args.out, json.dumps({"runs": runs, "partial": True}, indent=2))  # survives a later stop
    if args.llama_server and Path(args.llama_server).exists():
        gguf = gguf_source(args.model)
        if gguf is None:
            from sarathi.model_executor.model_loader import _embedded_smollm2
            gguf = _embedded_smollm2()
        port = free_port()
        slots = max(args.concurrency, args.conversations)
        cmd = [args.llama_server, "-m", str(gguf), "-t", str(args.threads), "-np", str(slots),
               "-c", str(slots * 2560), "--host", "127.0.0.1", "--port", str(port), "-a", args.model_name,
               *args.llama_server_args.split()]
        runs["llama-server"] = run_system("llama-server", cmd, port, log_dir, args, tokenizer, n8=False)
    else:
        print(f"llama-server not run (no binary at {args.llama_server!r})")
    summary = summarize(runs)
    result = {"config": {k: v for k, v in vars(args).items() if k != "ban_token_id"}, "runs": runs,
              "summary": summary, "machine": {"cpus": os.cpu_count()}}
    write_result_file(args.out, json.dumps(result, indent=2))
    print(markdown(runs))
    print(json.dumps(summary, indent=2))
    plot(runs, Path(args.out).with_suffix(".png"))


def summarize(runs: Dict[str, Dict]) -> Dict[str, float]:
    """With / without caching ratios from the same run."""
    on, off = runs["sarathi (prefix caching)"], runs["sarathi (no caching)"]

    def ratio(workload: str, key: str, better_low: bool = True) -> float:
        a, b = off[workload][key], on[workload][key]
        return (a / max(b, 1e-9)) if better_low else (b / max(a, 1e-9))

    return {"shared_ttft_speedup": ratio("shared", "median_ttft_ms"),
            "shared_throughput_ratio": ratio("shared", "output_tok_s", better_low=False),
            "shared_kv_committed_ratio": ratio("shared", "kv_committed_peak_bytes"),
            "shared_kv_used_ratio": ratio("shared", "kv_used_peak_bytes"),
            "n8_time_ratio": ratio("n8", "wall_s"),
            "n8_kv_committed_ratio": ratio("n8", "kv_committed_peak_bytes"),
            "n8_kv_used_ratio": ratio("n8", "kv_used_peak_bytes")}


def run_system(name: str, cmd: List[str], port: int, log_dir: Path, args, tokenizer, n8: bool) -> Dict:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    slug = name.replace(" ", "-").replace("(", "").replace(")", "")
    server = Server(name, cmd, port, log_dir / f"server-prefix-{slug}.log")
    try:
        asyncio.run(_send_all(server.url, args, ["warm up " * 8], 4, 1))   # first-request costs out of the way
        out = {"shared": shared_prompt(server, args, tokenizer)}
        print(name, "shared", json.dumps(out["shared"]), flush=True)
        out["chat"] = multi_turn(server, args, tokenizer)
        print(name, "chat", json.dumps(out["chat"]), flush=True)
        if n8:
            out["n8"] = n_samples(server, args, tokenizer)
            print(name, "n8", json.dumps(out["n8"]), flush=True)
        out["idle_rss_bytes"] = server.rss()
        return out
    finally:
        server.stop()


def markdown(runs: Dict[str, Dict]) -> str:
    def mib(b):
        return f"{b / 2**20:.0f}" if b else "-"

    lines = ["| system | shared: median TTFT ms | shared: output tok/s | shared: KV committed / held by requests MiB "
             "| shared: peak RSS MiB | chat: median TTFT turn 1 / last ms | n=8: s | n=8: KV committed / held MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        s, c, n = r["shared"], r["chat"], r.get("n8")
        cells = [name, f"{s['median_ttft_ms']:.0f}", f"{s['output_tok_s']:.1f}",
                 f"{mib(s.get('kv_committed_peak_bytes'))} / {mib(s.get('kv_used_peak_bytes'))}", mib(s["rss_peak_bytes"]),
                 f"{c['median_ttft_ms_by_turn'][0]:.0f} / {c['median_ttft_ms_by_turn'][-1]:.0f}",
                 f"{n['wall_s']:.1f}" if n else "-",
                 f"{mib(n['kv_committed_peak_bytes'])} / {mib(n.get('kv_used_peak_bytes'))}" if n else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: Dict[str, Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, ax = plt.subplots(1, 4, figsize=(18, 4.2))
    ax[0].bar(names, [runs[n]["shared"]["median_ttft_ms"] for n in names])
    ax[0].set_title("shared system prompt: median TTFT (ms)")
    ax[1].bar(names, [runs[n]["shared"]["output_tok_s"] for n in names])
    ax[1].set_title("shared system prompt: output tok/s")
    ax[2].bar(names, [runs[n]["shared"]["rss_peak_bytes"] / 2**20 for n in names], label="process RSS")
    ax[2].bar(names, [runs[n]["shared"]["kv_committed_peak_bytes"] / 2**20 for n in names], label="KV committed")
    ax[2].set_title("shared system prompt: memory (MiB)")
    ax[2].legend()
    for n in names:
        ax[3].plot(range(1, len(runs[n]["chat"]["median_ttft_ms_by_turn"]) + 1),
                   runs[n]["chat"]["median_ttft_ms_by_turn"], marker="o", label=n)
    ax[3].set_title("multi-turn chat: median TTFT by turn (ms)")
    ax[3].set_xlabel("turn")
    ax[3].legend()
    for a in ax[:3]:
        a.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
