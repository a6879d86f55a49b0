"""Side by side: our server, llama.cpp's llama-server and llama-cpp-python's server on
the same GGUF model and machine, through the same load generator (benchmarks/serving.py).

Build the peers first (benchmark-only, git-ignored under benchmarks/peers/build/):
    benchmarks/peers/build_llama_server.sh
    benchmarks/peers/install_llama_cpp_python.sh
Then:
    .venv/bin/python benchmarks/peers/compare.py --concurrency 1 8 32 --num-prompts 8 32 64

Each server runs alone (started, measured at every concurrency, stopped) so they never
share the CPU. Prints a markdown table and writes serving-compare.json/.png under
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD = HERE / "build"
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import serving  # noqa: E402  (benchmarks/serving.py)


def smollm2_gguf() -> str:
    from sarathi.model_executor.model_loader import _embedded_smollm2

    return str(_embedded_smollm2())


def server_command(system: str, port: int, args) -> List[str]:
    gguf = args.gguf or smollm2_gguf()
    if system == "sarathi":
        return [sys.executable, "-m", "sarathi.entrypoints.openai.api_server", "--port", str(port),
                "--model", args.sarathi_model or gguf, *args.sarathi_args.split()]
    if system == "llama-server":
        return [str(BUILD / "llama-server"), "-m", gguf, "-t", str(args.threads), "-np", "32", "-c", "16384",
                "--host", "127.0.0.1", "--port", str(port), *args.llama_server_args.split()]
    if system == "llama-cpp-python":
        return [str(BUILD / "venv" / "bin" / "python"), "-m", "llama_cpp.server", "--model", gguf,
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads), "--n_ctx", "2048",
                # by default a new request cuts off the one being streamed; queue them instead
                "--interrupt_requests", "False"]
    raise ValueError(f"unknown system {system!r}")


def available(system: str) -> bool:
    if system == "llama-server":
        return (BUILD / "llama-server").exists()
    if system == "llama-cpp-python":
        return (BUILD / "venv" / "bin" / "python").exists()
    return True


def start(system: str, args, log_dir: Path):
    port = args.port
    cmd = server_command(system, port, args)
    log = open(log_dir / f"server-{system}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{system} exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise TimeoutError(f"{system} not ready after 600 s")


def stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", nargs="+", default=["sarathi", "llama-server", "llama-cpp-python"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--num-prompts", nargs="+", type=int, default=[8, 32, 64],
                   help="one per concurrency (or one for all)")
    p.add_argument("--serial-num-prompts", nargs="+", type=int, default=None,
                   help="prompts per concurrency for llama-cpp-python, which serves one request at a time "
                        "(default: --num-prompts)")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--threads", type=int, default=2, help="peers' CPU threads")
    p.add_argument("--gguf", default=None, help="default: the embedded SmolLM2 Q4_1 GGUF")
    p.add_argument("--sarathi-model", default=None, help="default: the same GGUF, served in its own blocks")
    p.add_argument("--seed", type=int, default=1000,
                   help="prompts of concurrency level i use seed + i: fresh prompts at every level, so no "
                        "server answers from a prompt cache; both servers get the same prompt sets")
    p.add_argument("--sarathi-args", default="", help="extra flags for our server, e.g. '--chunk-size 256'")
    p.add_argument("--llama-server-args", default="", help="extra flags for llama-server, e.g. '--poll 0'")
    p.add_argument("--eos-ids", type=int, nargs="+", default=[0, 2],
                   help="end-of-generation ids banned by logit_bias for servers without ignore_eos "
                        "(llama-cpp-python); SmolLM2: 0 <|endoftext|> and 2 <|im_end|>")
    p.add_argument("--result-dir", default=str(serving.RESULTS_DIR))
    args = p.parse_args()
    counts = args.num_prompts if len(args.num_prompts) > 1 else args.num_prompts * len(args.concurrency)
    serial_counts = args.serial_num_prompts or counts
    if len(serial_counts) == 1:
        serial_counts = serial_counts * len(args.concurrency)
    if len(counts) != len(args.concurrency) or len(serial_counts) != len(args.concurrency):
        p.error("--num-prompts / --serial-num-prompts need one value per --concurrency (or a single value)")
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = serving.load_tokenizer("smollm2-135m-instruct")

    rows: List[Dict] = []
    for system in args.systems:
        if not available(system):
            print(f"skip {system}: not built (see benchmarks/peers/*.sh)")
            continue
        proc, url = start(system, args, out_dir)
        try:
            for level, (conc, n) in enumerate(zip(args.concurrency,
                                                  serial_counts if system == "llama-cpp-python" else counts)):
                argv = ["--base-url", url, "--endpoint", args.endpoint, "--num-prompts", str(n),
                        "--seed", str(args.seed + level),
                        "--max-concurrency", str(conc), "--random-input-len", str(args.input_len),
                        "--random-output-len", str(args.output_len), "--label", f"{system}-c{conc}",
                        "--result-dir", str(out_dir)]
                if system == "llama-cpp-python":
                    argv += ["--ban-token-id", *map(str, args.eos_ids)]
                s = serving.run(serving.add_args(argparse.ArgumentParser()).parse_args(argv), tokenizer)
                rows.append({"system": system, "concurrency": conc, "num_prompts": n,
                             "completed": s["completed"],
                             "mean_output_len": s["total_output_tokens"] / max(s["completed"], 1),
                             "output_throughput": s["output_throughput"],
                             "total_token_throughput": s["total_token_throughput"],
                             "request_throughput": s["request_throughput"],
                             "ttft_median_ms": s["ttft_ms"]["median"], "ttft_p99_ms": s["ttft_ms"]["p99"],
                             "tpot_median_ms": s["tpot_ms"]["median"], "tpot_p99_ms": s["tpot_ms"]["p99"],
                             "itl_p99_ms": s["itl_ms"]["p99"], "e2e_median_ms": s["e2e_ms"]["median"]})
        finally:
            stop(proc)

    table = markdown(rows)
    print(table)
    (out_dir / "serving-compare.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    plot(rows, out_dir / "serving-compare.png")
    print(f"saved {out_dir / 'serving-compare.json'} and .png")


def markdown(rows: List[Dict]) -> str:
    head = ("| system | concurrency | output tok/s | req/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
            "| mean output len |\n|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['output_throughput']:.1f} | "
                     f"{r['request_throughput']:.2f} | {r['ttft_median_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                     f"{r['tpot_median_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {r['mean_output_len']:.0f} |")
    by = {(r["system"], r["concurrency"]): r["output_throughput"] for r in rows}
    for conc in sorted({r["concurrency"] for r in rows}):
        ours = by.get(("sarathi", conc))
        ratios = [f"{peer}: {ours / by[(peer, conc)]:.2f}x" for peer in ("llama-server", "llama-cpp-python")
                  if ours and by.get((peer, conc))]
        if ratios:
            lines.append(f"\nconcurrency {conc}: sarathi output throughput vs " + ", ".join(ratios))
    return "\n".join(lines)


def plot(rows: List[Dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in rows))
    concs = sorted({r["concurrency"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(len(systems), 1)
    for k, system in enumerate(systems):
        vals = {r["concurrency"]: r for r in rows if r["system"] == system}
        xs = [i + k * width for i in range(len(concs))]
        axes[0].bar(xs, [vals[c]["output_throughput"] if c in vals else 0 for c in concs], width, label=system)
        axes[1].bar(xs, [vals[c]["tpot_p99_ms"] if c in vals else 0 for c in concs], width, label=system)
    for ax, title in zip(axes, ("output tokens/s (higher is better)", "p99 TPOT ms (lower is better)")):
        ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(concs))])
        ax.set_xticklabels([f"c={c}" for c in concs])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
