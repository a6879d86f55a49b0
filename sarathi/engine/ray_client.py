"""Data-parallel engine replicas on Ray behind one `EngineClient`.

    --data-parallel-size N --distributed-executor-backend ray [--ray-address auto|HOST:PORT|ray://HOST:PORT]

Each replica is a Ray actor (`EngineReplica`) holding a whole `AsyncLLMEngine`: its own KV cache,
`--num-threads` torch threads and as many CPUs declared to Ray, so Ray places the actors. The server
process keeps the tokenizer and a `Router`; `RayDataParallelClient.generate` validates a request,
routes it and adds it to the replica. Outputs come back through one Ray streaming generator per
replica (an async actor method yielding each step's outputs as one list), which a pump task in the
server hands out to the requests' queues. A replica that dies is restarted by Ray (`max_restarts`); its requests that
had streamed nothing yet are retried once on another replica, the others end with `ReplicaFailed`
(the server answers 503), and the router skips the replica until a health probe finds it again.

Objects crossing the actor boundary (EngineConfig, SamplingParams, RequestOutput) go through Ray's
own serializer, inside the cluster only; nothing from a client is deserialised.

The actors are in ray_replica.py; this file is the client the server talks to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from sarathi.config import EngineConfig
from sarathi.core.limits import EngineLimits
from sarathi.engine.engine_client import EngineDead, ReplicaFailed, RequestFailed
from sarathi.engine.ray_replica import EngineReplica, connect
from sarathi.engine.router import NoReplicaAvailable, Router, prefix_block_hashes
from sarathi.lora.request import LoRARequest
from sarathi.outputs import RequestOutput
from sarathi.sampling_params import InvalidParam, SamplingParams

logger = logging.getLogger("sarathi")

READY_TIMEOUT_S = 600.0        # replicas load their model in parallel; bounded all the same
HEALTH_INTERVAL_S = 0.5        # how often the monitor probes each replica
ALL_DOWN_FATAL_S = 300.0       # no replica for this long: the server reports the engine dead


class RayDataParallelClient:
    """An `EngineClient` over `data_parallel_size` EngineReplica actors."""

    def __init__(self, config: EngineConfig):
        from sarathi.model_executor.model_loader import resolve_model_dir
        from sarathi.transformers_utils.tokenizer import get_tokenizer

        par = config.parallel_config
        n = par.data_parallel_size
        threads = par.num_threads or max(1, (os.cpu_count() or 1) // n)
        self._owns_ray = connect(par, n * threads)
        import ray

        self._ray = ray
        self.model_path = resolve_model_dir(config.model_config.model)
        self.tokenizer = get_tokenizer(self.model_path, config.model_config.patch_tokenizer)
        replica_config = config.replace(data_parallel_size=1, distributed_executor_backend="uni", num_threads=threads)
        actor = ray.remote(num_cpus=threads, max_restarts=par.ray_max_restarts, max_task_retries=0,
                           scheduling_strategy="SPREAD")(EngineReplica)
        self.replicas = [actor.remote(replica_config, i) for i in range(n)]
        try:
            infos = ray.get([r.info.remote() for r in self.replicas], timeout=READY_TIMEOUT_S)
        except BaseException:
            self._release()
            raise
        self.model_name = infos[0]["model_name"]
        self.limits = EngineLimits(**infos[0]["limits"])
        self.num_threads = threads
        self.block_size = config.cache_config.block_size
        self.router = Router(n, prefix_affinity=par.routing == "prefix-affinity",
                             max_imbalance=par.routing_max_imbalance)
        self.errored: Optional[BaseException] = None
        self.on_dead: List[Callable[[BaseException], None]] = []
        self.replica_of: Dict[str, int] = {}          # request id -> replica index, while in flight
        self._streams: Dict[str, asyncio.Queue] = {}  # request id -> its outputs, filled by the pumps
        self._members: List[set] = [set() for _ in range(n)]   # request ids on each replica
        self._pumps: List[Optional[asyncio.Task]] = [None] * n  # one output reader per replica
        self._loras: Dict[str, Optional[str]] = dict(infos[0]["loras"])   # what every replica should serve
        self._optimal_sampling_models: List[str] = infos[0]["optimal_sampling_models"]
        self.pids = [info["pid"] for info in infos]
        self.restarts = [0] * n
        self.retries_total = 0
        self.failed_total = 0
        self._stats: List[Dict[str, Any]] = ray.get([r.get_stats.remote() for r in self.replicas], timeout=60)
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="ray-replica-monitor", daemon=True)
        self._monitor.start()
        logger.info("%d engine replicas on Ray (%d threads each, pids %s, routing %s)", n, threads, self.pids,
                    par.routing)

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    # ------------------------------------------------------------------ requests

    async def generate(self, prompt: Optional[str], sampling_params: SamplingParams, request_id: str,
                       prompt_token_ids: Optional[List[int]] = None,
                       lora_request: Optional[LoRARequest] = None) -> AsyncIterator[RequestOutput]:
        """Route, then stream the replica's outputs; retried once elsewhere if it dies before any output."""
        if self.errored is not None or self._stopping.is_set():
            raise EngineDead("the engine is not running (no replica came back, or shutting down)")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = asyncio.Queue()
        try:
            ids = await self._encode(prompt, prompt_token_ids)
            self.limits.check(sampling_params)
            hashes = prefix_block_hashes(ids, self.block_size) if self.router.prefix_affinity else []
            tried: set = set()
            while True:
                try:
                    replica = self.router.choose(hashes, exclude=tried)
                except NoReplicaAvailable as e:
                    self.failed_total += 1
                    raise ReplicaFailed(str(e)) from None
                i = replica.index
                tried.add(i)
                queue = self._streams[request_id] = asyncio.Queue()   # nothing left from a failed attempt
                self.replica_of[request_id] = i
                self._members[i].add(request_id)
                self._ensure_pump(i)
                streamed = done = False
                try:
                    await self.replicas[i].add.remote(request_id, prompt, sampling_params, ids, lora_request)
                    while True:
                        item = await queue.get()
                        if isinstance(item, BaseException):   # the pump lost the replica
                            raise item
                        if isinstance(item, dict):
                            done = True
                            raise _replica_error(item)
                        streamed, done = True, item.finished
                        yield item
                        if done:
                            return
                except self._ray.exceptions.RayError as e:
                    done = True
                    self._replica_down(i, e)
                    if streamed or len(tried) > 1:
                        self.failed_total += 1
                        raise ReplicaFailed(f"engine replica {i} failed during the request ({type(e).__name__}); "
                                            f"it is being restarted, retry the request") from None
                    self.retries_total += 1
                    logger.warning("request %s: replica %d failed before any output; retrying on another replica",
                                   request_id, i)
                finally:
                    self.router.finished(replica)
                    self._members[i].discard(request_id)
                    if not done:   # the consumer went away: stop the request on the replica
                        self._abort_on(i, request_id)
        finally:
            self._streams.pop(request_id, None)
            self.replica_of.pop(request_id, None)

    def _ensure_pump(self, index: int) -> None:
        task = self._pumps[index]
        if task is None or task.done():
            self._pumps[index] = asyncio.get_running_loop().create_task(self._pump(index))

    async def _pump(self, index: int) -> None:
        """Hand a replica's output batches to the requests' queues; if it dies, tell its requests."""
        stream = self.replicas[index].outputs.remote()
        try:
            async for ref in stream:
                for item in await ref:
                    rid = item["request_id"] if isinstance(item, dict) else item.request_id
                    queue = self._streams.get(rid)
                    if queue is not None:
                        queue.put_nowait(item)
            lost: BaseException = RequestFailed(f"replica {index}'s output stream ended")
        except self._ray.exceptions.RayError as e:
            self._replica_down(index, e)
            lost = e
        except asyncio.CancelledError:
            self._ray.cancel(stream)
            raise
        for rid in list(self._members[index]):
            queue = self._streams.get(rid)
            if queue is not None:
                queue.put_nowait(lost)

    def _abort_on(self, index: int, request_id: str) -> None:
        try:
            self.replicas[index].abort.remote(request_id)
        except Exception:  # noqa: BLE001 - a dead replica has nothing left to abort
            logger.debug("abort of %s on replica %d failed", request_id, index, exc_info=True)

    async def abort(self, request_id: str) -> None:
        index = self.replica_of.get(request_id)
        if index is not None:
            self._abort_on(index, request_id)

    # ------------------------------------------------------------------ LoRA adapters (on every replica)

    def list_loras(self) -> List[str]:
        return list(self._loras)

    def optimal_sampling_models(self) -> List[str]:
        """Second models every replica loaded as optimal sampling targets (--optimal-sampling-target)."""
        return list(self._optimal_sampling_models)

    def lora_path(self, name: str) -> Optional[str]:
        return self._loras.get(name)

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Load on every live replica; if one refuses, unload it from the others again."""
        done = await self._on_live_replicas("add_lora", lora_request)
        failed = [(i, err) for i, err in done if err is not None]
        if failed:
            await self._on_replicas([i for i, err in done if err is None], "remove_lora", lora_request.lora_name)
            raise _lora_error(failed[0][1])
        self._loras[lora_request.lora_name] = lora_request.lora_path

    async def remove_lora(self, name: str) -> None:
        """Unload from every live replica; if one refuses (in use), load it back on the others."""
        if name not in self._loras:
            raise KeyError(name)
        done = await self._on_live_replicas("remove_lora", name)
        failed = [(i, err) for i, err in done if err is not None]
        if failed:
            await self._on_replicas([i for i, err in done if err is None], "add_lora",
                                    LoRARequest(name, 0, self._loras[name]))
            raise _lora_error(failed[0][1])
        del self._loras[name]

    async def _on_live_replicas(self, method: str, arg: Any, no_arg: bool = False) -> List[Tuple[int, Any]]:
        return await self._on_replicas([r.index for r in self.router.replicas if r.up], method, arg, no_arg)

    async def _on_replicas(self, indices: List[int], method: str, arg: Any,
                           no_arg: bool = False) -> List[Tuple[int, Any]]:
        refs = [getattr(self.replicas[i], method).remote(*(() if no_arg else (arg,))) for i in indices]
        return list(zip(indices, await asyncio.gather(*refs)))

    def _reconcile_loras(self, index: int) -> None:
        """A restarted replica loaded --lora-modules again: bring it to the adapters served now."""
        ray, actor = self._ray, self.replicas[index]
        have = ray.get(actor.loras.remote(), timeout=60)
        calls = [actor.remove_lora.remote(name) for name in have if name not in self._loras]
        calls += [actor.add_lora.remote(LoRARequest(name, 0, path)) for name, path in list(self._loras.items())
                  if name not in have]
        for err in ray.get(calls, timeout=300):
            if err is not None:
                logger.error("replica %d: adapters after its restart: %s", index, err[1])

    async def _encode(self, prompt: Optional[str], prompt_token_ids: Optional[List[int]]) -> List[int]:
        """The prompt checked as every entry checks it, so bad input never reaches a replica."""
        if prompt_token_ids is None:
            if not isinstance(prompt, str) or prompt == "":
                raise ValueError("prompt must be a non-empty string (or pass prompt_token_ids)")
            prompt_token_ids = list(await asyncio.to_thread(self.tokenizer.encode, prompt))
        self.limits.check_prompt(prompt_token_ids)
        return list(prompt_token_ids)

    async def reset_prefix_cache(self) -> int:
        """Every live replica forgets its cached blocks; returns how many in all."""
        return sum(n for _, n in await self._on_live_replicas("reset_prefix_cache", None, no_arg=True))

    # ------------------------------------------------------------------ health and stats

    def _replica_down(self, index: int, error: BaseException) -> None:
        if self.router.replicas[index].up:
            logger.error("engine replica %d is down (%s); Ray restarts it", index, type(error).__name__)
        self.router.set_up(index, False)

    def _watch(self) -> None:
        """Probe every replica's stats; a replica answering from a new pid was restarted."""
        ray = self._ray
        probes: List[Any] = [None] * len(self.replicas)
        all_down_since: Optional[float] = None
        while not self._stopping.wait(HEALTH_INTERVAL_S):
            for i, actor in enumerate(self.replicas):
                if probes[i] is None:
                    probes[i] = actor.get_stats.remote()
            ready, _ = ray.wait([p for p in probes if p is not None], num_returns=len(probes), timeout=2.0)
            for i, probe in enumerate(probes):
                if probe not in ready:
                    continue     # busy or restarting: keep waiting on the same probe
                probes[i] = None
                try:
                    stats = ray.get(probe)
                except ray.exceptions.RayError as e:
                    self._replica_down(i, e)
                    continue
                if stats["pid"] != self.pids[i]:
                    self.restarts[i] += 1
                    logger.warning("engine replica %d is back (pid %d -> %d)", i, self.pids[i], stats["pid"])
                    self.pids[i] = stats["pid"]
                    try:
                        self._reconcile_loras(i)
                    except (ray.exceptions.RayError, TimeoutError) as e:
                        self._replica_down(i, e)
                        continue
                if not self.router.replicas[i].up:
                    self.router.set_up(i, True)
                self._stats[i] = stats
            if any(r.up for r in self.router.replicas):
                all_down_since = None
            elif all_down_since is None:
                all_down_since = time.monotonic()
            elif time.monotonic() - all_down_since > ALL_DOWN_FATAL_S and self.errored is None:
                self.errored = EngineDead(f"no engine replica came back within {ALL_DOWN_FATAL_S:.0f}s")
                for callback in self.on_dead:
                    callback(self.errored)

    def health(self) -> Dict[str, Any]:
        """/health: ok (every replica up), degraded (some down) or down (none)."""
        replicas = [{"replica": r.index, "up": r.up, "pid": self.pids[r.index], "restarts": self.restarts[r.index],
                     "outstanding_requests": r.outstanding} for r in self.router.replicas]
        up = sum(r["up"] for r in replicas)
        status = "ok" if up == len(replicas) else "degraded" if up else "down"
        return {"status": status, "replicas": replicas}

    def get_stats(self) -> Dict[str, Any]:
        """Totals over the replicas (same keys as one engine) plus `replicas`: each one's gauges."""
        per: List[Dict[str, float]] = []
        for r in self.router.replicas:
            s = {k: float(v) for k, v in self._stats[r.index].items() if isinstance(v, (int, float))}
            s.update(up=float(r.up), outstanding_requests=float(r.outstanding), routed_total=float(r.routed_total),
                     restarts_total=float(self.restarts[r.index]))
            per.append(s)
        totals: Dict[str, Any] = {}
        for s in per:
            for key, value in s.items():
                if key not in _NOT_ADDITIVE:
                    totals[key] = totals.get(key, 0.0) + value
        if totals.get("kv_bytes_total"):
            totals["kv_usage"] = totals.get("kv_bytes_used", 0.0) / totals["kv_bytes_total"]
        # requests routed but not yet running anywhere count as waiting (for --max-queue-len)
        totals["num_waiting_requests"] = max(totals.get("num_waiting_requests", 0.0),
                                             totals["outstanding_requests"] - totals.get("num_running", 0.0))
        info = next((s["model_info"] for s in self._stats if isinstance(s.get("model_info"), dict)), None)
        if info is not None:
            totals["model_info"] = info
        loras = [s["lora"] for s in self._stats if isinstance(s.get("lora"), dict)]
        if loras:
            totals["lora"] = {"running": sorted({n for x in loras for n in x["running"]}),
                              "waiting": sorted({n for x in loras for n in x["waiting"]}),
                              "max_lora": loras[0]["max_lora"]}
        totals.update(replicas=per, router_retries_total=self.retries_total, router_failed_total=self.failed_total,
                      router_affinity_hits_total=self.router.affinity_hits,
                      router_imbalance_fallbacks_total=self.router.imbalance_fallbacks)
        return totals

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        """Stop probing, end the replicas (their open streams fail), leave a shared Ray running."""
        self._stopping.set()
        for task in self._pumps:
            if task is not None and not task.done():
                task.cancel()
        await asyncio.to_thread(self._monitor.join, 10)
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        for actor in self.replicas:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._owns_ray:
            self._ray.shutdown()


# Gauges that do not add up over replicas (a ratio, a size, an identity).
_NOT_ADDITIVE = {"kv_usage", "kv_block_tokens", "pid", "kv_cache_kv_page_size"}


def _lora_error(err: Tuple[str, str]) -> Exception:
    kind, message = err
    return KeyError(message) if kind == "KeyError" else ValueError(message)


def _replica_error(item: Dict[str, Any]) -> Exception:
    kind, message = item.get("error"), item.get("message", "")
    if kind == "invalid":
        return InvalidParam(item.get("param") or "prompt", message)
    if kind == "dead":
        return ReplicaFailed(f"an engine replica failed: {message}")
    return RequestFailed(message)
