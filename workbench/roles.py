"""The architecture-role table: which module of which model plays which part.

One ordered table of (regex on the module's full name, role) serves llama, qwen2, mistral, gemma3,
phi3, deepseek_v2/v3/v32 and their MoE variants; the first match wins. Roles:

* ``q k v o``            attention projections (MHA/GQA);
* ``q_a q_b kv_a kv_b``  DeepSeek's multi-head latent attention (low-rank query and joint key-value);
* ``qkv gate_up``        fused projections (phi3);
* ``gate up down``       MLP projections, shared experts and per-expert linears included;
* ``experts``            fused expert tensors (transformers 5 stores routed experts as 3-D parameters);
* ``router indexer lm_head embed``  never touched by a policy default, only by a rule that names them;
* ``attention``          the attention module itself (where attention selectors act).
"""
from __future__ import annotations

import re
from typing import Iterator

from torch import nn

ROLE_TABLE: tuple[tuple[str, str], ...] = (
    (r"\.self_attn\.indexer(\.|$)", "indexer"),
    (r"\.self_attn\.q_proj$", "q"),
    (r"\.self_attn\.k_proj$", "k"),
    (r"\.self_attn\.v_proj$", "v"),
    (r"\.self_attn\.o_proj$", "o"),
    (r"\.self_attn\.qkv_proj$", "qkv"),
    (r"\.self_attn\.q_a_proj$", "q_a"),
    (r"\.self_attn\.q_b_proj$", "q_b"),
    (r"\.self_attn\.kv_a_proj_with_mqa$", "kv_a"),
    (r"\.self_attn\.kv_b_proj$", "kv_b"),
    (r"\.self_attn$", "attention"),
    (r"\.mlp\.gate_up_proj$", "gate_up"),
    (r"\.(mlp|shared_experts?|experts\.\d+)\.gate_proj$", "gate"),
    (r"\.(mlp|shared_experts?|experts\.\d+)\.up_proj$", "up"),
    (r"\.(mlp|shared_experts?|experts\.\d+)\.down_proj$", "down"),
    (r"\.experts\.\d+\.w1$", "gate"),
    (r"\.experts\.\d+\.w3$", "up"),
    (r"\.experts\.\d+\.w2$", "down"),
    (r"\.mlp\.experts$", "experts"),
    (r"\.mlp\.(gate|router)$", "router"),
    (r"(^|\.)lm_head$", "lm_head"),
    (r"(^|\.)embed_tokens$", "embed"),
)
_COMPILED = tuple((re.compile(p), role) for p, role in ROLE_TABLE)


def role_of(fqn: str) -> str | None:
    """The role of the module named `fqn`, or None.

    >>> role_of("model.layers.3.mlp.down_proj")
    'down'
    """
    for pattern, role in _COMPILED:
        if pattern.search(fqn):
            return role
    return None


def layer_index(fqn: str) -> int | None:
    """The decoder-layer index in a module name (``model.layers.7.mlp`` -> 7)."""
    m = re.search(r"\.layers\.(\d+)\.", fqn + ".")
    return int(m.group(1)) if m else None


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """(fqn, module, role) for every linear layer, wrapped ones included (they carry `.base`)."""
    for fqn, module in _walk(model, ""):
        if isinstance(module, nn.Linear) or getattr(module, "is_workbench_linear", False):
            yield fqn, module, role_of(fqn)


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() that does not descend into workbench wrappers (their `.base` is not a model layer)."""
    yield prefix, module
    if getattr(module, "is_workbench_linear", False) or getattr(module, "is_workbench_embedding", False):
        return
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def embedding_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(fqn, module) for token-embedding tables (plain or wrapped)."""
    for fqn, module in _walk(model, ""):
        if role_of(fqn) == "embed" and (isinstance(module, nn.Embedding)
                                         or getattr(module, "is_workbench_embedding", False)):
            yield fqn, module


def attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(fqn, module) for every attention module that knows its layer index."""
    for fqn, module in model.named_modules():
        if role_of(fqn) == "attention" and hasattr(module, "layer_idx"):
            yield fqn, module
