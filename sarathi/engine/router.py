"""Which engine replica gets a request: least outstanding requests, or prefix affinity.

Torch-free and Ray-free, so the policies are unit-testable in milliseconds. The Ray client
(`ray_engine.py`) counts each replica's requests in flight and asks `Router.choose`.

Prefix affinity hashes the prompt's full blocks of `block_size` tokens as a chain (block i's
hash covers blocks 0..i, SHA-256 as vLLM's prefix cache does), remembers which replica served
each hash, and sends a prompt to the replica that served its longest known prefix, so that
the replica's prefix cache can hit. The hashing is self-contained here; it can later be
pointed at the engine's own prefix-cache hashes.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Set

# Remembered block hashes (all replicas together); the oldest are forgotten first.
MAX_REMEMBERED_BLOCKS = 200_000


def prefix_block_hashes(token_ids: Sequence[int], block_size: int) -> List[bytes]:
    """Chained SHA-256 of each full block: hash(i) = sha256(hash(i-1) || tokens of block i)."""
    hashes: List[bytes] = []
    parent = b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start:start + block_size]
        parent = hashlib.sha256(parent + b"".join(int(t).to_bytes(4, "little") for t in block)).digest()
        hashes.append(parent)
    return hashes


@dataclass
class ReplicaLoad:
    """What the router knows of one replica."""

    index: int
    outstanding: int = 0     # requests routed to it and not finished
    up: bool = True          # False while Ray restarts it
    routed_total: int = 0


class NoReplicaAvailable(RuntimeError):
    """Every replica is down (restarting) or excluded."""


class Router:
    """Least outstanding requests; with `prefix_affinity`, the replica holding the longest
    known prefix unless it has more than `max_imbalance` requests more than the least loaded."""

    def __init__(self, num_replicas: int, prefix_affinity: bool = False, max_imbalance: int = 8):
        self.replicas = [ReplicaLoad(i) for i in range(num_replicas)]
        self.prefix_affinity = prefix_affinity
        self.max_imbalance = max_imbalance
        self._owner: "OrderedDict[bytes, int]" = OrderedDict()   # block hash -> replica index
        self._lock = threading.Lock()    # the health monitor thread forgets a restarted replica's blocks
        self.affinity_hits = 0
        self.imbalance_fallbacks = 0

    def choose(self, block_hashes: Sequence[bytes] = (), exclude: Set[int] = frozenset()) -> ReplicaLoad:
        """Pick a replica for a prompt, record it and count the request as outstanding there."""
        with self._lock:
            live = [r for r in self.replicas if r.up and r.index not in exclude]
            if not live:
                raise NoReplicaAvailable("no engine replica is available (all are restarting)")
            least = min(live, key=lambda r: (r.outstanding, r.routed_total))
            chosen = least
            if self.prefix_affinity and block_hashes:
                affine = self._longest_prefix_owner(block_hashes, {r.index for r in live})
                if affine is not None:
                    if affine.outstanding - least.outstanding <= self.max_imbalance:
                        chosen = affine
                        self.affinity_hits += 1
                    else:
                        self.imbalance_fallbacks += 1
                self._remember(block_hashes, chosen.index)
            chosen.outstanding += 1
            chosen.routed_total += 1
            return chosen

    def finished(self, replica: ReplicaLoad) -> None:
        with self._lock:
            replica.outstanding -= 1

    def set_up(self, index: int, up: bool) -> None:
        """Mark a replica down (it died) or up again; a restarted replica has an empty cache."""
        with self._lock:
            replica = self.replicas[index]
            if up and not replica.up:
                for h in [h for h, owner in self._owner.items() if owner == index]:
                    del self._owner[h]
            replica.up = up

    def _longest_prefix_owner(self, block_hashes: Sequence[bytes], live: Set[int]) -> Optional[ReplicaLoad]:
        for h in reversed(block_hashes):
            owner = self._owner.get(h)
            if owner is not None and owner in live:
                return self.replicas[owner]
        return None

    def _remember(self, block_hashes: Sequence[bytes], index: int) -> None:
        for h in block_hashes:
            self._owner[h] = index
            self._owner.move_to_end(h)
        while len(self._owner) > MAX_REMEMBERED_BLOCKS:
            self._owner.popitem(last=False)
