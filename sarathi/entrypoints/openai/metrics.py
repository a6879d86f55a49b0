"""Prometheus metrics of the server (`GET /metrics`), vLLM's meanings under a `sarathi:` prefix.

Engine-wide gauges and counters are read from `engine.get_stats()` at scrape time (so
they are never stale); per-request latency histograms are observed when a request
finishes, from the timestamps in its `RequestMetrics`.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        for name, doc, key in counters:
            if key in stats:
                c = CounterMetricFamily(f"sarathi:{name}", doc)
                c.add_metric([], float(stats[key]))
                yield c


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
