"""The engine's own decode loop: prefill and decode split over a slot-based static KV cache.

    cache = SlotKVCache.for_model(model, slots=4, capacity=512)
    decoder = Decoder(model)
    for event in decode_loop(decoder, cache, [Sequence(prompt_ids, SamplingParams(max_new_tokens=32))], eos):
        ...

Why our own loop rather than transformers' `generate`: a static cache whose tensors never move lets the
whole decode step be captured once in a CUDA graph (no Python or launch overhead per token), and slots
let sequences of different lengths join and leave between steps (continuous batching builds on it).

The decoder runs the model's own modules (embeddings, norms, rotary embedding, projections, MLP), so
every policy wrapper applies unchanged; only the attention over the cache is ours. It covers the
Llama family (llama, mistral, qwen2, qwen3); other architectures keep transformers' `generate`
(`unsupported_reason` says why).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import InputError, ModelError

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


# ---- the cache ------------------------------------------------------------------------------------------------
class SlotKVCache:
    """Per layer, keys and values of shape (slots, kv_heads, capacity, head_dim), allocated once.

    Each slot holds one sequence; `lengths[s]` is how many of its positions are filled. A slot is taken
    with `acquire` and given back with `release`; nothing is copied when sequences join or leave.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int,
                 device, dtype: torch.dtype, value_dim: int | None = None):
        if slots < 1 or capacity < 1:
            raise InputError(f"a KV cache needs at least one slot and one position, got {slots} x {capacity}")
        shape = (slots, kv_heads, capacity, head_dim)
        vshape = (slots, kv_heads, capacity, value_dim or head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(vshape, device=device, dtype=dtype) for _ in range(layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # read by the graphed step
        self.host_lengths = [0] * slots  # the same numbers, for host-side decisions without a sync
        self.slots, self.capacity = slots, capacity
        self._free = list(range(slots))

    @classmethod
    def for_model(cls, model: nn.Module, slots: int, capacity: int) -> "SlotKVCache":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, capacity, head_dim, p.device, p.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise InputError(f"all {self.slots} cache slots are in use")
        slot = self._free.pop(0)
        self._set_length(slot, 0)
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise InputError(f"slot {slot} is not in use")
        self._set_length(slot, 0)
        self._free.append(slot)
        self._free.sort()

    def check_fits(self, prompt_tokens: int, new_tokens: int) -> None:
        """Raise before any work when a sequence cannot fit in one slot."""
        if prompt_tokens + new_tokens > self.capacity:
            raise InputError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({new_tokens}) exceeds the "
                             f"KV cache capacity of {self.capacity} tokens per sequence")

    def _set_length(self, slot: int, n: int) -> None:
        self.host_lengths[slot] = n
        self.lengths[slot] = n

    def advance(self, active: torch.Tensor, active_slots: list[int]) -> None:
        """Every active slot has taken one more token (after a decode step)."""
        self.lengths += active
        for s in active_slots:
            self.host_lengths[s] += 1


# ---- the model ------------------------------------------------------------------------------------------------
def unsupported_reason(model: nn.Module) -> str | None:
    """None when `Decoder` can run `model`; otherwise why not (the engine then uses transformers)."""
    cfg = model.config
    if cfg.model_type not in LLAMA_FAMILY:
        return f"architecture {cfg.model_type!r} (the decode loop covers {', '.join(LLAMA_FAMILY)})"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "an unexpected module layout"
    return None


class Decoder:
    """Runs a Llama-family model's layers over a SlotKVCache: `prefill` one slot, `step` all slots."""

    def __init__(self, model: nn.Module):
        reason = unsupported_reason(model)
        if reason:
            raise ModelError(f"the decode loop cannot run this model: {reason}")
        self.model = model
        inner = model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.lm_head = model.get_output_embeddings()
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.fused = fused_reason(model) is None  # the decode step's Triton kernels (kernels/decode_ops.py)

    @property
    def sparse_attention(self) -> bool:
        """True when a layer runs a key selector (or a capture): that path is not graph-capturable."""
        return any(getattr(l.self_attn, "workbench_capture", None) is not None
                   or not getattr(getattr(l.self_attn, "workbench_attention", None), "is_identity", True)
                   for l in self.layers)

    def prefill(self, cache: SlotKVCache, slot: int, ids: torch.Tensor) -> torch.Tensor:
        """Write a prompt (T,) into `slot` (from its start) and return the last position's logits (V,)."""
        return self.prefill_batch(cache, [slot], [ids])[0]

    def prefill_batch(self, cache: SlotKVCache, slots: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        """Write several prompts into their slots in one forward pass; each prompt's last logits (B, V).

        Prompts are right-padded to the longest: causal attention keeps every real position from seeing
        the padding, and the padded positions lie beyond each slot's length, where decoding overwrites
        them. One pass reads the weights once for all prompts instead of once per prompt.
        """
        if len(slots) != len(prompts) or not prompts:
            raise InputError(f"prefill_batch needs one slot per prompt, got {len(slots)} and {len(prompts)}")
        lengths = [p.shape[0] for p in prompts]
        single = [n == 1 for n in lengths]
        if any(single) and not all(single):
            # A one-token prompt looks like a decode step to the layers' rule "prompts run dense, decode
            # steps sparse" (transformers' generate sees it so too); padding it would change its answer.
            logits = torch.empty(len(prompts), self.lm_head.out_features, device=prompts[0].device)
            for group in (True, False):
                rows = [i for i, s in enumerate(single) if s == group]
                logits[rows] = self.prefill_batch(cache, [slots[i] for i in rows], [prompts[i] for i in rows])
            return logits
        for n in lengths:
            cache.check_fits(n, 0)
        ids, rows, lengths_t = padded_batch(cache, slots, prompts, len(prompts), max(lengths))
        logits = self.prefill_padded(cache, ids, rows, lengths_t)
        for slot, n in zip(slots, lengths):
            cache._set_length(slot, n)
        return logits

    def prefill_padded(self, cache: SlotKVCache, ids: torch.Tensor, rows: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
        """The prefill pass on device tensors alone (graph-capturable): ids (B, T) right-padded, rows (B,)
        the cache slots, lengths (B,) the real prompt lengths -> last logits (B, V). Host-side slot
        lengths are the caller's to set."""
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        hidden = self._run(ids, positions, cache, rows, prompt_lengths=lengths)
        return self._logits(hidden[torch.arange(ids.shape[0], device=ids.device), lengths - 1])

    def step(self, cache: SlotKVCache, ids: torch.Tensor) -> torch.Tensor:
        """One token for every slot (S,), each at its own position `cache.lengths`; logits (S, V).

        Reads only device tensors and does no host sync, so it can be captured in a CUDA graph. Inactive
        slots compute too (a static shape) and write at their own current position, which a later
        prefill overwrites; `cache.advance` moves only the active ones forward.
        """
        positions = cache.lengths.clamp(max=cache.capacity - 1)[:, None]  # (S, 1)
        if self.fused and cache.capacity % ATTENTION_BLOCK == 0 and not self.sparse_attention and not self._bypassed():
            return self._fused_step(ids, positions, cache)
        rows = torch.arange(cache.slots, device=ids.device)
        hidden = self._run(ids[:, None], positions, cache, rows, prompt_lengths=None)
        return self._logits(hidden[:, -1])

    def _bypassed(self) -> bool:
        return getattr(self.layers[0].self_attn.q_proj, "bypass", False)

    def _fused_step(self, ids, positions, cache) -> torch.Tensor:
        """The decode step with fused kernels: add+RMSNorm (with the next projections' top-k cut),
        RoPE+cache write, decode attention over the slot cache, SiLU*up (with the down cut)."""
        from workbench.kernels.decode_ops import rope_and_cache, silu_mul
        from workbench.kernels.sparse_decode import block_sparse_attention
        s = ids.shape[0]
        x = self.embed(ids[:, None])  # (S, 1, D)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # (S, Dh)
        pos = positions[:, 0]
        seq_lens = (pos + 1).to(torch.int32)
        blocks = self._all_blocks(cache, s, x.device)
        delta = None
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x, h = self._norm(x, delta, layer.input_layernorm, attn.q_proj)
            q, k, v = _project(attn, ("q_proj", "k_proj", "v_proj"), h)
            q = q.view(s, self.heads, self.head_dim)
            k, v = k.view(s, self.kv_heads, self.head_dim), v.view(s, self.kv_heads, self.head_dim)
            q = rope_and_cache(q, k, v, cos, sin, pos, cache.keys[i], cache.values[i])
            out = block_sparse_attention(q, cache.keys[i], cache.values[i], blocks, seq_lens, ATTENTION_BLOCK,
                                         scale=attn.scaling)
            x, h = self._norm(x, attn.o_proj(out.view(s, 1, -1)), layer.post_attention_layernorm, mlp.gate_proj)
            gate, up = _project(mlp, ("gate_proj", "up_proj"), h)
            act, sel = silu_mul(gate, up, cut=_kernel_cut(mlp.down_proj))
            _share_cut(mlp.down_proj, act, sel)
            delta = mlp.down_proj(act)
        _, h = self._norm(x, delta, self.norm, None)
        return self.lm_head(h[:, -1]).float()

    def _norm(self, x, delta, norm, consumer):
        from workbench.kernels.decode_ops import add_rmsnorm
        cut = _kernel_cut(consumer) if consumer is not None else None
        x, h, sel = add_rmsnorm(x, delta, norm.weight, norm.variance_epsilon, cut)
        _share_cut(consumer, h, sel)
        return x, h

    def _all_blocks(self, cache, s: int, device) -> torch.Tensor:
        key = (cache.capacity, s)
        if getattr(self, "_blocks_key", None) != key:
            n = cache.capacity // ATTENTION_BLOCK
            self._blocks = torch.arange(n, device=device, dtype=torch.int32).expand(s, n).contiguous()
            self._blocks_key = key
        return self._blocks

    # -- internals -------------------------------------------------------------------------------------------
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()

    def _run(self, ids, positions, cache, rows: torch.Tensor, prompt_lengths: torch.Tensor | None) -> torch.Tensor:
        """The layers over `ids` (B, T); row b lives in cache slot `rows[b]`. With `prompt_lengths` (B,) this
        is a prefill from position 0 (rows right-padded to T); without, one decode token per slot."""
        x = self.embed(ids)
        cos, sin = self.rotary(x, positions)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            x = x + self._attention(layer.self_attn, h, cos, sin, positions, rows, cache.keys[i],
                                    cache.values[i], prompt_lengths)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def _attention(self, attn, h, cos, sin, positions, rows, k_cache, v_cache, prompt_lengths):
        b, t, _ = h.shape
        q = attn.q_proj(h).view(b, t, self.heads, self.head_dim)
        k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(b, t, self.kv_heads, -1).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # qwen3 normalises q and k per head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if prompt_lengths is None:  # decode: one new position per slot (every slot, in order), in place
            k_cache[rows, :, positions[:, 0]] = k[:, :, 0]
            v_cache[rows, :, positions[:, 0]] = v[:, :, 0]
            keys, values = k_cache, v_cache
            valid = torch.arange(k_cache.shape[2], device=h.device)[None, :] <= positions  # (S, C)
            mask = valid[:, None, None, :]  # (S, 1, 1, C)
        else:  # prefill from position 0: the prompt's own keys are all there is to attend to
            k_cache[rows, :, :t] = k
            v_cache[rows, :, :t] = v
            keys, values = k, v
            mask = None  # causal: a real position never sees the padding after it
        spec = getattr(attn, "workbench_attention", None)
        if getattr(attn, "workbench_capture", None) is not None or (spec is not None and not spec.is_identity):
            from workbench.attention.backend import workbench_attention
            if mask is None:  # causal within each prompt; padded queries attend nowhere (not measured)
                at = torch.arange(t, device=h.device)
                real = at[None, :] < prompt_lengths[:, None]  # (B, T)
                mask = ((at[None, :] <= at[:, None])[None] & real[:, None, :] & real[:, :, None])[:, None]
            out, _ = workbench_attention(attn, q, keys, values, mask, scaling=attn.scaling)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and t > 1,
                                                 scale=attn.scaling, enable_gqa=self.kv_heads != self.heads)
            out = out.transpose(1, 2)
        return attn.o_proj(out.reshape(b, t, -1))


ATTENTION_BLOCK = 64  # keys per block of the decode attention kernel; cache capacities are multiples of it


def fused_reason(model: nn.Module) -> str | None:
    """None when the fused decode kernels apply (CUDA, bf16/fp16, Llama layout with SiLU and full RoPE)."""
    p = next(model.parameters())
    if p.device.type != "cuda" or p.dtype not in (torch.bfloat16, torch.float16):
        return "needs a bf16/fp16 model on CUDA"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs Triton"
    cfg = model.config
    layer = model.model.layers[0]
    if hasattr(layer.self_attn, "q_norm") or getattr(cfg, "hidden_act", "silu") != "silu":
        return "q/k norms or a non-SiLU MLP"
    head_dim = layer.self_attn.head_dim
    if head_dim & (head_dim - 1) or getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return "head size not a power of two, or partial RoPE"
    return None


def concatenate_projections(model: nn.Module) -> None:
    """Where the fused decode step runs, store q|k|v and gate|up of every layer as one matrix each.

    Call before any policy is applied: packed-weight caches key on weight storage, which this moves."""
    if unsupported_reason(model) or fused_reason(model):
        return
    for layer in model.model.layers:
        _concatenate(layer.self_attn, ("q_proj", "k_proj", "v_proj"))
        _concatenate(layer.mlp, ("gate_proj", "up_proj"))


def _concatenate(parent: nn.Module, names: tuple[str, ...]) -> None:
    """Store plain projections that read the same input (q|k|v, gate|up) as one matrix, each module's
    weight a view into it: one GEMV instead of several at decode, no extra memory, and every other
    path (transformers, wrappers, unwrap) sees the same weights. Done once per module group."""
    mods = [getattr(parent, n) for n in names]
    if hasattr(parent, "workbench_concat") or not all(type(m) is nn.Linear and m.bias is None for m in mods):
        return
    with torch.no_grad():
        joined = torch.cat([m.weight for m in mods])
        start = 0
        for m in mods:
            rows = m.weight.shape[0]
            m.weight = nn.Parameter(joined[start:start + rows], requires_grad=False)
            start += rows
    parent.workbench_concat = (names, joined)


def _project(parent: nn.Module, names: tuple[str, ...], h: torch.Tensor) -> list[torch.Tensor]:
    """The projections `names` of `h`: one GEMV over the concatenated matrix while every module is still
    the plain linear whose weight views it (a policy may have wrapped some since), else one call each."""
    concat = getattr(parent, "workbench_concat", None)
    mods = [getattr(parent, n) for n in names]
    if concat is not None and concat[0] == names and all(type(m) is nn.Linear for m in mods):
        joined = concat[1]
        start = joined.data_ptr()
        offsets = []
        for m in mods:
            offsets.append((m.weight.data_ptr() - start) // joined.element_size())
        expected, pos = [], 0
        for m in mods:
            expected.append(pos * joined.shape[1])
            pos += m.weight.shape[0]
        if offsets == expected:
            return list(F.linear(h, joined).split([m.weight.shape[0] for m in mods], dim=-1))
    return [m(h) for m in mods]


def _kernel_cut(module):
    """("topk", keep) or ("threshold", t) when `module` runs a sparse kernel whose input selection a
    fused norm/activation kernel can make for it; None otherwise."""
    if not getattr(module, "is_workbench_linear", False) or module.bypass or module.sparsifier is None:
        return None
    key = module.sparsifier.key
    if key is None or key[0] not in ("topk", "threshold") or module.kernel is False:
        return None
    try:
        from workbench.kernels.dispatch import plan
    except ImportError:
        return None
    if module.kernel is None:
        module.kernel = plan(module) or False
    return tuple(key) if module.kernel else None


def _share_cut(module, x: torch.Tensor, selection) -> None:
    """Hand a fused kernel's selection to the layers that read `x` (q/k/v, gate/up share one cache)."""
    if selection is not None and module.input_cache is not None:
        module.input_cache.store(x, ("gpu-" + module.sparsifier.key[0], module.sparsifier.key[1]), selection, None)


# ---- the CUDA graph of one decode step ------------------------------------------------------------------------
class GraphedStep:
    """`decoder.step` captured once for a cache: replaying it costs one launch instead of hundreds.

    The cache's tensors and the input buffer are the graph's fixed addresses; the caller copies token
    ids in, replays, and reads the logits buffer. A second graph of the same step also takes the greedy
    token and feeds it back as the next input, and advances the active slots' lengths, all on the
    device: the host can queue step t+1 before it reads step t's tokens (see `decode_loop`). Any change
    to the model's modules (a reconfigure) invalidates the graphs: the engine drops them.
    """

    def __init__(self, decoder: Decoder, cache: SlotKVCache, warmup: int = 2):
        self.cache = cache
        device = cache.lengths.device
        self.ids = torch.zeros(cache.slots, dtype=torch.long, device=device)
        self.active = torch.zeros(cache.slots, dtype=torch.long, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (Triton compiles, cuBLAS picks kernels) off the graph
            for _ in range(warmup):
                decoder.step(cache, self.ids)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step(cache, self.ids)
        self.greedy_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.greedy_graph, pool=self.graph.pool()):
            chosen = decoder.step(cache, self.ids).argmax(-1)
            self.ids.copy_(chosen)
            cache.lengths.add_(self.active)

    def __call__(self, cache: SlotKVCache, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


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


class GraphedPrefill:
    """`decoder.prefill_batch` captured in CUDA graphs, one per (batch, length) bucket.

    On a GPU a small prefill is bound by the host launching the model's kernels one at a time: for an
    8B model one 128-token prompt takes about 18 ms of which about 9 are GPU work, so while requests
    arrive one by one, prefills rather than decode steps set the pace. A replay is one launch. Prompts
    are padded up to the bucket (see `padded_batch`); a bucket is captured on first use, after one
    eager run that also does the real work, so the first call of each shape costs more. Call it inside
    the engine's prefill context, as `prefill_batch`. Built for one cache and one set of modules: a
    reconfigure drops it with the decoder.
    """

    BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

    def __init__(self, decoder: Decoder, cache: SlotKVCache, quantum: int = 64, max_tokens: int = 512):
        self.decoder, self.cache, self.quantum = decoder, cache, quantum
        # Beyond a few hundred tokens the GPU work outweighs the launches and the bucket's padding costs
        # more than the graph saves (Llama-3-8B shape on an H200, experiments/serving/prefill_h200.json:
        # 1 x 128 tokens 18.0 -> 8.9 ms; 4 x 128 18.8 -> 16.6 ms; 10 x 192 padded to 12 x 192
        # 56.8 -> 65.1 ms): those run eager.
        self.max_tokens = max_tokens
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None

    def bucket(self, batch: int, length: int) -> tuple[int, int]:
        b = next((n for n in self.BATCHES if n >= batch), batch)
        # one token stays one token: the layers treat it as a decode step (sparse rules apply)
        t = length if length == 1 else min(-(-length // self.quantum) * self.quantum, self.cache.capacity)
        return b, t

    def __call__(self, cache: SlotKVCache, slots: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        lengths = [p.shape[0] for p in prompts]
        if not prompts or len(slots) != len(prompts) or (1 in lengths and set(lengths) != {1}):
            return self.decoder.prefill_batch(cache, slots, prompts)  # its checks and its one-token split
        for n in lengths:
            cache.check_fits(n, 0)
        key = self.bucket(len(prompts), max(lengths))
        if key[0] * key[1] > self.max_tokens:
            return self.decoder.prefill_batch(cache, slots, prompts)
        if key not in self.graphs:
            self._capture(key, slots, prompts)
        graph, buffers, logits = self.graphs[key]
        padded_batch(cache, slots, prompts, *key, out=buffers)
        graph.replay()
        for slot, n in zip(slots, lengths):
            cache._set_length(slot, n)
        return logits[:len(prompts)].clone()  # the pool is shared: the next replay may reuse this memory

    def _capture(self, key: tuple[int, int], slots, prompts) -> None:
        buffers = padded_batch(self.cache, slots, prompts, *key)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the graph (kernel choice, tuning)
            self.decoder.prefill_padded(self.cache, *buffers)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.decoder.prefill_padded(self.cache, *buffers)
        self.pool = self.pool or graph.pool()
        self.graphs[key] = (graph, buffers, logits)


# ---- sequences, sampling, the loop ----------------------------------------------------------------------------
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens and when it stops. `validate` names the first bad field.

    Penalties follow OpenAI's definition: each token's logit is lowered by `presence_penalty` once it
    has appeared in the completion and by `frequency_penalty` times its count. Stop strings are not
    part of the returned text (as OpenAI and vLLM return it)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        _check_number("temperature", self.temperature, 0.0, 10.0)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise InputError(f"seed must be an integer in [-2**63, 2**64 - 1], got {str(self.seed)[:40]}")
        if not isinstance(self.stop, tuple) or not all(isinstance(x, str) and x for x in self.stop):
            raise InputError("stop must be a list of non-empty strings")
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)

    @property
    def greedy(self) -> bool:
        """The next token is the argmax of the logits alone (the device can pick it)."""
        return self.temperature == 0 and not self.presence_penalty and not self.frequency_penalty


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_number(name: str, v, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if low_open else low <= v) and v <= high
    if not ok:  # NaN fails every comparison, so it lands here too
        raise InputError(f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {v!r}")


@dataclass(eq=False)
class Sequence:
    """One request's state through the loop."""

    prompt_ids: list[int]
    params: SamplingParams = SamplingParams()
    tokens: list[int] = field(default_factory=list)  # generated so far
    slot: int | None = None
    finish_reason: str | None = None  # "eos", "stop" or "length"
    generator: torch.Generator | None = None
    text: str = ""  # decoded completion, maintained when stop strings are watched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           previous: list[int] | None = None) -> int:
    """One token id from (V,) logits: argmax at temperature 0, else temperature / top-k / top-p sampling;
    presence and frequency penalties first, over the `previous` completion tokens."""
    if (params.presence_penalty or params.frequency_penalty) and previous:
        ids, counts = torch.tensor(previous, device=logits.device).unique(return_counts=True)
        logits = logits.float().clone()
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.float()
    if params.temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p > params.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def new_generator(params: SamplingParams) -> torch.Generator | None:
    return None if params.seed is None else torch.Generator().manual_seed(params.seed)


class Finisher:
    """Decides when a sequence is done: an end-of-sequence token, a stop string, or its token budget."""

    def __init__(self, eos_ids: set[int], decode: Callable[[list[int]], str] | None):
        self.eos_ids, self.decode = eos_ids, decode

    def update(self, seq: Sequence, token: int) -> None:
        if token in self.eos_ids and not seq.params.ignore_eos:
            seq.finish_reason = "eos"
            return
        seq.tokens.append(token)
        if seq.params.stop and self.decode is not None:
            seq.text = self.decode(seq.tokens)
            at = first_stop(seq.text, seq.params.stop)
            if at is not None:
                seq.text = seq.text[:at]  # the stop string is not returned (OpenAI, vLLM)
                seq.finish_reason = "stop"
                return
        if len(seq.tokens) >= seq.params.max_new_tokens:
            seq.finish_reason = "length"

    def visible(self, seq: Sequence) -> str:
        """The completion text a client may be shown now: all of it once finished; while running, less
        a trailing half character and any tail that could still become a stop string."""
        text = seq.text if seq.params.stop else self.decode(seq.tokens)  # kept up to date when stops are watched
        return text if seq.finished else held_back(text, seq.params.stop)


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> str:
    """`text` less what must wait: a trailing U+FFFD (half a multi-byte character) and the longest tail
    that is the start of a stop string (it may yet complete it, and a stop string is never shown)."""
    text = text[:-1] if text.endswith("\ufffd") else text
    hold = max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)
    return text[:len(text) - hold]


def decode_loop(decoder: Decoder, cache: SlotKVCache, seqs: list[Sequence], finisher: Finisher,
                step: Callable[[SlotKVCache, torch.Tensor], torch.Tensor] | None = None,
                prefill_context: Callable | None = None) -> Iterator[list[Sequence]]:
    """Run `seqs` to completion; yields after the prefill and after every decode step with the
    sequences that took a token (streaming reads them). More sequences than slots wait for a free one.

    Every sequence is checked against the cache before any work starts.
    """
    for seq in seqs:
        seq.params.validate()
        if not seq.prompt_ids:
            raise InputError("prompt is empty after tokenization")
        cache.check_fits(len(seq.prompt_ids), seq.params.max_new_tokens)
    step = step or decoder.step
    device = cache.lengths.device
    waiting, running = list(seqs), []
    while waiting or running:
        joined = []
        while waiting and cache.free_slots:  # join between steps, prefilled together below
            seq = waiting.pop(0)
            seq.slot = cache.acquire()
            seq.generator = new_generator(seq.params)
            joined.append(seq)
        for group in padded_groups(joined, lambda seq: len(seq.prompt_ids)):
            prompts = [torch.tensor(seq.prompt_ids, dtype=torch.long, device=device) for seq in group]
            with prefill_context() if prefill_context else _null():
                logits = decoder.prefill_batch(cache, [seq.slot for seq in group], prompts)
            for seq, row in zip(group, logits):
                finisher.update(seq, sample(row, seq.params, seq.generator, seq.tokens))
        running.extend(joined)
        if joined:
            yield joined
        running = _retire(cache, running)
        if not running:
            continue
        ids = torch.zeros(cache.slots, dtype=torch.long)
        active = torch.zeros(cache.slots, dtype=torch.long)
        for seq in running:
            ids[seq.slot], active[seq.slot] = seq.tokens[-1], 1
        if isinstance(step, GraphedStep) and not waiting and all(s.params.greedy for s in running):
            running = yield from _pipelined(step, cache, running, finisher, ids, active)
            continue
        logits = step(cache, ids.to(device))
        cache.advance(active.to(device), [s.slot for s in running])
        if all(s.params.greedy for s in running):  # one small transfer instead of S x V logits
            chosen = logits.argmax(-1).tolist()
            for seq in running:
                finisher.update(seq, chosen[seq.slot])
        else:
            for seq in running:
                finisher.update(seq, sample(logits[seq.slot], seq.params, seq.generator, seq.tokens))
        yield list(running)
        running = _retire(cache, running)


PREFILL_TOKENS = 4096  # padded prompt tokens per batched prefill: bounds its activations and its stall


def padded_cost(lengths: list[int]) -> int:
    """Positions a right-padded batch of these prompt lengths computes."""
    return len(lengths) * max(lengths, default=0)


def padded_groups(items: list, length: Callable, budget: int = PREFILL_TOKENS) -> list[list]:
    """Split `items` (in order) into batches whose padded size stays within `budget`; a prompt longer than
    the budget goes alone."""
    groups, group = [], []
    for item in items:
        if group and padded_cost([length(i) for i in group + [item]]) > budget:
            groups.append(group)
            group = []
        group.append(item)
    return groups + [group] if group else groups


def _pipelined(step: GraphedStep, cache: SlotKVCache, running: list[Sequence], finisher: Finisher,
               ids: torch.Tensor, active: torch.Tensor):
    """Greedy decoding with the host one step behind the GPU: step t+1 is queued (its input is step t's
    argmax, fed back on the device) before the host reads step t's tokens, so the host's work (stop
    checks, streaming) overlaps the GPU's instead of idling it. A sequence that finishes at step t has
    one extra token computed for it at t+1, which is dropped; its slot is freed after that step."""
    step.ids.copy_(ids.to(step.ids.device))
    step.active.copy_(active.to(step.active.device))
    host = [torch.empty(cache.slots, dtype=torch.long, pin_memory=True) for _ in range(2)]
    done = [torch.cuda.Event(), torch.cuda.Event()]

    def launch(i: int) -> None:
        step.greedy_graph.replay()
        host[i % 2].copy_(step.ids, non_blocking=True)
        done[i % 2].record()

    i = 0
    launch(0)
    while running:
        launch(i + 1)  # queued before the host looks at step i
        done[i % 2].synchronize()
        tokens = host[i % 2].tolist()
        for seq in running:
            cache.host_lengths[seq.slot] += 1
            finisher.update(seq, tokens[seq.slot])
        yield list(running)
        if any(s.finished for s in running):
            for seq in running:
                if seq.finished:
                    active[seq.slot] = 0
            step.active.copy_(active.to(step.active.device))  # ordered after the step in flight
            running = _retire(cache, running)
        i += 1
    done[i % 2].synchronize()  # the last, unneeded step
    return running


def _retire(cache: SlotKVCache, running: list[Sequence]) -> list[Sequence]:
    for seq in running:
        if seq.finished and seq.slot is not None:
            cache.release(seq.slot)
            seq.slot = None
    return [s for s in running if not s.finished]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
