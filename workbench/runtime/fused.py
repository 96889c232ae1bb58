"""The fused decode step on CUDA (bf16/fp16, Llama layout): Triton kernels for add+RMSNorm, RoPE with the
cache write, SiLU*up and decode attention; q|k|v and gate|up multiplied as one matrix each (the model's
weights, or the policy's packed ones joined); and a sparsity cut applied (and counted) inside the kernel
that produces an input, so the projections that read it get it sparsified at no extra launch.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from workbench.kernels.dense_paths import dense_linear
from workbench.runtime.cache import ATTENTION_BLOCK
from workbench.sparsity.rules import Cut

# The kernels need Triton, an optional dependency (a CPU install has none): they are imported where they
# run, which is only once `fused_reason` said yes.


def fused_step(decoder, ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """The decode step with fused kernels: add+RMSNorm (with the next projections' sparsity cut),
    RoPE+cache write, decode attention over the slot cache, SiLU*up (with the down cut); logits (S, V)."""
    from workbench.kernels.decode_ops import rope_and_cache, silu_mul
    from workbench.kernels.sparse_decode import dense_decode_attention
    s = ids.shape[0]
    x = decoder.embed(ids[:, None])  # (S, 1, D)
    cos, sin = decoder.rotary(x, positions)
    cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # (S, Dh)
    pos = positions[:, 0]
    seq_lens = (pos + 1).to(torch.int32)
    delta = None
    for i, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        x, h = _norm(x, delta, layer.input_layernorm, _modules(attn, QKV))
        q, k, v = _project(attn, QKV, h)
        q = q.view(s, decoder.heads, decoder.head_dim)
        k, v = k.view(s, decoder.kv_heads, decoder.head_dim), v.view(s, decoder.kv_heads, decoder.head_dim)
        q = rope_and_cache(q, k, v, cos, sin, pos, cache.keys[i], cache.values[i])
        cut = _shared_cut([attn.o_proj])
        cut = cut if cut is not None and cut.kind == "threshold" else None  # a top-k needs the whole row
        counters = _counters([attn.o_proj], cut)
        out = dense_decode_attention(q, cache.keys[i], cache.values[i], seq_lens, ATTENTION_BLOCK, scale=attn.scaling,
                                     threshold=cut.threshold if cut else None,
                                     counters=counters[0] if counters else None).view(s, 1, -1)
        _mark_premasked([attn.o_proj], out, cut)
        x, h = _norm(x, _linear(attn.o_proj, out), layer.post_attention_layernorm, _modules(mlp, GATE_UP))
        gate, up = _project(mlp, GATE_UP, h)
        cut = _shared_cut([mlp.down_proj])
        act = silu_mul(gate, up, cut=cut, counters=_counters([mlp.down_proj], cut))
        _mark_premasked([mlp.down_proj], act, cut)
        delta = _linear(mlp.down_proj, act)
    _, h = _norm(x, delta, decoder.norm, [])
    return _linear(decoder.lm_head, h[:, -1]).float()


QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def _modules(parent: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    return [getattr(parent, n) for n in names]


def _norm(x, delta, norm, consumers):
    """add+RMSNorm, its output sparsified for `consumers` when they share one cut a kernel applies."""
    from workbench.kernels.decode_ops import add_rmsnorm
    cut = _shared_cut(consumers)
    x, h = add_rmsnorm(x, delta, norm.weight, norm.variance_epsilon, cut, counters=_counters(consumers, cut))
    _mark_premasked(consumers, h, cut)
    return x, h


def fused_reason(model: nn.Module) -> str | None:
    """None when the fused decode kernels apply (CUDA, bf16/fp16, Llama layout with SiLU and full RoPE)."""
    p = next(model.parameters())
    if p.device.type != "cuda" or p.dtype not in (torch.bfloat16, torch.float16):
        return "needs a bf16/fp16 model on CUDA"
    if importlib.util.find_spec("triton") is None:
        return "needs Triton"
    return layout_reason(model)


def layout_reason(model: nn.Module) -> str | None:
    """None when the layers have the layout the fused kernels are written for (the Llama family's)."""
    cfg = model.config
    if cfg.model_type not in ("llama", "mistral", "qwen2", "qwen3"):  # decoder.LLAMA_FAMILY (no import circle)
        return f"the fused kernels cover the Llama family's layers, not {cfg.model_type!r}"
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
    """The projections `names` of `h`: one multiply over the joined matrix where every module allows it
    (the model's concatenated weight while they are plain linears; a joined kernel while they are
    wrappers of one setting), else one call each."""
    mods = _modules(parent, names)
    sizes = [m.out_features for m in mods]
    concat = getattr(parent, "workbench_concat", None)
    if concat is not None and concat[0] == names and all(type(m) is nn.Linear for m in mods):
        if _views_in_order(mods, concat[1]):
            return list(dense_linear(h, concat[1]).split(sizes, dim=-1))
    joint = _joint_kernel(parent, names, mods)
    if joint is not None:
        y = joint(h)
        if y is not None:
            return list(y.split(sizes, dim=-1))
    return [m(h) for m in mods]


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module`(x), through the tuned dense decode matmul (cuBLAS or ours) while it is a plain linear."""
    if type(module) is nn.Linear and module.bias is None:
        return dense_linear(x, module.weight)
    return module(x)


def _views_in_order(mods, joined: torch.Tensor) -> bool:
    """True when each module's weight is still its own rows of `joined`, in order (nothing re-bound it)."""
    pos = 0
    for m in mods:
        if m.weight.data_ptr() != joined.data_ptr() + pos * joined.shape[1] * joined.element_size():
            return False
        pos += m.weight.shape[0]
    return True


def _joint_kernel(parent: nn.Module, names, mods):
    """One `LinearKernel` over the joined weights of wrappers that share their input and setting, built
    once per set of stores. Packed tensors are joined and each store's tensors become views of the
    joined ones (no extra memory); the model's own weight joins through `workbench_concat`."""
    from workbench.layers import WorkbenchLinear
    if not all(type(m) is WorkbenchLinear for m in mods):  # a LoRA wrapper runs its own forward
        return None
    if any(m.bypass or m.base.bias is not None for m in mods) or len({str(m.setting) for m in mods}) != 1:
        return None
    from workbench.kernels.dispatch import LinearKernel, plan
    for m in mods:
        if m.kernel is None:
            m.kernel = plan(m) or False
    if any(m.kernel is False for m in mods):
        return None
    stores = [m.store for m in mods]
    key = (names, tuple(map(id, mods)), tuple(map(id, stores)), tuple(m.kernel.cut for m in mods))
    cached = getattr(parent, "workbench_joint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    first = mods[0].kernel
    if first.family == "dense":
        concat = getattr(parent, "workbench_concat", None)
        if concat is None or concat[0] != names or not _views_in_order([m.base for m in mods], concat[1]) \
                or any(s is not None for s in stores):
            return None
        kernel = LinearKernel(mods, first.cut, "dense", dense=concat[1], dtype=first.dtype)
    else:
        from workbench.kernels.quant_paths import joined_tensors
        joined = joined_tensors(stores)
        start = 0
        for st in stores:  # each store's tensors become its rows of the joined ones
            rows = st.tensors["q"].shape[0]
            for name, t in joined.items():
                setattr(st, name, t[start:start + rows])
            start += rows
        for m in mods:
            m.kernel = None  # their layouts came from the old tensors: rebuilt on next use
            m.kernel = plan(m) or False
        kernel = LinearKernel(mods, first.cut, first.family, tensors=joined, dtype=first.dtype)
    for m in mods:
        m.kernel.joined = True  # the fused step multiplies it through `kernel`: bench counts it there
    parent.workbench_joint = (key, kernel)
    return kernel


def _shared_cut(consumers) -> Cut | None:
    """The `Cut` every module of `consumers` applies to this input through a kernel, when they all apply
    the same one (q/k/v, gate/up, down): the producing kernel then sparsifies and counts for them."""
    if not consumers:
        return None
    cuts = {_kernel_cut(m) for m in consumers}
    if len(cuts) != 1:
        return None
    cut = cuts.pop()
    if cut is None or any(m.input_cache is None for m in consumers):
        return None
    return cut


def _kernel_cut(module) -> Cut | None:
    """The `Cut` of `module` when a kernel serves it (its input can come sparsified); None otherwise."""
    if not getattr(module, "is_workbench_linear", False) or module.bypass or module.sparsifier is None:
        return None
    cut = module.sparsifier.cut
    if cut is None or module.kernel is False:
        return None
    if module.kernel is None:
        from workbench.kernels.dispatch import plan
        module.kernel = plan(module) or False
    return cut if module.kernel else None


def _counters(consumers, cut) -> list:
    if cut is None:
        return []
    return [(m.nonzero_seen, m.entries_seen) for m in consumers if m.track_stats]


def _mark_premasked(consumers, x: torch.Tensor, cut) -> None:
    """Tell the layers that read `x` it is sparsified and counted already (one shared input cache)."""
    if cut is not None:
        from workbench.kernels.dispatch import PREMASKED
        consumers[0].input_cache.store(x, (cut, PREMASKED), x, None)
