"""The fused decode step on CUDA (bf16/fp16, Llama layout): Triton kernels for add+RMSNorm, RoPE with the
cache write, SiLU*up and decode attention, q|k|v and gate|up stored as one matrix each, and the hand-off
of a sparsity selection from the kernel that produces an input to the kernels that read it.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from workbench.runtime.cache import ATTENTION_BLOCK
from workbench.sparsity.rules import Cut

# The kernels need Triton, an optional dependency (a CPU install has none): they are imported where they
# run, which is only once `fused_reason` said yes.


def fused_step(decoder, ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """The decode step with fused kernels: add+RMSNorm (with the next projections' sparsity cut),
    RoPE+cache write, decode attention over the slot cache, SiLU*up (with the down cut); logits (S, V)."""
    from workbench.kernels.decode_ops import rope_and_cache, silu_mul
    from workbench.kernels.sparse_decode import block_sparse_attention
    s = ids.shape[0]
    x = decoder.embed(ids[:, None])  # (S, 1, D)
    cos, sin = decoder.rotary(x, positions)
    cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # (S, Dh)
    pos = positions[:, 0]
    seq_lens = (pos + 1).to(torch.int32)
    blocks = _all_blocks(decoder, cache, s, x.device)
    delta = None
    for i, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        x, h = _norm(x, delta, layer.input_layernorm, attn.q_proj)
        q, k, v = _project(attn, ("q_proj", "k_proj", "v_proj"), h)
        q = q.view(s, decoder.heads, decoder.head_dim)
        k, v = k.view(s, decoder.kv_heads, decoder.head_dim), v.view(s, decoder.kv_heads, decoder.head_dim)
        q = rope_and_cache(q, k, v, cos, sin, pos, cache.keys[i], cache.values[i])
        out = block_sparse_attention(q, cache.keys[i], cache.values[i], blocks, seq_lens, ATTENTION_BLOCK,
                                     scale=attn.scaling)
        x, h = _norm(x, attn.o_proj(out.view(s, 1, -1)), layer.post_attention_layernorm, mlp.gate_proj)
        gate, up = _project(mlp, ("gate_proj", "up_proj"), h)
        act, sel = silu_mul(gate, up, cut=_kernel_cut(mlp.down_proj))
        _share_cut(mlp.down_proj, act, sel)
        delta = mlp.down_proj(act)
    _, h = _norm(x, delta, decoder.norm, None)
    return decoder.lm_head(h[:, -1]).float()


def _norm(x, delta, norm, consumer):
    from workbench.kernels.decode_ops import add_rmsnorm
    cut = _kernel_cut(consumer) if consumer is not None else None
    x, h, sel = add_rmsnorm(x, delta, norm.weight, norm.variance_epsilon, cut)
    _share_cut(consumer, h, sel)
    return x, h


def _all_blocks(decoder, cache, s: int, device) -> torch.Tensor:
    """Every key block of the cache for every slot (dense attention through the block kernel), kept on
    the decoder so a captured graph reads the same tensor."""
    key = (cache.capacity, s)
    if getattr(decoder, "_blocks_key", None) != key:
        n = cache.capacity // ATTENTION_BLOCK
        decoder._blocks = torch.arange(n, device=device, dtype=torch.int32).expand(s, n).contiguous()
        decoder._blocks_key = key
    return decoder._blocks


def fused_reason(model: nn.Module) -> str | None:
    """None when the fused decode kernels apply (CUDA, bf16/fp16, Llama layout with SiLU and full RoPE)."""
    p = next(model.parameters())
    if p.device.type != "cuda" or p.dtype not in (torch.bfloat16, torch.float16):
        return "needs a bf16/fp16 model on CUDA"
    if importlib.util.find_spec("triton") is None:
        return "needs Triton"
    cfg = model.config
    layer = model.model.layers[0]
    if hasattr(layer.self_attn, "q_norm") or getattr(cfg, "hidden_act", "silu") != "silu":
        return "q/k norms or a non-SiLU MLP"
    head_dim = layer.self_attn.head_dim
    if head_dim & (head_dim - 1) or getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return "head size not a power of two, or partial RoPE"
    return None


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


def _kernel_cut(module) -> Cut | None:
    """The `Cut` of `module` when it runs a sparse kernel whose input selection a fused norm/activation
    kernel can make for it; None otherwise."""
    if not getattr(module, "is_workbench_linear", False) or module.bypass or module.sparsifier is None:
        return None
    cut = module.sparsifier.cut
    if cut is None or module.kernel is False:
        return None
    if module.kernel is None:
        from workbench.kernels.dispatch import plan
        module.kernel = plan(module) or False
    return cut if module.kernel else None


def _share_cut(module, x: torch.Tensor, selection) -> None:
    """Hand a fused kernel's selection to the layers that read `x` (q/k/v, gate/up share one cache)."""
    if selection is not None and module.input_cache is not None:
        module.input_cache.store(x, (module.sparsifier.cut, "selection"), selection, None)
