"""Scale-out on Ray: replicas on this machine, the cost of the Ray hop, and a projection to N machines.

    .venv/bin/python benchmarks/ray_scaleout.py            # ~6 min; JSON in benchmarks/results/

1. Serving, same workload and client (benchmarks/serving.py, streaming over HTTP) against servers:
   one engine in-process (2 threads), Ray 1 replica x 2 threads, Ray 1 replica x 1 thread and
   Ray 2 replicas x 1 thread. The server's own CPU time (the router: HTTP, SSE, routing, Ray
   client) and Ray's system processes' CPU time are read from the kernel (psutil) around each run.
2. The Ray hop per streamed item: an actor yielding RequestOutput-sized objects (nothing computed)
   vs the same async generator in-process, and a single stream's inter-token latency with the
   engine in-process vs behind an actor.
3. Projection: N machines of one replica each, from the measured per-replica throughput and the
   router's measured CPU seconds per token and per request: where one router process saturates.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback only (see sarathi/engine/ray_engine.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray workers started from here import sarathi from this checkout too
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
sys.path.insert(0, str(REPO / "benchmarks"))

import psutil  # noqa: E402

import serving  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(procs: List[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def serve_and_measure(label: str, server_flags: List[str], args) -> Dict[str, Any]:
    """Start a server, run the serving benchmark against it, read CPU times of every process."""
    import subprocess

    import httpx

    port = free_port()
    log = open(Path(tempfile.gettempdir()) / f"ray_scaleout-{label}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sarathi.entrypoints.openai.api_server", "--host", "127.0.0.1",
                             "--port", str(port), "--model", args.model, "--max-num-seqs", "64",
                             *server_flags], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{label}: server exited, see {log.name}")
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(f"{label}: server not ready in 600 s")
        server = psutil.Process(proc.pid)
        ns = serving.add_args(argparse.ArgumentParser()).parse_args([
            "--base-url", base, "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--max-concurrency", str(args.concurrency),
            "--label", f"ray_scaleout-{label}", "--result-dir", str(RESULTS / "ray_scaleout")])
        ns.model = serving.first_model(base, None)
        tokenizer = serving.load_tokenizer(args.model)
        requests = serving.make_requests(ns, tokenizer)
        # warm every replica (the first request of a replica pays one-off costs)
        asyncio.run(serving.run_load(ns, requests[:4], tokenizer))
        children = server.children(recursive=True)
        replicas = [p for p in children if " ".join(p.cmdline()).startswith("ray::EngineReplica")]
        system = [p for p in children if p not in replicas]
        c0 = (cpu_seconds([server]), cpu_seconds(replicas), cpu_seconds(system))
        summary = asyncio.run(serving.run_load(ns, requests, tokenizer))
        c1 = (cpu_seconds([server]), cpu_seconds(replicas), cpu_seconds(system))
        serving.print_table(summary)
        time.sleep(1.0)   # replica counters are polled every 0.5 s
        metrics = httpx.get(base + "/metrics", timeout=30).text
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    tokens, reqs = summary["total_output_tokens"], summary["completed"]
    server_cpu, replica_cpu, system_cpu = (b - a for a, b in zip(c0, c1))
    return {"label": label, "flags": server_flags, "output_tok_s": summary["output_throughput"],
            "request_s": summary["request_throughput"], "completed": reqs, "failed": summary["failed"],
            "duration_s": summary["duration_s"], "output_tokens": tokens,
            "ttft_median_ms": summary["ttft_ms"]["median"], "tpot_median_ms": summary["tpot_ms"]["median"],
            "server_cpu_s": server_cpu, "replica_cpu_s": replica_cpu, "ray_system_cpu_s": system_cpu,
            "server_cpu_ms_per_token": 1e3 * server_cpu / max(tokens, 1),
            "outputs_per_ray_item": _ratio(metrics, "sarathi:replica_stream_outputs_total",
                                           "sarathi:replica_stream_items_total")}


def _ratio(metrics: str, numerator: str, denominator: str) -> Optional[float]:
    """Sum of a labelled counter over replicas divided by another's (None without replicas)."""
    def total(name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", metrics, re.M))

    return total(numerator) / total(denominator) if total(denominator) else None


# ----------------------------------------------------------------------------- the Ray hop

def sample_output(num_tokens: int):
    from sarathi.outputs import CompletionOutput, RequestMetrics, RequestOutput

    ids = list(range(1000, 1000 + num_tokens))
    return RequestOutput("req-0", "prompt " * 32, list(range(64)), None,
                         [CompletionOutput(0, "word " * num_tokens, ids)], False,
                         RequestMetrics(arrival_time=0.0, token_times=[0.0] * num_tokens))


class Echo:
    """Yields ready-made outputs: the Ray streaming path with no compute behind it."""

    async def stream(self, count: int, num_tokens: int, per_item: int):
        batch = [sample_output(num_tokens) for _ in range(per_item)]
        for _ in range(count // per_item):
            yield batch


def hop_overhead(args, ray) -> Dict[str, Any]:
    from sarathi import SamplingParams
    from sarathi.config import EngineConfig
    from sarathi.engine.async_llm_engine import AsyncLLMEngine
    from sarathi.engine.ray_replica import EngineReplica

    count, num_tokens = 2048, 64
    echo = ray.remote(num_cpus=1)(Echo).remote()
    local = Echo()

    async def through_actor(per_item: int) -> float:
        t = time.perf_counter()
        async for ref in echo.stream.remote(count, num_tokens, per_item):
            await ref
        return (time.perf_counter() - t) / count

    async def in_process(per_item: int) -> float:
        t = time.perf_counter()
        async for _ in local.stream(count, num_tokens, per_item):
            pass
        return (time.perf_counter() - t) / count

    asyncio.run(through_actor(1))   # warm
    echo_ms = {}
    for per_item in (1, 16):      # one output per Ray item (a stream per request) vs a step's 16 outputs
        actor_s = min(asyncio.run(through_actor(per_item)) for _ in range(3))
        local_s = min(asyncio.run(in_process(per_item)) for _ in range(3))
        echo_ms[per_item] = {"actor_ms_per_output": 1e3 * actor_s, "in_process_ms_per_output": 1e3 * local_s}
    ray.kill(echo)

    # one stream, engine in this process vs the same engine behind an actor (1 thread each, alternated)
    config = EngineConfig(model=args.model, num_threads=1, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=args.itl_tokens, ignore_eos=True)
    engine = AsyncLLMEngine(config)
    replica = ray.remote(num_cpus=1)(EngineReplica).remote(config, 0)
    ray.get(replica.info.remote(), timeout=600)
    prompt_ids = list(range(100, 164))

    async def itl_local(rid: str) -> float:
        times = []
        async for _ in engine.generate(None, params, rid, prompt_token_ids=prompt_ids):
            times.append(time.perf_counter())
        return statistics.median(b - a for a, b in zip(times[1:], times[2:]))

    async def itl_actor(rid: str) -> float:
        times = []
        stream = replica.outputs.remote()
        await replica.add.remote(rid, None, params, prompt_ids)
        async for ref in stream:
            for out in await ref:
                times.append(time.perf_counter())
            if out.finished:
                break
        ray.cancel(stream)
        return statistics.median(b - a for a, b in zip(times[1:], times[2:]))

    local_itl, actor_itl = [], []

    async def rounds() -> None:   # one event loop: the in-process engine's loop lives in it
        await itl_local("warm-l")
        await itl_actor("warm-a")
        for i in range(args.itl_rounds):
            local_itl.append(await itl_local(f"l{i}"))
            actor_itl.append(await itl_actor(f"a{i}"))
        await engine.shutdown()

    asyncio.run(rounds())
    ray.kill(replica)
    return {"echo_outputs": count, "echo_tokens_per_output": num_tokens, "echo_ms": echo_ms,
            "hop_ms_per_output_unbatched": echo_ms[1]["actor_ms_per_output"] - echo_ms[1]["in_process_ms_per_output"],
            "hop_ms_per_output_batched16": echo_ms[16]["actor_ms_per_output"] - echo_ms[16]["in_process_ms_per_output"],
            "single_stream_itl_in_process_ms": [1e3 * x for x in local_itl],
            "single_stream_itl_actor_ms": [1e3 * x for x in actor_itl],
            "single_stream_itl_delta_ms": 1e3 * (statistics.median(actor_itl) - statistics.median(local_itl))}


def mean_run(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Numeric fields averaged over rounds."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            out[key] = statistics.fmean(r[key] for r in runs)
    return out


def project(runs: Dict[str, Dict[str, Any]], hop: Dict[str, Any]) -> Dict[str, Any]:
    """N machines, one replica (all cores) each, one router process: where the router saturates."""
    per_replica = runs["ray-1x2"]["output_tok_s"]          # one replica with the whole (2-core) machine
    r = runs["ray-2x1"]
    cpu_per_token = r["server_cpu_s"] / max(r["output_tokens"], 1)   # includes per-request work, spread
    router_tok_s = 1.0 / cpu_per_token                     # one core of router work
    rows = []
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        demand = n * per_replica
        rows.append({"machines": n, "replica_capacity_tok_s": demand,
                     "router_core_utilisation": demand / router_tok_s,
                     "served_tok_s": min(demand, router_tok_s)})
    return {"per_replica_tok_s": per_replica, "router_cpu_ms_per_token": 1e3 * cpu_per_token,
            "router_capacity_tok_s": router_tok_s, "machines_until_router_saturates": router_tok_s / per_replica,
            "ray_hop_ms_per_output_batched16": hop["hop_ms_per_output_batched16"], "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--itl-tokens", type=int, default=64)
    p.add_argument("--itl-rounds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="times each server configuration is measured")
    p.add_argument("--skip-serving", action="store_true", help="only the Ray hop measurements")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    ray_flags = ["--distributed-executor-backend", "ray"]
    configs = {
        "uni-1x2": ["--num-threads", "2"],
        "ray-1x2": [*ray_flags, "--data-parallel-size", "1", "--num-threads", "2"],
        "ray-1x1": [*ray_flags, "--data-parallel-size", "1", "--num-threads", "1"],
        "ray-2x1": [*ray_flags, "--data-parallel-size", "2", "--num-threads", "1"],
    }
    rounds: List[Dict[str, Dict[str, Any]]] = []
    for _ in range(0 if args.skip_serving else args.rounds):   # configs alternate: load drifts hit them alike
        rounds.append({label: serve_and_measure(label, flags, args) for label, flags in configs.items()})
    runs = {label: mean_run([r[label] for r in rounds]) for label in configs} if rounds else {}

    import ray

    temp = f"/tmp/srb-{os.getpid()}"
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=200 << 20,
             _temp_dir=temp, log_to_driver=False)
    try:
        hop = hop_overhead(args, ray)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    result = {"workload": vars(args), "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
              "runs": runs, "rounds": rounds, "hop": hop, "projection": project(runs, hop) if runs else None}
    out = RESULTS / ("ray_scaleout-hop.json" if args.skip_serving else "ray_scaleout.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{'config':<14}{'out tok/s':>11}{'req/s':>8}{'TTFT p50 ms':>13}{'TPOT p50 ms':>13}"
          f"{'server CPU ms/tok':>19}{'replica CPU ms/tok':>20}{'Ray sys CPU s':>15}{'outputs/item':>14}")
    for label, r in [(f"{k} r{i + 1}", v) for i, rnd in enumerate(rounds) for k, v in rnd.items()] + \
            [(f"{k} mean", v) for k, v in runs.items()]:
        print(f"{label:<14}{r['output_tok_s']:>11.1f}{r['request_s']:>8.2f}{r['ttft_median_ms']:>13.1f}"
              f"{r['tpot_median_ms']:>13.1f}{r['server_cpu_ms_per_token']:>19.3f}"
              f"{1e3 * r['replica_cpu_s'] / max(r['output_tokens'], 1):>20.3f}{r['ray_system_cpu_s']:>15.2f}"
              f"{r['outputs_per_ray_item'] or 0:>14.1f}")
    for per_item, e in hop["echo_ms"].items():
        print(f"\nRay hop, {per_item} output(s) of 64 tokens per Ray item: {e['actor_ms_per_output']:.4f} ms per output "
              f"via an actor vs {e['in_process_ms_per_output']:.5f} ms in-process")
    print(f"single stream ITL, medians of rounds: in-process {hop['single_stream_itl_in_process_ms']} ms, "
          f"actor {hop['single_stream_itl_actor_ms']} ms")
    pr = result["projection"]
    if pr is None:
        print(f"saved {out}")
        return
    print(f"\nrouter: {pr['router_cpu_ms_per_token']:.3f} CPU ms per streamed token -> one router core carries "
          f"{pr['router_capacity_tok_s']:.0f} tok/s = {pr['machines_until_router_saturates']:.1f} machines of "
          f"{pr['per_replica_tok_s']:.1f} tok/s")
    for row in pr["rows"]:
        print(f"  N={row['machines']:>4}: replicas {row['replica_capacity_tok_s']:>9.0f} tok/s, router core "
              f"{100 * row['router_core_utilisation']:>6.1f} %, served {row['served_tok_s']:>9.0f} tok/s")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
