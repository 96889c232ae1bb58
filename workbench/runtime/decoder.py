"""The decoder: a Llama-family, Gemma 3 or DeepSeek-V3 model's own layers run over a slot KV cache, one
prefill pass for several prompts and one decode step for every slot.

It runs the model's own modules (embeddings, norms, rotary embedding, projections, MLP), so every policy
wrapper applies unchanged; only the attention over the cache is ours. It covers the Llama family (llama,
mistral, qwen2, qwen3), Gemma 3 (four norms per layer, q/k norms, its sliding-window and global layers,
each with its own rotary embedding; the window as a mask over the full slot cache) and DeepSeek-V3's
multi-head latent attention (a latent cache, kv_b absorbed at decode; the model's own MLP or routed
experts); other architectures keep transformers' `generate` (`unsupported_reason` says why). On CUDA
with bf16/fp16 the Llama family's decode step is the fused one of `runtime.fused`.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

from workbench.attention.backend import workbench_attention
from workbench.errors import InputError, ModelError
from workbench.runtime.cache import ATTENTION_BLOCK, SlotKVCache, padded_batch
from workbench.runtime.fused import _concatenate, fused_reason, fused_step

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GEMMA_FAMILY = ("gemma3_text",)  # sliding-window layers named in config.layer_types
MLA_FAMILY = ("deepseek_v3", "deepseek_v32")  # latent attention over a latent cache; V3.2 adds its indexer
LOOP_FAMILIES = LLAMA_FAMILY + GEMMA_FAMILY + MLA_FAMILY
# A prompt longer than this is prefilled in chunks of it, each attending to the cache so far: the
# activations of one pass stay those of 2048 tokens however long the prompt (vLLM's chunked prefill).
PREFILL_CHUNK = 2048


def unsupported_reason(model: nn.Module) -> str | None:
    """None when `Decoder` can run `model`; otherwise why not (the engine then uses transformers)."""
    cfg = model.config
    if cfg.model_type not in LOOP_FAMILIES:
        return f"architecture {cfg.model_type!r} (the decode loop covers {', '.join(LOOP_FAMILIES)})"
    layer_types = getattr(cfg, "layer_types", None) or []
    kinds = {"gemma3_text": ("full_attention", "sliding_attention"), "deepseek_v32": ("indexed_attention",)}
    if (any(t not in kinds.get(cfg.model_type, ("full_attention",)) for t in layer_types)
            or getattr(cfg, "use_sliding_window", False)):
        return "sliding-window attention"
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "use_bidirectional_attention", False):
        return "attention logit soft-capping or bidirectional attention"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "an unexpected module layout"
    return None


class Decoder:
    """Runs a Llama-family, Gemma 3 or DeepSeek-V3 model's layers over a SlotKVCache: `prefill` one slot,
    `step` all slots."""

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
        self.head_dim = getattr(attn, "head_dim", None)
        module = sys.modules[type(attn).__module__]
        self.mla = cfg.model_type in MLA_FAMILY
        interleaved = self.mla and (getattr(cfg, "rope_interleave", False) or cfg.model_type == "deepseek_v32")
        self.apply_rope = module.apply_rotary_pos_emb_interleave if interleaved else module.apply_rotary_pos_emb
        self.index_rope = module.apply_rotary_pos_emb  # V3.2's indexer rotates half-split, not interleaved
        self.fused = fused_reason(model) is None  # the decode step's Triton kernels (kernels/decode_ops.py)
        self.gemma = cfg.model_type in GEMMA_FAMILY  # four norms a layer, a rotary embedding per layer type
        self.layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.layer_types = ["full_attention" if k == "indexed_attention" else k for k in self.layer_types]
        # keys a sliding layer sees: the last `window` positions up to the query's own (transformers' rule)
        self.windows = [cfg.sliding_window if t == "sliding_attention" else None for t in self.layer_types]
        self.logit_cap = getattr(cfg, "final_logit_softcapping", None)

    @property
    def capturable(self) -> bool:
        """Whether a decode step can be captured in a CUDA graph: not with a key selector (or a capture)
        in a layer, nor with routed experts (transformers' expert loop asks the host which experts the
        tokens went to)."""
        return not self.sparse_attention and not any(hasattr(l.mlp, "experts") for l in self.layers)

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
        if max(lengths) > PREFILL_CHUNK:  # long prompts one at a time, chunk by chunk
            return torch.stack([self.prefill_chunked(cache, slot, p) for slot, p in zip(slots, prompts)])
        ids, rows, lengths_t = padded_batch(cache, slots, prompts, len(prompts), max(lengths))
        logits = self.prefill_padded(cache, ids, rows, lengths_t)
        for slot, n in zip(slots, lengths):
            cache.set_length(slot, n)
        return logits

    def prefill_chunked(self, cache: SlotKVCache, slot: int, ids: torch.Tensor,
                        chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """Write one prompt (T,) into `slot` `chunk` tokens per pass, each chunk attending to the cached keys
        before it and causally to itself (the same math as one pass); the last position's logits (V,). A
        progress bar from 8 chunks on."""
        from workbench.progress import progress
        cache.check_fits(ids.shape[0], 0)
        rows, n = torch.tensor([slot], device=ids.device), ids.shape[0]
        starts = list(range(0, n, chunk))
        if len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()  # no one-token chunk: the layers would take it for a decode step (sparse rules apply)
        ends = starts[1:] + [n]
        for start, end in progress(list(zip(starts, ends)), desc="prefill", unit="chunk", enabled=len(starts) >= 8):
            part = ids[start:end][None]
            positions = torch.arange(start, start + part.shape[1], device=ids.device)[None]
            lengths = torch.tensor([part.shape[1]], device=ids.device)
            hidden = self._run(part, positions, cache, rows, prompt_lengths=lengths, offset=start)
        cache.set_length(slot, n)
        return self._logits(hidden[:, -1])[0]

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
            return fused_step(self, ids, positions, cache)
        rows = torch.arange(cache.slots, device=ids.device)
        hidden = self._run(ids[:, None], positions, cache, rows, prompt_lengths=None)
        return self._logits(hidden[:, -1])

    def _bypassed(self) -> bool:
        return getattr(self.layers[0].self_attn.q_proj, "bypass", False)

    # -- internals -------------------------------------------------------------------------------------------
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden)).float()
        if self.logit_cap:  # soft-capped as the model's own forward does
            logits = torch.tanh(logits / self.logit_cap) * self.logit_cap
        return logits

    def _run(self, ids, positions, cache, rows: torch.Tensor, prompt_lengths: torch.Tensor | None,
             offset: int = 0) -> torch.Tensor:
        """The layers over `ids` (B, T); row b lives in cache slot `rows[b]`. With `prompt_lengths` (B,) this
        is a prefill from position `offset` (rows right-padded to T; a later chunk of one prompt when
        `offset` > 0); without, one decode token per slot."""
        x = self.embed(ids)
        if self.gemma:
            rope = {t: self.rotary(x, positions, t) for t in set(self.layer_types)}
        else:
            rope = dict.fromkeys(set(self.layer_types), self.rotary(x, positions))
        for i, layer in enumerate(self.layers):
            cos, sin = rope[self.layer_types[i]]
            h = layer.input_layernorm(x)
            a = self._attention(layer.self_attn, h, cos, sin, positions, rows, cache.keys[i], cache.values[i],
                                prompt_lengths, offset, window=self.windows[i],
                                index_cache=cache.index_keys[i] if cache.index_keys else None)
            if self.gemma:  # each sublayer's output is normed before the residual add
                x = x + layer.post_attention_layernorm(a)
                x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            else:
                x = x + a
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def _attention(self, attn, h, cos, sin, positions, rows, k_cache, v_cache, prompt_lengths, offset=0,
                   window: int | None = None, index_cache=None):
        if self.mla:
            return self._latent_attention(attn, h, cos, sin, positions, rows, k_cache, v_cache, prompt_lengths, offset,
                                          index_cache)
        b, t, _ = h.shape
        q = attn.q_proj(h).view(b, t, self.heads, self.head_dim)
        k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(b, t, self.kv_heads, -1).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # qwen3 normalises q and k per head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        keys, values, mask = _cached(k, v, k_cache, v_cache, rows, positions, prompt_lengths, offset, window)
        return attn.o_proj(self._attend(attn, q, keys, values, mask, prompt_lengths, offset).reshape(b, t, -1))

    def _attend(self, attn, q, keys, values, mask, prompt_lengths, offset, native=None) -> torch.Tensor:
        """Attention of q (B, H, T, D) over keys/values (B, Hkv, Tk, D) -> (B, T, H, Dv): the layer's key
        selector where it has one (or a capture), SDPA otherwise. `native`: DeepSeek-V3.2's own selection,
        (its narrowed mask, its top indices); a selector of ours chooses on `mask` and is then intersected
        with it, as the attention backend does (`attention.backend`)."""
        t = q.shape[2]
        spec = getattr(attn, "workbench_attention", None)
        if getattr(attn, "workbench_capture", None) is not None or (spec is not None and not spec.is_identity):
            if prompt_lengths is not None and offset == 0:  # causal within each prompt (and its window, if
                at = torch.arange(t, device=q.device)   # any); padded queries attend nowhere (not measured)
                real = at[None, :] < prompt_lengths[:, None]  # (B, T)
                causal = mask if mask is not None else (at[None, :] <= at[:, None])[None, None]
                mask = causal & real[:, None, None, :] & real[:, None, :, None]
            extra = {} if native is None else {"indices": native[1]}
            out, _ = workbench_attention(attn, q, keys, values, mask, scaling=attn.scaling, **extra)
            return out
        mask = mask if native is None else native[0]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and t > 1,
                                             scale=attn.scaling, enable_gqa=keys.shape[1] != q.shape[1])
        return out.transpose(1, 2)

    def _latent_attention(self, attn, h, cos, sin, positions, rows, latent_cache, rope_cache, prompt_lengths,
                          offset, index_cache=None):
        """DeepSeek's multi-head latent attention over a latent cache: per token the cache holds the
        normed kv_a output (kv_lora_rank values) and the rotated shared rope key, not per-head keys and
        values. A decode step absorbs kv_b into the query and the output (q_nope W_k scores the latents,
        the attention-weighted latent times W_v is the value), the same math without expanding the cache;
        a prefill, a key selector, or a policy on kv_b expands the latents through kv_b_proj itself.
        DeepSeek-V3.2: its own lightning indexer (`_indexed`) narrows every query to its top keys first."""
        b, t, _ = h.shape
        if attn.q_lora_rank is None:
            q_resid, q = None, attn.q_proj(h)
        else:
            q_resid = attn.q_a_layernorm(attn.q_a_proj(h))
            q = attn.q_b_proj(q_resid)
        q = q.view(b, t, self.heads, attn.qk_head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
        latent, k_rot = torch.split(attn.kv_a_proj_with_mqa(h), [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
        latent = attn.kv_a_layernorm(latent).view(b, 1, t, attn.kv_lora_rank)
        q_rot, k_rot = self.apply_rope(q_rot, k_rot.view(b, 1, t, attn.qk_rope_head_dim), cos, sin)
        latents, rot_keys, mask = _cached(latent, k_rot, latent_cache, rope_cache, rows, positions, prompt_lengths,
                                          offset, None)
        native = None
        if index_cache is not None:
            native = self._indexed(attn.indexer, h, q_resid, cos, sin, mask, index_cache, rows, positions,
                                   prompt_lengths, offset)
        spec = getattr(attn, "workbench_attention", None)
        plain = (getattr(attn, "workbench_capture", None) is None and (spec is None or spec.is_identity)
                 and type(attn.kv_b_proj) is nn.Linear)
        if prompt_lengths is None and plain:
            w = attn.kv_b_proj.weight.view(self.heads, attn.qk_nope_head_dim + attn.v_head_dim, attn.kv_lora_rank)
            w_k, w_v = w[:, :attn.qk_nope_head_dim], w[:, attn.qk_nope_head_dim:]
            q_latent = torch.einsum("bhtn,hnr->bhtr", q_pass, w_k)
            scores = (q_latent @ latents.transpose(-1, -2) + q_rot @ rot_keys.transpose(-1, -2)) * attn.scaling
            keep = mask if native is None else native[0]
            probs = torch.softmax(scores.float().masked_fill(~keep, float("-inf")), dim=-1).to(latents.dtype)
            out = torch.einsum("bhtr,hvr->bthv", probs @ latents, w_v)  # (B, T, H, v)
        else:  # a fresh view of the slot cache: a sparsified input is remembered by identity, and the cache
            with _as_prompt_tokens(attn.kv_b_proj):  # is the same tensor, changed, every step
                keys, values = attn.expand_kv(latents[:], rot_keys)
            out = self._attend(attn, torch.cat((q_pass, q_rot), dim=-1), keys, values, mask, prompt_lengths, offset,
                               native)
        return attn.o_proj(out.reshape(b, t, -1))

    def _indexed(self, indexer, h, q_resid, cos, sin, mask, index_cache, rows, positions, prompt_lengths, offset):
        """DeepSeek-V3.2's lightning indexer, as its own module computes it: per token one index key (its
        `wk`, normed, half-split rotary) kept in the slot cache beside the latents; each query scores the
        keys it may see by sum_h w_h relu(q_h . k) and keeps its top `index_topk` (all of them below that).
        Returns (`mask` narrowed to those keys (B, 1, T, Tk), the chosen indices (B, T, k))."""
        b, t, _ = h.shape
        rope = self.model.config.qk_rope_head_dim
        q = indexer.wq_b(q_resid).view(b, t, indexer.n_heads, indexer.head_dim)
        k = indexer.k_norm(indexer.wk(h)).unsqueeze(2)  # (B, T, 1, D)
        q_rot, q_pass = torch.split(q, [rope, indexer.head_dim - rope], dim=-1)
        k_rot, k_pass = torch.split(k, [rope, indexer.head_dim - rope], dim=-1)
        q_rot, k_rot = self.index_rope(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q_pass], dim=-1)  # (B, T, H, D)
        k = torch.cat([k_rot, k_pass], dim=-1).transpose(1, 2)  # (B, 1, T, D)
        keys = _store(k, index_cache, rows, positions, prompt_lengths, offset)[:, 0]  # (B, Tk, D)
        scores = torch.relu(q.float() @ keys.float().transpose(-1, -2).unsqueeze(1) * indexer.softmax_scale)
        weights = indexer.weights_proj(h.to(indexer.weights_proj.weight.dtype)).float() * indexer.n_heads ** -0.5
        index = (weights.unsqueeze(-2) @ scores).squeeze(-2)  # (B, T, Tk): per-head weights, summed
        tk = keys.shape[1]
        if mask is None:  # a prefill from 0: causal
            at = torch.arange(tk, device=h.device)
            mask = (at[None, :] <= at[:, None])[None, None]
        visible = mask[:, 0].expand(b, t, tk)
        top = index.masked_fill(~visible, float("-inf")).topk(min(indexer.index_topk, tk), dim=-1).indices
        chosen = torch.zeros_like(visible).scatter(-1, top, True)
        return (visible & chosen)[:, None], top


@contextlib.contextmanager
def _as_prompt_tokens(module):
    """kv_b's input at a decode step is every cached latent, many tokens: run it as prompt tokens run
    (dense, unless its sparsity asks for sparse prefill), as transformers' own generate under
    `Engine.dense_prefill` sees it. Its new token's latent is one of them."""
    dense = hasattr(module, "dense_multi_token") and not module.setting.sparsity.prefill
    before = getattr(module, "dense_multi_token", False)
    if dense:
        module.dense_multi_token = True
    try:
        yield
    finally:
        if dense:
            module.dense_multi_token = before


