"""Write the engine's model, as its policy stores it, to a GGUF file that llama.cpp and transformers load.

    report = export_gguf(engine, "model.gguf")            # exact types only
    report = export_gguf(engine, "model.gguf", allow_requantize=True)

Each tensor goes out in the GGML type that holds its stored format exactly, bit for bit:

    stored format                     | GGML type | why it is exact
    ----------------------------------+-----------+-------------------------------------------------
    int4-g32 (symmetric)              | Q4_0      | fp16 scale per 32, w = (q - 8) * d: our arithmetic
    int4-g32-asym                     | Q4_1      | fp16 scale and minimum per 32, w = q * d + m
    int8-g32 (symmetric)              | Q8_0      | fp16 scale per 32, w = q * d, q in [-128, 127]
    the model's float32 / bf16 / fp16 | F32 / BF16 / F16 | a copy
    (and casts to fp32 / bf16 / fp16) |           |

Every exact tensor is checked after packing: gguf's own dequantization of the bytes written must equal
our dequantized weight exactly, or the export stops. A format with no exact type (other group sizes,
per-row int8, int3/int2, fp8) is refused, or with `allow_requantize` re-quantized from its dequantized
weight to the nearest type (Q8_0 for 8 bits, else Q4_0 / Q4_1), and the report names those tensors.

The tensors are laid out as llama.cpp's own converter writes them (gguf's tensor-name map; q and k rows
permuted for its rotary layout, which transformers' GGUF loader undoes; Gemma 3's norms as 1 + w), with the
architecture, tokenizer (BPE vocabularies) and chat template as metadata. The `gguf` package does the file
format; the packing is ours.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from workbench.errors import InputError
from workbench.export.common import by_type, check_target, refuse_runtime_only, score_reader, staged, write_sidecar

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2",  # model_type -> GGUF architecture
                 "gemma3_text": "gemma3"}
ROTARY_PERMUTED = {"llama"}  # llama.cpp's converter reorders q / k rows for these architectures only
# Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w (its converter adds 1, transformers' reader
# subtracts it again: float32 rounding of that round trip is the one inexact step of a Gemma export)
NORMS_PLUS_ONE = {"gemma3"}
FLOAT_TYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
CAST_FORMATS = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def exact_type(store) -> str | None:
    """The GGML type name that holds `store` (a PackedWeight) bit for bit, or None."""
    fmt, spec = store.fmt.name, store.spec
    if fmt in CAST_FORMATS:
        return CAST_FORMATS[fmt]
    if spec.group_size == 32 and fmt in ("int4", "int8g") and store.tensors["scale"].dtype == torch.float16:
        if fmt == "int8g":
            return "Q8_0" if spec.symmetric else None
        return "Q4_0" if spec.symmetric else "Q4_1"
    return None


def nearest_type(store) -> str:
    """What a format with no exact GGML type is re-quantized to (`allow_requantize`)."""
    if store.fmt.name in ("int8", "int8g", "fp8"):
        return "Q8_0"
    return "Q4_0" if store.spec.symmetric else "Q4_1"


def pack_q4(store) -> np.ndarray:
    """Our int4-g32 tensors as Q4_0 / Q4_1 blocks, (N, K / 32 * 18 or 20) uint8: each block is its fp16
    scale (and fp16 minimum), then 16 bytes holding element j in the low and j + 16 in the high nibble."""
    from workbench.formats.quant import unpack_int4
    t = store.tensors
    v = unpack_int4(t["q"].cpu())
    n, k = v.shape
    v = v.reshape(n, k // 32, 32)
    qs = (v[..., :16] | (v[..., 16:] << 4)).numpy()
    parts = [t["scale"].cpu().numpy().astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)]
    if "min" in t:
        parts.append(t["min"].cpu().numpy().astype(np.float16).view(np.uint8).reshape(n, k // 32, 2))
    return np.concatenate(parts + [qs], axis=-1).reshape(n, -1)


def pack_q8(store) -> np.ndarray:
    """Our int8-g32 tensors as Q8_0 blocks, (N, K / 32 * 34) uint8: the fp16 scale, then 32 signed codes."""
    t = store.tensors
    codes = (t["q"].cpu().to(torch.int16) - 128).to(torch.int8).numpy()
    n, k = codes.shape
    d = t["scale"].cpu().numpy().astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)
    return np.concatenate([d, codes.view(np.uint8).reshape(n, k // 32, 32)], axis=-1).reshape(n, -1)


def rotary_rows(n: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q / k (its `permute`): per head, the two rotary halves
    interleaved. Applied to whole rows, so packed rows move with their scales."""
    idx = torch.arange(n)
    return idx.reshape(heads, 2, n // heads // 2).transpose(1, 2).reshape(n)


def tensor_plan(engine) -> list[dict]:
    """Every tensor of the model as the file will hold it: its GGUF name, its source (a PackedWeight or
    a float tensor), the GGML type, and whether that type is exact."""
    import gguf
    from workbench.roles import embedding_modules, linear_modules
    model, config = engine.model, engine.model.config
    arch = _architecture(config)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    stores = {}
    for fqn, module, _ in linear_modules(model):
        if getattr(module, "is_workbench_linear", False) and module.store is not None:
            stores[fqn] = module.store
    for fqn, module in embedding_modules(model):
        if getattr(module, "is_workbench_embedding", False):
            stores[fqn] = module.store
    plan, seen = [], set()
    for name, param in model.named_parameters():
        hf = name.replace(".base.", ".")  # a wrapper keeps the original layer as `.base`
        if hf in seen:
            continue
        seen.add(hf)
        fqn = hf.rsplit(".", 1)[0]
        gname = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise InputError(f"GGUF export: no GGUF name for {hf} in the {arch} layout")
        store = stores.get(fqn) if hf.endswith(".weight") else None  # a bias stays as loaded
        plan.append(_entry(gname, store, param.detach()))
    head = stores.get("lm_head")
    tied = getattr(config, "tie_word_embeddings", False)
    embed_store = next((stores[f] for f, _ in embedding_modules(model) if f in stores), None)
    if head is not None and (not tied or head is not embed_store):
        if not any(e["name"] == "output.weight" for e in plan):
            plan.append(_entry("output.weight", head, None))
        else:
            for e in plan:
                if e["name"] == "output.weight":
                    e.update(_entry("output.weight", head, None))
    return plan


def _entry(name: str, store, tensor) -> dict:
    if store is None or store.fmt.name == "none":
        return {"name": name, "store": None, "tensor": tensor, "type": FLOAT_TYPES.get(tensor.dtype, "F32"),
                "exact": tensor.dtype in FLOAT_TYPES}
    typ = exact_type(store)
    return {"name": name, "store": store, "tensor": None, "type": typ or nearest_type(store), "exact": typ is not None,
            "format": store.fmt.label(store.spec)}


def _architecture(config) -> str:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise InputError(f"GGUF export knows {', '.join(sorted(ARCHITECTURES))}, not {config.model_type!r}")
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if kind not in ("default", None):
        raise InputError(f"GGUF export does not write {kind!r} rope scaling yet")
    return arch


def export_gguf(engine, out: str | Path, allow_requantize: bool = False, weights_only: bool = False,
                force: bool = False, progress: bool = True) -> dict:
    """Write `engine`'s model under its policy to `out` (.gguf); returns the export report."""
    import gguf
    from workbench.progress import progress as bar
    out = Path(out)
    check_target(out, force)
    runtime = refuse_runtime_only(engine.policy, weights_only, "GGUF")
    config = engine.model.config
    arch = _architecture(config)
    plan = tensor_plan(engine)
    inexact = [e for e in plan if not e["exact"]]
    if inexact and not allow_requantize:
        shown = ", ".join(sorted({e.get("format", e["type"]) for e in inexact}))
        raise InputError(f"{len(inexact)} tensor(s) ({shown}) have no exact GGML type: use int4-g32 (Q4_0), "
                         "int4-g32-asym (Q4_1), int8-g32 (Q8_0) or a float format, or pass --allow-requantize")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    with staged(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _metadata(writer, engine, config)
        rows = []
        for e in bar(plan, desc="exporting", unit="tensor", enabled=progress):
            if arch in NORMS_PLUS_ONE and e["store"] is None and e["name"].endswith("norm.weight"):
                e = {**e, "tensor": e["tensor"].float() + 1}
            data, nbytes = _tensor_bytes(e, heads, kv_heads, arch in ROTARY_PERMUTED)
            writer.add_tensor(e["name"], data, raw_dtype=getattr(gguf.GGMLQuantizationType, e["type"]))
            rows.append({"name": e["name"], "type": e["type"], "exact": e["exact"], "bytes": nbytes,
                         "format": e.get("format", e["type"].lower())})
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    report = {"format": "gguf", "path": str(out), "architecture": arch, "policy": engine.policy.name,
              "tensors": rows, "requantized": [r["name"] for r in rows if not r["exact"]],
              "bytes": out.stat().st_size, "by_type": by_type(rows)}
    if runtime:
        report["sidecar"] = write_sidecar(out, engine.policy, runtime)
    return report


def _tensor_bytes(e: dict, heads: int, kv_heads: int, permuted: bool = True) -> tuple[np.ndarray, int]:
    """The tensor as gguf's writer takes it (float array, or packed uint8 rows), checked when exact."""
    import gguf
    name, store = e["name"], e["store"]
    perm = None
    if permuted and (name.endswith("attn_q.weight") or name.endswith("attn_k.weight")):
        n = store.shape[0] if store is not None else e["tensor"].shape[0]
        perm = rotary_rows(n, heads if name.endswith("attn_q.weight") else kv_heads)
    if store is None:  # everything moves to the CPU first: an engine on a GPU exports the same file
        t = e["tensor"].cpu() if perm is None else e["tensor"].cpu()[perm]
        return _float_array(t, e["type"]), t.numel() * t.element_size()
    qtype = getattr(gguf.GGMLQuantizationType, e["type"])
    want = store.dequantize().float().cpu()
    if e["type"] in ("F32", "BF16", "F16"):
        t = store.tensors["q"].cpu() if perm is None else store.tensors["q"].cpu()[perm]
        data = _float_array(t, e["type"])
    elif e["exact"]:
        data = pack_q8(store) if e["type"] == "Q8_0" else pack_q4(store)
        data = data if perm is None else data[perm.numpy()]
    else:  # re-quantize the weight this storage represents to the nearest GGML type
        w = want if perm is None else want[perm]
        data = gguf.quants.quantize(w.numpy().astype(np.float32), qtype)
    if e["exact"]:
        back = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))
        ref = want if perm is None else want[perm]
        if not torch.equal(back.reshape(ref.shape), ref):
            raise RuntimeError(f"GGUF export: {name} does not read back exactly as {e['type']}")
    return data, data.nbytes


