"""The actor side of data-parallel replicas on Ray: `EngineReplica` holds a whole
`AsyncLLMEngine` (its own KV cache, `--num-threads` torch threads and as many CPUs declared
to Ray) and streams its outputs back; `connect` joins or starts the Ray instance, loopback
only unless a cluster is named (see ray_client.py for the whole picture).

Loopback: a local instance (no --ray-address) and a loopback --ray-address set Ray's
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported; with it Ray keeps 127.0.0.1 as the node
address instead of replacing it with the machine's routable one, so every Ray process binds and
dials 127.0.0.1. A cluster on several machines is joined with its real address and this is not set.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Tuple

from sarathi.config import EngineConfig, ParallelConfig
from sarathi.engine.engine_client import EngineDead, RequestFailed
from sarathi.lora.request import LoRARequest
from sarathi.sampling_params import InvalidParam, SamplingParams

logger = logging.getLogger("sarathi")

INSTALL_HINT = "--distributed-executor-backend ray needs Ray: pip install -e '.[ray]' (or pip install ray)"
LOCAL_OBJECT_STORE_BYTES = 200 << 20   # outputs are small; Ray's default is 30 % of RAM


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def import_ray(address: Optional[str]):
    """Import Ray, loopback-only unless joining a cluster by a non-loopback address."""
    loopback = address is None or _is_loopback(address)
    if loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    if loopback and getattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False):
        logger.warning("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: its processes may "
                       "use this machine's routable address instead of 127.0.0.1; set it in the environment")
    return ray


def connect(config: ParallelConfig, num_cpus_needed: int) -> bool:
    """ray.init as --ray-address says; True when this process started (and so owns) the instance."""
    ray = import_ray(config.ray_address)
    owns = False
    if not ray.is_initialized():
        if config.ray_address is None:
            cpus = os.cpu_count() or 1
            if num_cpus_needed > cpus:
                raise ValueError(f"{config.data_parallel_size} replicas need {num_cpus_needed} CPUs "
                                 f"(--num-threads per replica); this machine has {cpus}")
            ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, namespace="sarathi")
            owns = True
        else:
            local = _is_loopback(config.ray_address)
            ray.init(address=config.ray_address, namespace="sarathi",
                     **({"_node_ip_address": "127.0.0.1"} if local else {}))
    available = ray.cluster_resources().get("CPU", 0)
    if num_cpus_needed > available:
        if owns:
            ray.shutdown()
        raise ValueError(f"{config.data_parallel_size} replicas need {num_cpus_needed} CPUs; "
                         f"the Ray cluster has {available:g}")
    return owns


class EngineReplica:
    """One Ray actor: an AsyncLLMEngine, requests in through `add`, outputs out through `outputs`.

    All of a replica's outputs leave through one stream, a list per item with everything produced
    since the previous item (about one engine step's outputs), not one Ray stream per request:
    a Ray item costs the same whether it carries one output or sixty (docs/ray.md)."""

    def __init__(self, config: EngineConfig, index: int):
        from sarathi.engine.async_llm_engine import AsyncLLMEngine

        self.index = index
        self.engine = AsyncLLMEngine(config)
        self.engine.on_dead.append(self._engine_died)
        self.aborted_total = 0
        self.stream_items_total = 0      # Ray items sent by outputs(), and the outputs they carried
        self.stream_outputs_total = 0
        self._pending: List[Any] = []            # outputs and error markers not yet streamed
        self._ready: Optional[asyncio.Event] = None
        self._consumer: Optional[object] = None  # the newest outputs() call; older ones stop
        self._tasks: set = set()

    def info(self) -> Dict[str, Any]:
        import torch

        return {"pid": os.getpid(), "model_name": self.engine.model_name, "limits": asdict(self.engine.limits),
                "num_threads": torch.get_num_threads(), "index": self.index, "loras": self.loras(),
                "optimal_sampling_models": self.engine.optimal_sampling_models()}

    def loras(self) -> Dict[str, Optional[str]]:
        """Adapter name -> its path, as loaded in this replica."""
        return {name: self.engine.lora_path(name) for name in self.engine.list_loras()}

    async def add_lora(self, lora_request: LoRARequest) -> Optional[Tuple[str, str]]:
        """None when loaded, else (exception type name, message): the client raises it again."""
        try:
            await self.engine.add_lora(lora_request)
        except (ValueError, KeyError) as e:
            return type(e).__name__, str(e)
        return None

    async def remove_lora(self, name: str) -> Optional[Tuple[str, str]]:
        try:
            await self.engine.remove_lora(name)
        except (ValueError, KeyError) as e:
            return type(e).__name__, str(e)
        return None

    def get_stats(self) -> Dict[str, Any]:
        stats = self.engine.get_stats()
        stats.update(pid=os.getpid(), aborted_total=self.aborted_total, stream_items_total=self.stream_items_total,
                     stream_outputs_total=self.stream_outputs_total)
        return stats

    async def add(self, request_id: str, prompt: Optional[str], params: SamplingParams,
                  prompt_token_ids: List[int], lora_request: Optional[LoRARequest] = None) -> None:
        """Start a request; its outputs (or an error marker) go to the output stream."""
        task = asyncio.get_running_loop().create_task(
            self._run(request_id, prompt, params, prompt_token_ids, lora_request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def reset_prefix_cache(self) -> int:
        return await self.engine.reset_prefix_cache()

    async def outputs(self):
        """The replica's output stream (one consumer: a newer call ends the older one)."""
        me = self._consumer = object()
        ready = self._event()
        while self._consumer is me:
            if not self._pending:
                ready.clear()
                await ready.wait()
                continue
            batch, self._pending = self._pending, []
            self.stream_items_total += 1
            self.stream_outputs_total += len(batch)
            yield batch

    def _event(self) -> asyncio.Event:
        if self._ready is None:
            self._ready = asyncio.Event()
        return self._ready

    def _emit(self, item: Any) -> None:
        self._pending.append(item)
        self._event().set()

    async def _run(self, request_id: str, prompt: Optional[str], params: SamplingParams,
                   prompt_token_ids: List[int], lora_request: Optional[LoRARequest]) -> None:
        completed = False
        try:
            async for out in self.engine.generate(prompt, params, request_id, prompt_token_ids=prompt_token_ids,
                                                  lora_request=lora_request):
                completed = out.finished and any(c.finish_reason != "abort" for c in out.outputs)
                self._emit(out)
        except InvalidParam as e:
            completed = True
            self._emit({"request_id": request_id, "error": "invalid", "message": str(e), "param": e.param})
        except ValueError as e:
            completed = True
            self._emit({"request_id": request_id, "error": "invalid", "message": str(e), "param": "prompt"})
        except (RequestFailed, EngineDead) as e:
            completed = True
            kind = "dead" if isinstance(e, EngineDead) else "failed"
            self._emit({"request_id": request_id, "error": kind, "message": str(e)})
        finally:
            if not completed:   # aborted (the client went away)
                self.aborted_total += 1

    def _engine_died(self, error: BaseException) -> None:
        # The engine gave up (repeated forward failures): end the process so that Ray restarts it,
        # after the open streams have been handed their error.
        logger.error("replica %d: engine died (%r); exiting so that Ray restarts it", self.index, error)
        asyncio.get_running_loop().call_later(0.5, os._exit, 1)
