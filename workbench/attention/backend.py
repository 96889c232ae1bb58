"""The workbench attention backend: per-layer key selection on exact scores, GQA- and padding-correct.

Registered once with transformers' AttentionInterface under the name "workbench", together with a mask
function (the boolean causal+padding mask, never skipped: without it prefill would see the future). Each
attention module carries its `Attention` spec (`module.workbench_attention`); the backend:

1. expands K/V to the query heads (GQA), computes exact scores per query chunk, masks invalid keys;
2. asks the layer's selector (`attention.selectors`) which keys each query keeps within its budget;
3. always keeps the current token and the sink tokens (the first valid keys);
4. attends over the kept keys only, and measures recall: the share of the dense softmax mass kept.

This is the reference path for quality (it computes all scores); decode-time speed comes from the GPU
path that gathers only the selected keys. DeepSeek-V3.2's native indexer hands its selection in as
`indices`; it is honoured (it is part of that model) and recorded for capture.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workbench.attention.selectors import SELECTOR_FNS, SelectionContext
from workbench.policy import Attention
from workbench.roles import attention_modules

BACKEND = "workbench"
QUERY_CHUNK = 256  # queries scored at a time: bounds the (B, H, chunk, T) score buffer
_registered = False


def install_backend(model: nn.Module) -> None:
    """Register the backend (once per process) and switch `model` to it; selectors live on the modules."""
    _register()
    for _, module in attention_modules(model):
        module.workbench_attention = model.workbench_selectors.get(module.layer_idx, Attention())
    if model.config._attn_implementation != BACKEND:
        model.set_attn_implementation(BACKEND)


def uninstall(model: nn.Module) -> None:
    for _, module in attention_modules(model):
        for attr in ("workbench_attention", "workbench_capture"):  # recall survives a reference pass
            if hasattr(module, attr):
                delattr(module, attr)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def workbench_mask(*args, **kwargs):
        kwargs["allow_is_causal_skip"] = False  # always a real mask: causality must never be implicit
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(BACKEND, workbench_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(BACKEND, workbench_mask)
    _registered = True


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, H, T, D) for grouped-query attention."""
    b, hkv, t, d = x.shape
    if hkv == heads:
        return x
    return x[:, :, None].expand(b, hkv, heads // hkv, t, d).reshape(b, heads, t, d)


def _valid_keys(attention_mask, b: int, tq: int, tk: int, device) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk): True where a query may attend (causal and not padding)."""
    if attention_mask is None:  # only reachable if a caller bypassed our mask function
        q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
        return (torch.arange(tk, device=device)[None, :] <= q_pos)[None, None].expand(b, 1, tq, tk)
    m = attention_mask[..., :tk]
    return m if m.dtype == torch.bool else m == 0


def workbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry: query (B, H, Tq, D), key/value (B, Hkv, Tk, D[v]) -> ((B, Tq, H, Dv), None)."""
    spec: Attention = getattr(module, "workbench_attention", None) or Attention()
    capture = getattr(module, "workbench_capture", None)
    b, h, tq, d = query.shape
    tk = key.shape[2]
    scaling = scaling if scaling is not None else 1 / math.sqrt(d)
    valid = _valid_keys(attention_mask, b, tq, tk, query.device)
    native = kwargs.get("indices")  # DeepSeek-V3.2's own top-k, (B, Tq, k)
    chosen = None
    if native is not None:
        chosen = torch.zeros(b, 1, tq, tk, dtype=torch.bool, device=query.device)
        chosen.scatter_(-1, native.long().clamp(max=tk - 1)[:, None], True)
    k, v = _expand_heads(key, h), _expand_heads(value, h)
    if spec.is_identity and capture is None:
        mask = valid if chosen is None else valid & chosen
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    outs = []
    for start in range(0, tq, QUERY_CHUNK):
        q = query[:, :, start:start + QUERY_CHUNK]
        native_chunk = None if chosen is None else chosen[:, :, start:start + QUERY_CHUNK]
        outs.append(_attend_chunk(module, spec, q, k, v, valid[:, :, start:start + QUERY_CHUNK], scaling,
                                  capture, start, native_chunk))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _attend_chunk(module, spec, q, k, v, valid, scaling, capture, start, native):
    """Our selection runs on the causal mask alone, so it can be compared with a native one; the model's
    native selection (DeepSeek-V3.2) is then intersected, as the model itself would attend."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # (B, H, c, Tk)
    valid = valid.expand(-1, scores.shape[1], -1, -1)
    scores = scores.masked_fill(~valid, float("-inf"))
    if spec.is_identity:
        keep = valid
    else:
        ctx = SelectionContext(spec, q, k, scores, valid)
        keep = (SELECTOR_FNS[spec.selector](ctx) | ctx.always_kept()) & valid
    if capture is not None:
        capture.record_ours(module.layer_idx, start, keep, native, valid)
    if native is not None:
        keep = keep & native
        scores = scores.masked_fill(~native, float("-inf"))
    dense = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows (left padding) -> 0
    probs = dense if spec.is_identity else torch.softmax(scores.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    if not spec.is_identity:
        _record_recall(module, dense, keep, valid)
    if capture is not None:
        capture.record(module.layer_idx, start, dense, keep, native is not None, valid)
    return torch.matmul(probs.to(v.dtype), v)


def _record_recall(module, dense: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor) -> None:
    """Accumulate the dense attention mass the selection kept, over real (non-padding) query rows."""
    real = valid.any(-1)  # (B, H, c)
    kept = (dense * keep).sum(-1)[real]
    acc = getattr(module, "workbench_recall", None)
    if acc is None:
        acc = module.workbench_recall = [0.0, 0]
    acc[0] += kept.double().sum().item()
    acc[1] += kept.numel()


def attention_recall(model: nn.Module) -> dict | None:
    """Mean recall over every measured query, overall and per layer; None if nothing was measured."""
    per_layer = {}
    total = [0.0, 0]
    for _, module in attention_modules(model):
        acc = getattr(module, "workbench_recall", None)
        if acc and acc[1]:
            per_layer[module.layer_idx] = acc[0] / acc[1]
            total[0] += acc[0]
            total[1] += acc[1]
    if not total[1]:
        return None
    return {"overall": total[0] / total[1], "by_layer": per_layer}


def reset_recall(model: nn.Module) -> None:
    for _, module in attention_modules(model):
        if hasattr(module, "workbench_recall"):
            module.workbench_recall = [0.0, 0]