def _float_array(t: torch.Tensor, typ: str) -> np.ndarray:
    t = t.detach().cpu()
    if typ == "BF16":  # numpy has no bfloat16: the raw 16-bit words, as bytes per row
        raw = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        return raw.reshape(t.shape[0], -1) if t.dim() > 1 else raw
    return t.to(torch.float16 if typ == "F16" else torch.float32).numpy()


def _metadata(writer, engine, config) -> None:
    import gguf
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(engine.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", config.num_attention_heads))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "gemma3_text":  # its head size is not hidden / heads, and half its layers slide
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    logging.getLogger("gguf").setLevel(logging.ERROR)  # "no merges found" for byte-level vocabularies
    with tempfile.TemporaryDirectory() as tmp:  # gguf's vocabulary readers take a tokenizer folder
        engine.tokenizer.save_pretrained(tmp)
        vocab = gguf.vocab.BpeVocab(Path(tmp))
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        pad = config.vocab_size - len(tokens)  # the embedding table may be larger than the vocabulary
        tokens += [f"[PAD{i}]".encode() for i in range(pad)]
        scores += [-1000.0] * pad
        types += [gguf.TokenType.UNUSED] * pad
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=config.vocab_size)
        template = getattr(engine.tokenizer, "chat_template", None)
        if template and not special.chat_template:
            special.chat_template = template
        special.add_to_gguf(writer)  # merges, special token ids, chat template


def _rope_theta(config) -> float:
    """RoPE's base: transformers 5 keeps it in the rope parameters, earlier versions on the config."""
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if isinstance(params, dict) and "rope_theta" in params:
            return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", None) or 10000.0)


def check_gguf(engine, path: str | Path, max_tokens: int = 512, seq_len: int = 256) -> dict:
    """Read the exported file back with transformers' GGUF loader (an independent reader) and score its
    next-token distributions on held-out text against the engine's policy model and the unmodified one."""
    from transformers import AutoModelForCausalLM
    from transformers import modeling_gguf_pytorch_utils as reader
    path = Path(path)
    bar = reader.tqdm
    reader.tqdm = lambda items, **kwargs: items  # its own dequantization bar: one more line per export
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    finally:
        reader.tqdm = bar
    return score_reader(engine, model, "transformers (GGUF)", max_tokens, seq_len)
