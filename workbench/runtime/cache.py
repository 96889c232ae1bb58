"""The slot KV cache, allocated once per (slots, capacity), and the one rule for its capacity.

Each slot holds one sequence; `lengths[s]` is how many of its positions are filled. A slot is taken
with `acquire` and given back with `release`; nothing is copied when sequences join or leave, so a
captured CUDA graph of the decode step stays valid while the batch changes under it.
"""
from __future__ import annotations

import torch
from torch import nn

from workbench.errors import InputError

ATTENTION_BLOCK = 64  # keys per block of the decode attention kernel; cache capacities are multiples of it
CACHE_QUANTUM = 256  # capacities are rounded up to this, so captured decode graphs get reused


def cache_capacity(tokens: int, max_positions: int | None = None) -> int:
    """Positions a slot needs for `tokens` (prompt + completion): rounded up to CACHE_QUANTUM, so that a
    few more tokens reuse the same cache and graphs, and capped at the model's context (itself a
    multiple of ATTENTION_BLOCK where the fused kernels apply).

    >>> cache_capacity(129), cache_capacity(1000, max_positions=512)
    (256, 512)
    """
    if tokens < 1:
        raise InputError(f"a cache needs at least one position, got {tokens}")
    rounded = -(-tokens // CACHE_QUANTUM) * CACHE_QUANTUM
    return rounded if max_positions is None else min(int(max_positions), rounded)


class SlotKVCache:
    """Per layer, keys and values of shape (slots, kv_heads, capacity, head_dim), allocated once.

    Each slot holds one sequence; `lengths[s]` is how many of its positions are filled. A slot is taken
    with `acquire` and given back with `release`; nothing is copied when sequences join or leave.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int,
                 device, dtype: torch.dtype, value_dim: int | None = None, index_dim: int | None = None):
        if slots < 1 or capacity < 1:
            raise InputError(f"a KV cache needs at least one slot and one position, got {slots} x {capacity}")
        shape = (slots, kv_heads, capacity, head_dim)
        vshape = (slots, kv_heads, capacity, value_dim or head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(vshape, device=device, dtype=dtype) for _ in range(layers)]
        # DeepSeek-V3.2: its indexer's key per token (one head of `index_dim`), kept with the latents
        self.index_keys = [torch.zeros((slots, 1, capacity, index_dim), device=device, dtype=dtype)
                           for _ in range(layers)] if index_dim else []
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # read by the graphed step
        self.host_lengths = [0] * slots  # the same numbers, for host-side decisions without a sync
        self.slots, self.capacity = slots, capacity
        self._free = list(range(slots))

    @classmethod
    def for_model(cls, model: nn.Module, slots: int, capacity: int) -> "SlotKVCache":
        """The cache `model`'s layers write: per-head keys and values, or for multi-head latent attention
        (`kv_lora_rank` set) one latent of that size and one rope key per token, in the keys' and values'
        places, and DeepSeek-V3.2's index key per token (`runtime.decoder`)."""
        cfg = model.config
        p = next(model.parameters())
        if getattr(cfg, "kv_lora_rank", None):
            return cls(cfg.num_hidden_layers, slots, 1, capacity, cfg.kv_lora_rank, p.device, p.dtype,
                       value_dim=cfg.qk_rope_head_dim, index_dim=getattr(cfg, "index_head_dim", None))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, capacity, head_dim, p.device, p.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values + self.index_keys)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes, over all layers."""
        return self.nbytes // (self.slots * self.capacity)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise InputError(f"all {self.slots} cache slots are in use")
        slot = self._free.pop(0)
        self.set_length(slot, 0)
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise InputError(f"slot {slot} is not in use")
        self.set_length(slot, 0)
        self._free.append(slot)
        self._free.sort()

    def check_fits(self, prompt_tokens: int, new_tokens: int) -> None:
        """Raise before any work when a sequence cannot fit in one slot."""
        if prompt_tokens + new_tokens > self.capacity:
            raise InputError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({new_tokens}) exceeds the "
                             f"KV cache capacity of {self.capacity} tokens per sequence")

    def set_length(self, slot: int, n: int) -> None:
        self.host_lengths[slot] = n
        self.lengths[slot] = n

    def advance(self, active: torch.Tensor, active_slots: list[int]) -> None:
        """Every active slot has taken one more token (after a decode step)."""
        self.lengths += active
        for s in active_slots:
            self.host_lengths[s] += 1


def padded_batch(cache: SlotKVCache, slots: list[int], prompts: list[torch.Tensor], batch: int, length: int,
                 out: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as a right-padded (batch, length) id tensor with their slots and lengths. Rows beyond the
    prompts repeat the first prompt into its own slot: they write the very values it writes. `out`:
    existing (ids, rows, lengths) buffers to fill (a captured graph's inputs)."""
    device = cache.lengths.device
    ids, rows, lengths = out or (torch.zeros(batch, length, dtype=torch.long, device=device),
                                 torch.zeros(batch, dtype=torch.long, device=device),
                                 torch.zeros(batch, dtype=torch.long, device=device))
    ids.zero_()
    order = list(range(len(prompts))) + [0] * (batch - len(prompts))
    for row, i in enumerate(order):
        ids[row, :prompts[i].shape[0]] = prompts[i]
    rows.copy_(torch.tensor([slots[i] for i in order]))
    lengths.copy_(torch.tensor([prompts[i].shape[0] for i in order]))
    return ids, rows, lengths
