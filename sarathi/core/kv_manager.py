"""Torch-free accounting of KV memory for the scheduler.

Memory is counted in blocks of `block_size` tokens (a paged block; for vAttention
one page in every layer's K and V region; for the contiguous backend a whole slot).
Every running sequence also holds one slot.
"""
from __future__ import annotations

from typing import Dict, List


class KVManager:
    def __init__(self, num_blocks: int, block_size: int, num_slots: int, watermark: float = 0.01):
        if num_blocks < 1 or block_size < 1 or num_slots < 1:
            raise ValueError(f"KV layout needs at least one block and slot, got num_blocks={num_blocks}, "
                             f"block_size={block_size}, num_slots={num_slots}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_slots
        self.watermark_blocks = max(1, int(watermark * num_blocks)) if num_blocks > 1 else 0
        self._free_blocks: List[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self._free_slots: List[int] = list(range(num_slots - 1, -1, -1))
        self._tables: Dict[int, List[int]] = {}
        self._slots: Dict[int, int] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def fits(self, num_tokens: int) -> bool:
        """Could a sequence of num_tokens ever be held (it is alone in the cache)?"""
        return self.blocks_for(num_tokens) <= self.num_blocks

    def can_admit(self, num_tokens: int, extra_blocks: int = 0) -> bool:
        """A free slot and room for num_tokens, keeping the watermark plus extra_blocks free."""
        need = self.blocks_for(num_tokens) + self.watermark_blocks + extra_blocks
        return bool(self._free_slots) and need <= self.num_free_blocks

    def admit(self, seq_id: int, num_tokens: int) -> int:
        """Take a slot and blocks for num_tokens; returns the slot."""
        if seq_id in self._slots:
            raise ValueError(f"sequence {seq_id} already holds slot {self._slots[seq_id]}")
        if not self._free_slots or self.blocks_for(num_tokens) > self.num_free_blocks:
            raise RuntimeError(f"no room to admit sequence {seq_id} ({num_tokens} tokens)")
        slot = self._free_slots.pop()
        self._slots[seq_id] = slot
        self._tables[seq_id] = []
        self.grow(seq_id, num_tokens)
        return slot

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(self._tables[seq_id]) <= self.num_free_blocks

    def grow(self, seq_id: int, num_tokens: int) -> None:
        table = self._tables[seq_id]
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks growing sequence {seq_id} to {num_tokens} tokens")
        for _ in range(need):
            table.append(self._free_blocks.pop())

    def free(self, seq_id: int) -> int:
        """Give back a sequence's blocks and slot; returns the slot."""
        self._free_blocks.extend(reversed(self._tables.pop(seq_id)))
        slot = self._slots.pop(seq_id)
        self._free_slots.append(slot)
        return slot

    def slot(self, seq_id: int) -> int:
        return self._slots[seq_id]

    def block_table(self, seq_id: int) -> List[int]:
        return self._tables[seq_id]

    def blocks_held(self, seq_id: int) -> int:
        return len(self._tables[seq_id])

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._slots
