"""Prometheus metrics of the server (`GET /metrics`), vLLM's meanings under a `sarathi:` prefix.

Engine-wide gauges and counters are read from `engine.get_stats()` at scrape time (so
they are never stale); per-request latency histograms are observed when a request
finishes, from the timestamps in its `RequestMetrics`.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from sarathi.outputs import RequestOutput

# the *_created timestamp samples only add noise to a scrape
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineStatsCollector:
    """Turns one `engine.get_stats()` call into gauges and counters on every scrape."""

    def __init__(self, get_stats: Callable[[], Optional[Dict]]):
        self.get_stats = get_stats

    def collect(self):
        stats = self.get_stats() or {}
        gauges = [("num_requests_running", "Requests in the running batch", "num_running"),
                  ("num_requests_waiting", "Requests waiting to be scheduled (not yet running)", "num_waiting_requests"),
                  ("kv_cache_usage_perc", "Fraction of the KV cache in use (0..1)", "kv_usage"),
                  ("kv_cache_bytes_total", "Physical KV cache bytes (the budget)", "kv_bytes_total"),
                  ("kv_cache_bytes_used", "Physical KV cache bytes held by requests", "kv_bytes_used")]
        for name, doc, key in gauges:
            if key in stats:
                g = GaugeMetricFamily(f"sarathi:{name}", doc)
                g.add_metric([], float(stats[key]))
                yield g
        # what the KV backend itself reports (mapped / committed / free / reserved bytes, page size),
        # figures that come from the kernel or the CUDA driver
        for key, value in stats.items():
            if key.startswith("kv_cache_") and isinstance(value, (int, float)):
                name = key[len("kv_cache_"):].removeprefix("kv_")
                g = GaugeMetricFamily(f"sarathi:kv_backend_{name}", f"KV cache backend: {name}")
                g.add_metric([], float(value))
                yield g
        info = stats.get("model_info")
        if isinstance(info, dict):
            g = GaugeMetricFamily("sarathi:model_info", "Weight format and kernel ISA of the served model (value 1)",
                                  labels=sorted(info))
            g.add_metric([str(info[k]) for k in sorted(info)], 1.0)
            yield g
        lora = stats.get("lora")
        if isinstance(lora, dict):  # vLLM's lora_requests_info: adapters in the labels, value = time
            g = GaugeMetricFamily("sarathi:lora_requests_info", "Running and waiting LoRA adapters",
                                  labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
            g.add_metric([",".join(lora["running"]), ",".join(lora["waiting"]), str(lora["max_lora"])], time.time())
            yield g
        counters = [("prompt_tokens", "Prompt tokens processed", "prompt_tokens_total"),
                    ("generation_tokens", "Tokens generated", "generation_tokens_total"),
                    ("num_preemptions", "Requests preempted (recompute)", "num_preemptions_total"),
                    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
                    ("prefix_cache_hits", "Prompt tokens found in the prefix cache", "prefix_cache_hits")]
        counters += _ROUTER_COUNTERS + _SPEC_DECODE_COUNTERS
        for name, doc, key in counters:
            if key in stats:
                c = CounterMetricFamily(f"sarathi:{name}", doc)
                c.add_metric([], float(stats[key]))
                yield c
        per_pos = stats.get("spec_decode_num_accepted_tokens_per_pos")
        if isinstance(per_pos, list):   # vLLM's name: accepted drafts by their position in the draft
            c = CounterMetricFamily("sarathi:spec_decode_num_accepted_tokens_per_pos",
                                    "Accepted draft tokens by position in the draft", labels=["position"])
            for pos, n in enumerate(per_pos):
                c.add_metric([str(pos)], float(n))
            yield c
        so = stats.get("structured_outputs")
        if isinstance(so, dict):
            yield from _structured_outputs(so)
        replicas = stats.get("replicas")
        if isinstance(replicas, list):   # engine replicas (Ray): one series per replica
            yield from _per_replica(replicas)


# Data-parallel replicas: the router's counters, and (name, doc, stats key) per replica.
_ROUTER_COUNTERS = [
    ("router_retries", "Requests retried on another replica (theirs died before any output)", "router_retries_total"),
    ("router_failed", "Requests ended with 503 because their replica died", "router_failed_total"),
    ("router_affinity_hits", "Requests routed to the replica holding their prefix", "router_affinity_hits_total"),
    ("router_imbalance_fallbacks", "Prefix-affine requests sent to the least loaded replica instead",
     "router_imbalance_fallbacks_total"),
]
_SPEC_DECODE_COUNTERS = [
    ("spec_decode_num_drafts", "Drafts verified (one per speculating sequence per step)", "spec_decode_num_drafts_total"),
    ("spec_decode_num_draft_tokens", "Draft tokens verified", "spec_decode_num_draft_tokens_total"),
    ("spec_decode_num_accepted_tokens", "Draft tokens accepted", "spec_decode_num_accepted_tokens_total"),
]
_REPLICA_GAUGES = [
    ("replica_up", "1 while the replica serves, 0 while Ray restarts it", "up"),
    ("replica_outstanding_requests", "Requests routed to the replica and not finished", "outstanding_requests"),
    ("replica_num_requests_running", "Requests in the replica's running batch", "num_running"),
    ("replica_num_requests_waiting", "Requests waiting in the replica's scheduler", "num_waiting_requests"),
    ("replica_kv_cache_usage_perc", "Fraction of the replica's KV cache in use (0..1)", "kv_usage"),
]
_REPLICA_COUNTERS = [
    ("replica_requests_routed", "Requests the router sent to the replica", "routed_total"),
    ("replica_restarts", "Times the replica came back from a new process", "restarts_total"),
    ("replica_requests_aborted", "Requests the replica stopped on an abort (client gone)", "aborted_total"),
    ("replica_generation_tokens", "Tokens the replica generated (since its last restart)", "generation_tokens_total"),
    ("replica_stream_items", "Ray items the replica streamed (each carries a step's outputs)", "stream_items_total"),
    ("replica_stream_outputs", "Request outputs the replica streamed", "stream_outputs_total"),
]


_STRUCTURED_COUNTERS = [
    ("structured_outputs_requests", "Requests with a structured-output constraint", "requests_total"),
    ("structured_outputs_compile_cache_hits", "Constraints found compiled", "compile_cache_hits_total"),
    ("structured_outputs_compile_cache_misses", "Constraints compiled", "compile_cache_misses_total"),
    ("structured_outputs_compile_failures", "Constraints that failed to compile (or timed out)",
     "compile_failures_total"),
]


def _structured_outputs(so: Dict):
    for name, doc, key in _STRUCTURED_COUNTERS:
        c = CounterMetricFamily(f"sarathi:{name}", doc)
        c.add_metric([], float(so.get(key, 0)))
        yield c
    h = HistogramMetricFamily("sarathi:structured_outputs_compile_seconds", "Time to compile a constraint")
    buckets = [(str(le), float(n)) for le, n in so.get("compile_seconds_buckets", [])]
    h.add_metric([], buckets + [("+Inf", float(so.get("compile_seconds_count", 0)))],
                 float(so.get("compile_seconds_sum", 0.0)))
    yield h


def _per_replica(replicas):
    for families, kind in ((_REPLICA_GAUGES, GaugeMetricFamily), (_REPLICA_COUNTERS, CounterMetricFamily)):
        for name, doc, key in families:
            family = kind(f"sarathi:{name}", doc, labels=["replica"])
            for i, stats in enumerate(replicas):
                if key in stats:
                    family.add_metric([str(i)], float(stats[key]))
            yield family


class ServerMetrics:
    """One registry per server (tests start several apps in one process)."""

    def __init__(self, get_stats: Callable[[], Optional[Dict]]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(get_stats))
        r = self.registry
        self.ttft = Histogram("sarathi:time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("sarathi:inter_token_latency_seconds", "Time between output tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("sarathi:e2e_request_latency_seconds", "Arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("sarathi:request_queue_time_seconds", "Arrival to first scheduled",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.finished = Counter("sarathi:request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=r)
        self.rejected = Counter("sarathi:request_rejected", "Requests refused by the server by HTTP status",
                                ["status"], registry=r)

    def observe_finished(self, out: RequestOutput) -> None:
        for completion in out.outputs:
            self.finished.labels(completion.finish_reason or "unknown").inc()
        m = out.metrics
        if m is None:
            return
        for hist, value in ((self.ttft, m.ttft), (self.e2e, m.e2e_latency), (self.queue, m.queue_time)):
            if value is not None:
                hist.observe(value)
        for gap in m.inter_token_latencies:
            self.itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
