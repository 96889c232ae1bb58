"""Random-weight models of real shapes, and tiny configs per architecture, built locally.

Speed work needs the exact shapes of real models (the bytes read per token are what matter), not their
weights; tests need every architecture the transforms claim to support, in milliseconds. Both get a
byte-level tokenizer built here, so nothing is downloaded.
"""
from __future__ import annotations

import torch

from workbench.errors import ModelError

# name -> (model_type, config kwargs). Real shapes first, then one tiny config per architecture.
_TINY = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
_TINY_MLA = dict(_TINY, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4,
                 num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
                 kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                 topk_group=1)
SYNTHETIC_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama-3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                 max_position_embeddings=8192, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 500000.0})),
    # the same shapes with Llama 3.1's 128k context (its rope scaling), for long-context decode
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=131072, rope_parameters={
                                       "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=8192, tie_word_embeddings=True)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   max_position_embeddings=8192, tie_word_embeddings=True)),
    # DeepSeek-V2-Lite's shapes (27 layers, 64 routed experts + 2 shared, top-6, MLA with kv_lora_rank 512;
    # 15.7B parameters, 2.4B active) in DeepSeek-V3's modules, its router greedy over one group
    "deepseek-v2-lite": ("deepseek_v3", dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                             moe_intermediate_size=1408, num_hidden_layers=27,
                                             num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                                             n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                                             n_group=1, topk_group=1, norm_topk_prob=False,
                                             routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=512,
                                             qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                                             max_position_embeddings=32768)),
    # two layers of DeepSeek-V3's real dimensions (one dense, one with its 256 routed experts, top-8)
    "deepseek-v3-slice": ("deepseek_v3", dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                                              moe_intermediate_size=2048, num_hidden_layers=2,
                                              num_attention_heads=128, num_key_value_heads=128,
                                              n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                                              first_k_dense_replace=1, n_group=8, topk_group=4, q_lora_rank=1536,
                                              kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                                              v_head_dim=128, max_position_embeddings=32768)),
    "deepseek-v3-tiny": ("deepseek_v3", dict(_TINY_MLA, hidden_size=256, intermediate_size=512,
                                             moe_intermediate_size=128, num_hidden_layers=4,
                                             num_attention_heads=8, num_key_value_heads=8,
                                             n_routed_experts=8, max_position_embeddings=4096)),
    "tiny-llama": ("llama", _TINY),
    "tiny-qwen2": ("qwen2", _TINY),
    "tiny-mistral": ("mistral", dict(_TINY, sliding_window=None)),
    "tiny-gemma3": ("gemma3_text", dict(_TINY, head_dim=16)),
    # Gemma 3's two kinds of layer at a window the tests can cross: an 8-key sliding layer, then a global one
    "gemma3-tiny-window": ("gemma3_text", dict(_TINY, head_dim=16, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"])),
    "tiny-deepseek_v3": ("deepseek_v3", _TINY_MLA),
    "tiny-deepseek_v32": ("deepseek_v32", dict(_TINY_MLA, index_topk=8, index_head_dim=16, index_n_heads=4)),
    # an architecture the decode loop does not cover (transformers' generate serves it)
    "phi3-tiny": ("phi3", _TINY),
    # a Llama-3-like tokenizer: BOS before every text, a chat template that writes BOS itself
    "bos-llama": ("llama", _TINY),
}
TINY_ARCHITECTURES = [n for n in SYNTHETIC_CONFIGS if n.startswith("tiny-")]
BOS_MODELS = frozenset({"bos-llama"})
BOS_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def synthetic_config(name: str):
    from transformers import CONFIG_MAPPING
    if name not in SYNTHETIC_CONFIGS:
        raise ModelError(f"unknown synthetic model {name!r}; allowed: {', '.join(SYNTHETIC_CONFIGS)}")
    model_type, kwargs = SYNTHETIC_CONFIGS[name]
    tok = byte_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return CONFIG_MAPPING[model_type](**ids, **kwargs)


def build_synthetic(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight model (seeded, so two builds are identical) and a byte tokenizer."""
    from transformers import AutoModelForCausalLM
    config = synthetic_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = config.pad_token_id
    return model, byte_tokenizer(bos=name in BOS_MODELS)


def byte_tokenizer(bos: bool = False):
    """A real `PreTrainedTokenizerFast` over the 256 bytes plus <s>, </s>, <pad> (ids 256-258).

    `bos=True`: it puts <s> before every text (as Llama 3's and Gemma's tokenizers do) and has a chat
    template that writes <s> itself, the case where tokenizing a rendered chat with special tokens
    would double the BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i, special in enumerate(["<s>", "</s>", "<pad>"]):
        vocab[special] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    if bos:
        from tokenizers import processors
        core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                            special_tokens=[("<s>", 256)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.padding_side = "left"
    if bos:
        tok.chat_template = BOS_CHAT_TEMPLATE
    return tok