def _cached(k, v, k_cache, v_cache, rows, positions, prompt_lengths, offset, window):
    """Write this pass's keys/values (B, Hkv, T, D) into their slots; the keys, values and mask to attend
    with (`_store`, `_visible`)."""
    keys = _store(k, k_cache, rows, positions, prompt_lengths, offset)
    values = _store(v, v_cache, rows, positions, prompt_lengths, offset)
    return keys, values, _visible(k.shape[2], k_cache.shape[2], positions, prompt_lengths, offset, window, k.device)


def _store(x, cache, rows, positions, prompt_lengths, offset):
    """Write x (B, Hkv, T, D) into its slots of `cache`; return what this pass attends over: at decode (no
    `prompt_lengths`) each slot's whole cache, in a prefill from 0 the prompt's own x, in a later chunk of
    one prompt the cache up to this chunk's end."""
    t = x.shape[2]
    if prompt_lengths is None:  # decode: one new position per slot (every slot, in order), in place
        cache[rows, :, positions[:, 0]] = x[:, :, 0]
        return cache
    cache[rows, :, offset:offset + t] = x
    return x if offset == 0 else cache[rows, :, :offset + t]


def _visible(t, capacity, positions, prompt_lengths, offset, window, device):
    """Which keys each query may see: at decode each slot's cache up to its position, (S, 1, 1, C); in a
    prefill from 0 causally (None: SDPA's own causal rule); in a later chunk the cache before it and itself
    causally, (1, 1, T, offset + T). `window`: only the last `window` positions up to each query's own."""
    if prompt_lengths is None:
        at = torch.arange(capacity, device=device)[None, :]
        valid = at <= positions  # (S, C)
        if window is not None:
            valid = valid & (at > positions - window)
        return valid[:, None, None, :]
    if offset == 0:  # a real position never sees the padding after it
        if window is None:
            return None
        at = torch.arange(t, device=device)
        return ((at[None, :] <= at[:, None]) & (at[None, :] > at[:, None] - window))[None, None]
    at, query = torch.arange(offset + t, device=device)[None, :], positions[0][:, None]
    seen = at <= query  # (T, offset + T)
    if window is not None:
        seen = seen & (at > query - window)
    return seen[None, None]


def concatenate_projections(model: nn.Module) -> None:
    """Where the fused decode step runs, store q|k|v and gate|up of every layer as one matrix each.

    Call before any policy is applied: packed-weight caches key on weight storage, which this moves."""
    if unsupported_reason(model) or fused_reason(model):
        return
    for layer in model.model.layers:
        _concatenate(layer.self_attn, ("q_proj", "k_proj", "v_proj"))
        _concatenate(layer.mlp, ("gate_proj", "up_proj"))
