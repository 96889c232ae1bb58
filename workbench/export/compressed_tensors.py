"""Write the engine's model, as its policy stores it, to a compressed-tensors folder (the checkpoint format
of llm-compressor, which vLLM serves and transformers loads).

    report = export_compressed_tensors(engine, "model-ct")          # exact schemes only
    report = export_compressed_tensors(engine, "model-ct", allow_requantize=True)

Each quantized layer goes out as the compressed-tensors scheme whose arithmetic is its format's:

    stored format                          | scheme (weights)                        | tensors
    ---------------------------------------+-----------------------------------------+-------------------------------
    int4 / int3 / int2 / int8 -gN (symm.)  | int, N bits, strategy group, symmetric  | weight_packed, weight_scale
    int8 (per row)                         | int, 8 bits, strategy channel           | weight_packed, weight_scale
    int8-blockB                            | int, 8 bits, strategy block [B, B]      | weight_packed, weight_scale
    fp8 (per row)                          | float, 8 bits, strategy channel         | weight (e4m3), weight_scale
    a cast (fp32 / bf16 / fp16)            | none: a dense weight in that dtype      | weight

The integer codes are packed by compressed-tensors' own `pack_to_int32` ("pack-quantized"; fp8 is
"float-quantized"); the scales are written as float32, which holds our fp16 scales exactly: a reader
multiplies codes by scales in the scales' dtype, so fp16 scales would round q x d. Every layer is checked
after packing: compressed-tensors' own decompression must give our dequantized weight exactly, or the
export stops. The asymmetric formats keep a float minimum per group, which compressed-tensors' integer
zero points cannot hold: they are refused, or with `allow_requantize` re-quantized (symmetric groups of the
same size and bits) and named in the report. A quantized embedding or head is written dequantized (float32,
the same values): transformers and vLLM keep both unquantized (a quantized lm_head in the folder would be
ignored by transformers' loader and the head left random).

One config group per distinct scheme; its targets are regular expressions over layer numbers where every
layer of a role shares the scheme, exact module names otherwise. vLLM runs q|k|v and gate|up as one
fused layer each and needs one scheme per fused layer: the report says where a policy breaks that.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from workbench.errors import InputError
from workbench.export.common import by_type, check_target, refuse_runtime_only, score_reader, staged, write_sidecar

SCALE_DTYPE = torch.float32  # exact for our fp16 (and float32) scales; see the module docstring
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM's fused layers (one scheme each)


def scheme_of(store) -> tuple[dict | None, str | None, bool]:
    """(weights' QuantizationArgs as a dict or None for a dense weight, compression format, exact) of a
    PackedWeight."""
    fmt, spec = store.fmt.name, store.spec
    if fmt in ("none", "fp32", "bf16", "fp16"):
        return None, None, True
    if fmt == "fp8":
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}, "float-quantized", True
    if fmt == "int8" and spec.group_size:
        return ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "block",
                 "block_structure": [spec.group_size, spec.group_size]}, "pack-quantized", True)
    if fmt == "int8":
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, "pack-quantized", True
    if store.fmt.bits:
        args = {"num_bits": store.fmt.bits, "type": "int", "symmetric": True, "strategy": "group",
                "group_size": spec.group_size}
        return args, "pack-quantized", spec.symmetric
    raise InputError(f"compressed-tensors export does not know the weight format {store.fmt.label(spec)!r}")


def layer_tensors(store, args: dict | None, fmt: str | None) -> dict[str, torch.Tensor]:
    """A layer's tensors as the scheme stores them (local names: weight_packed, weight_scale, ...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from workbench.formats.quant import unpack_bits
    t = {k: v.detach().cpu() for k, v in store.tensors.items()}
    if args is None:  # a cast: its own dtype (the model's weights keep theirs)
        return {"weight": t["q"] if "q" in t else store.dequantize()}
    n, k = store.shape
    if fmt == "float-quantized":
        return {"weight": t["q"], "weight_scale": t["scale"].to(SCALE_DTYPE)[:, None]}
    if args["strategy"] in ("channel", "block"):  # our int8: signed codes in [-127, 127]
        codes = t["q"]
        scale = t["scale"][:, None] if args["strategy"] == "channel" else t["scale"]
    else:
        bits = args["num_bits"]
        codes = (unpack_bits(t["q"], bits).to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        scale = t["scale"]
    return {"weight_packed": pack_to_int32(codes.contiguous(), args["num_bits"]),
            "weight_scale": scale.to(SCALE_DTYPE).contiguous(), "weight_shape": torch.tensor([n, k])}


def requantized(store):
    """The nearest exact storage for a format compressed-tensors cannot hold (an asymmetric group format):
    its dequantized weight quantized again in symmetric groups of the same size and bits."""
    from workbench.formats.packed import PackedWeight
    from workbench.formats.quant import quantize_grouped
    from workbench.policy import Weights
    w = store.dequantize()
    tensors = quantize_grouped(w, store.fmt.bits, store.spec.group_size, symmetric=True)
    return PackedWeight(store.fmt, Weights(store.fmt.name, store.spec.group_size, True), tuple(w.shape), tensors,
                        store.compute_dtype)


def check_layer(local: dict[str, torch.Tensor], args: dict, fmt: str, want: torch.Tensor, name: str) -> None:
    """compressed-tensors' own decompression of `local` must equal `want` (our dequantized weight) exactly."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    scheme = QuantizationScheme(targets=[name], weights=QuantizationArgs(**args), format=fmt)
    back = BaseCompressor.get_value_from_registry(fmt).decompress(dict(local), scheme)["weight"]
    if not torch.equal(back.float(), want.float()):
        raise RuntimeError(f"compressed-tensors export: {name} does not read back exactly as {fmt}")


def module_plan(engine) -> list[dict]:
    """Every weight-holding module of the model as the folder will hold it: fqn, store (or None for a
    parameter kept as loaded), its scheme, and whether the scheme is exact."""
    from workbench.roles import embedding_modules, linear_modules
    model, config = engine.model, engine.model.config
    plan = []
    embed_store = None
    for fqn, module in embedding_modules(model):
        if getattr(module, "is_workbench_embedding", False):
            embed_store = module.store
            plan.append({"fqn": fqn, "store": module.store, "args": None, "format": None, "exact": True,
                         "dense_from": module.store.fmt.label(module.store.spec)})
    for fqn, module, _ in linear_modules(model):
        store = module.store if getattr(module, "is_workbench_linear", False) else None
        if store is None or store.fmt.name == "none":
            continue
        if fqn == "lm_head" and getattr(config, "tie_word_embeddings", False) and store is embed_store:
            continue  # tied to the embedding, which the folder already holds
        if fqn == "lm_head":  # transformers and vLLM keep the head unquantized: its weight, dequantized
            plan.append({"fqn": fqn, "store": store, "args": None, "format": None, "exact": True,
                         "dense_from": store.fmt.label(store.spec)})
            continue
        args, fmt, exact = scheme_of(store)
        plan.append({"fqn": fqn, "store": store, "args": args, "format": fmt, "exact": exact,
                     "label": store.fmt.label(store.spec)})
    return plan


def targets_for(names: list[str], all_names: list[str]) -> list[str]:
    """`names` (one scheme's modules) as config-group targets: one regex per role where every layer's module
    of that role is in `names`, the exact names otherwise."""
    layered = re.compile(r"^(.*\.)(\d+)(\..+)$")
    by_role: dict[tuple[str, str], set[str]] = {}
    for name in all_names:
        m = layered.match(name)
        if m:
            by_role.setdefault((m.group(1), m.group(3)), set()).add(name)
    out, covered = [], set()
    chosen = set(names)
    for (head, tail), members in sorted(by_role.items()):
        if members <= chosen:
            out.append("re:^" + re.escape(head) + r"\d+" + re.escape(tail) + "$")
            covered |= members
    out += sorted(chosen - covered)
    return out


def fused_conflicts(plan: list[dict]) -> list[str]:
    """Layers vLLM fuses (q|k|v, gate|up) that the policy gives different schemes: vLLM refuses them."""
    schemes = {e["fqn"]: json.dumps(e["args"], sort_keys=True) for e in plan if e.get("dense_from") is None}
    out = []
    for fqn in schemes:
        parent, _, leaf = fqn.rpartition(".")
        for group in FUSED:
            if leaf == group[0]:
                got = {schemes.get(f"{parent}.{member}", "dense") for member in group}
                if len(got) > 1:
                    out.append(f"{parent}.{'|'.join(group)}")
    return out


def export_compressed_tensors(engine, out: str | Path, allow_requantize: bool = False, weights_only: bool = False,
                              force: bool = False, progress: bool = True) -> dict:
    """Write `engine`'s model under its policy to the folder `out`; returns the export report."""
    try:
        from compressed_tensors import __version__ as ct_version
    except ImportError:
        raise InputError("compressed-tensors export needs its package: pip install compressed-tensors") from None
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    from workbench.progress import progress as bar
    from workbench.roles import linear_modules
    out = Path(out)
    check_target(out, force, folder=True)
    runtime = refuse_runtime_only(engine.policy, weights_only, "compressed-tensors")
    model, config = engine.model, engine.model.config
    plan = module_plan(engine)
    inexact = [e for e in plan if not e["exact"]]
    if inexact and not allow_requantize:
        shown = ", ".join(sorted({e["label"] for e in inexact}))
        raise InputError(f"{len(inexact)} layer(s) ({shown}) have no exact compressed-tensors scheme (its zero "
                         "points are integers): use the symmetric int4/int3/int2/int8-gN, int8, int8-blockN, fp8 "
                         "or a float format, or pass --allow-requantize")
    planned = {e["fqn"]: e for e in plan}
    tensors, rows, groups = {}, [], {}
    for e in bar(plan, desc="exporting", unit="layer", enabled=progress):
        store = requantized(e["store"]) if not e["exact"] else e["store"]
        if e.get("dense_from"):
            local = {"weight": store.dequantize()}
        else:
            local = layer_tensors(store, e["args"], e["format"])
            if e["args"] is not None:
                check_layer(local, e["args"], e["format"], store.dequantize(), e["fqn"])
                groups.setdefault((json.dumps(e["args"], sort_keys=True), e["format"]), []).append(e["fqn"])
        for key, value in local.items():
            tensors[f"{e['fqn']}.{key}"] = value.contiguous()
        rows.append({"name": e["fqn"], "type": _type_name(e, local), "exact": e["exact"],
                     "bytes": sum(v.numel() * v.element_size() for v in local.values()),
                     "format": e.get("label") or e.get("dense_from")})
    for name, param in model.named_parameters():  # everything the policy left as loaded
        hf = name.replace(".base.", ".")
        fqn, _, leaf = hf.rpartition(".")
        if hf in tensors or (fqn in planned and leaf == "weight"):
            continue
        tensors[hf] = param.detach().cpu().contiguous()
        rows.append({"name": hf, "type": str(param.dtype).removeprefix("torch."), "exact": True,
                     "bytes": param.numel() * param.element_size(), "format": "as loaded"})
    tied = getattr(config, "tie_word_embeddings", False)
    untie = tied and "lm_head" in planned
    all_linear = [fqn for fqn, _module, _role in linear_modules(model)]
    schemes = {f"group_{i}": QuantizationScheme(targets=targets_for(names, all_linear),
                                                weights=QuantizationArgs(**json.loads(args)), format=fmt)
               for i, ((args, fmt), names) in enumerate(sorted(groups.items()))}
    formats = {fmt for _args, fmt in groups}
    with staged(out, folder=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = copy.deepcopy(config)
        if untie:
            cfg.tie_word_embeddings = False  # the head has its own (quantized) weight
        cfg.save_pretrained(tmp)
        if schemes:
            qc = QuantizationConfig(config_groups=schemes, quantization_status="compressed",
                                    format=formats.pop() if len(formats) == 1 else "mixed-precision")
            data = json.loads((tmp / "config.json").read_text())
            data["quantization_config"] = {"version": ct_version, "quant_method": "compressed-tensors",
                                           "sparsity_config": {}, "transform_config": {},
                                           **qc.model_dump(exclude=["quant_method"])}
            (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        engine.tokenizer.save_pretrained(tmp)
    notes = []
    dense = [r["name"] for r in rows if r["type"] == "float32 (dequantized)"]
    if dense:
        notes.append(f"written dequantized (transformers and vLLM read no quantized embedding or head): "
                     f"{', '.join(dense)}")
    conflicts = fused_conflicts(plan)
    if conflicts:
        notes.append(f"vLLM fuses these and needs one scheme for each: {len(conflicts)} layer(s), e.g. "
                     + ", ".join(conflicts[:2]))
    report = {"format": "compressed-tensors", "path": str(out), "architecture": config.model_type,
              "policy": engine.policy.name, "tensors": rows,
              "requantized": [r["name"] for r in rows if not r["exact"]],
              "bytes": sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors"),
              "by_type": by_type(rows), "config_groups": len(schemes), "notes": notes,
              "vllm_fused_conflicts": conflicts}
    if runtime:
        report["sidecar"] = write_sidecar(out, engine.policy, runtime)
    return report


def _type_name(e: dict, local: dict) -> str:
    if e.get("dense_from"):
        return "float32 (dequantized)"
    if e["args"] is None:
        return str(local["weight"].dtype).removeprefix("torch.")
    a = e["args"]
    kind = {"group": f"g{a.get('group_size')}", "channel": "channel", "block": "block"}[a["strategy"]]
    return f"{a['type']}{a['num_bits']}-{kind}"


def check_compressed_tensors(engine, path: str | Path, max_tokens: int = 512, seq_len: int = 256) -> dict:
    """Load the exported folder with transformers (compressed-tensors decompresses each layer with its own
    config group on the first forward) and score it on held-out text against the engine's policy model and
    the unmodified one. Not `CompressedTensorsConfig(dequantize=True)`: transformers 5.24 decompresses
    every layer there with one group's scheme, which is wrong for a mixture."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=torch.float32)
    return score_reader(engine, model, "transformers (compressed-tensors)", max_tokens, seq_len)
