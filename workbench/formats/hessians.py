"""Second moments of each linear layer's calibration inputs, H = sum_t x_t x_t^T: what GPTQ minimises
the output error under.

    hessians = collect_hessians(engine, ["model.layers.0.mlp.down_proj", ...])
    h, tokens = hessians["model.layers.0.mlp.down_proj"]

The calibration split of the corpus runs once through the unmodified model (as the activation
histograms do, `sparsity.calibrate`). Layers that read the same tensor (q/k/v, gate/up) share one matrix.

`cached_hessians` keeps every linear layer's matrices of a model on disk (one safetensors file in the
cache, keyed by the model's fingerprint, the corpus, the token count and the window length, with those
and the versions in its metadata), so GPTQ and imatrix at any format reuse one calibration pass. A file
made for another model is refused in one line. Models whose matrices exceed `CACHE_MAX_BYTES` (an 8B
model's are tens of gigabytes) collect only the layers asked for, in memory, every time.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
from pathlib import Path

import torch

from workbench.artifacts import load_artifact, save_artifact
from workbench.corpus import load_text, token_windows
from workbench.errors import PolicyError
from workbench.progress import progress as bar
from workbench.roles import linear_modules
from workbench.sparsity.calibration import input_hooks

DEFAULT_TOKENS = 8192
# Fewer tokens per input and H overfits the calibration text: on the default model's layer-6 down_proj
# (1536 inputs) GPTQ's held-out output error was 1.07x RTN's from 2048 tokens, 0.61x from 8192.
MIN_TOKENS_PER_INPUT = 4
CACHE_MAX_BYTES = 2 << 30  # the default model's matrices take ~0.4 GB
ARTIFACT_FORMAT, ARTIFACT_VERSION = "workbench-hessians", "1"
log = logging.getLogger(__name__)


def collect_hessians(engine, fqns, tokens: int = DEFAULT_TOKENS, seq_len: int = 512, corpus: str | None = None,
                     progress: bool = True, check: bool = True,
                     sparsified: bool = False) -> dict[str, tuple[torch.Tensor, int]]:
    """{fqn: (H float32 (K, K) on the CPU, tokens seen)} for the named linear layers; with `check`, at
    least `MIN_TOKENS_PER_INPUT` tokens per input of each, or a PolicyError naming the layer.

    `sparsified`: the model runs as the engine's current policy has it (sparsified upstream), and each
    layer's H is of its input after its own sparsity rule, the input its weight really multiplies;
    otherwise the unmodified model's inputs."""
    wanted = set(fqns)
    targets = [(fqn, m if sparsified else (m.base if getattr(m, "is_workbench_linear", False) else m))
               for fqn, m, _ in linear_modules(engine.model) if fqn in wanted]
    if sparsified and any(getattr(m, "sparsifier", None) is None for _, m in targets):
        raise PolicyError(f"{next(f for f, m in targets if getattr(m, 'sparsifier', None) is None)} has no "
                          "sparsity rule to calibrate under")
    if len(targets) != len(wanted):
        missing = sorted(wanted - {fqn for fqn, _ in targets})
        raise PolicyError(f"no linear layer named {missing[0]!r} to calibrate")
    text, _ = load_text(corpus, "calibration")
    windows = token_windows(engine.tokenizer, text, min(seq_len, engine.max_positions), tokens)
    sums: dict[int, torch.Tensor] = {}  # id of the input's first reader -> running sum of x x^T
    owner: dict[str, int] = {}
    counts: dict[int, int] = {}
    last: dict = {"x": None, "key": None}

    def record(fqn, module, x):
        if sparsified:  # each layer's own cut: no two layers share the sparsified input
            x = module.sparsifier.fn(x)
        elif x is last["x"]:  # the same tensor as the previous layer's input: q/k/v, gate/up
            owner[fqn] = last["key"]
            return
        key = id(module)
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if key not in sums:
            sums[key] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
            counts[key] = 0
        sums[key].addmm_(rows.T, rows)  # in place: no (K, K) temporary per window
        counts[key] += rows.shape[0]
        owner[fqn] = key
        last["x"], last["key"] = x, key

    with input_hooks(targets, record), (contextlib.nullcontext() if sparsified else engine.reference()):
        for window in bar(windows, desc="collecting Hessians", unit="window", enabled=progress):
            last["x"] = None
            engine.forward(window[None])
    on_cpu = {key: h.cpu() for key, h in sums.items()}  # once per shared input
    out = {}
    for fqn, module in targets:
        key = owner.get(fqn)
        if key is None:
            raise PolicyError(f"{fqn} saw no calibration input")
        out[fqn] = (on_cpu[key], counts[key])
        if check:
            _check_tokens(fqn, counts[key], module.in_features)
    return out


def _check_tokens(fqn: str, count: int, inputs: int) -> None:
    if count < MIN_TOKENS_PER_INPUT * inputs:
        raise PolicyError(f"{fqn}: {count} calibration tokens for {inputs} inputs; GPTQ needs at least "
                          f"{MIN_TOKENS_PER_INPUT * inputs} (use more calibration text)")


def cached_hessians(engine, fqns, tokens: int = DEFAULT_TOKENS, seq_len: int = 512, corpus: str | None = None,
                    progress: bool = True) -> dict[str, tuple[torch.Tensor, int]]:
    """`collect_hessians` for `fqns`, served from the on-disk cache of all the model's linear layers
    (collected and saved on first use) when they fit `CACHE_MAX_BYTES`."""
    from workbench.models import cache_dir
    from workbench.sparsity.calibration import model_fingerprint
    everything = [fqn for fqn, m, _ in linear_modules(engine.model)]
    size = sum(4 * m.in_features ** 2 for _, m, _ in linear_modules(engine.model))  # before sharing: an upper bound
    if size > CACHE_MAX_BYTES:
        return collect_hessians(engine, fqns, tokens, seq_len, corpus, progress)
    text, source = load_text(corpus, "calibration")
    fingerprint = model_fingerprint(engine.model)
    meta = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "fingerprint": fingerprint, "corpus": source,
            "corpus_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "tokens": str(tokens), "seq_len": str(seq_len), "torch": torch.__version__,
            "python": platform.python_version()}
    path = cache_dir() / "hessians" / f"{fingerprint}-{tokens}-{seq_len}-{_short_hash(text)}.safetensors"
    found = load_hessians(path, fingerprint) if path.is_file() else {}
    if not all(f in found for f in fqns):
        found = collect_hessians(engine, everything, tokens, seq_len, corpus, progress, check=False)
        save_hessians(path, found, meta)
        log.info("calibration Hessians cached at %s", path)
    modules = dict((fqn, m) for fqn, m, _ in linear_modules(engine.model))
    for fqn in fqns:
        if fqn not in found:
            raise PolicyError(f"no linear layer named {fqn!r} to calibrate")
        _check_tokens(fqn, found[fqn][1], modules[fqn].in_features)
    return {f: found[f] for f in fqns}


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def save_hessians(path: Path, hessians: dict[str, tuple[torch.Tensor, int]], meta: dict) -> Path:
    """One file: each distinct matrix once (shared inputs: q/k/v, gate/up), the readers and token counts
    in the metadata."""
    tensors, readers, seen = {}, {}, {}
    for fqn, (h, count) in hessians.items():
        owner = seen.setdefault(id(h), fqn)
        if owner == fqn:
            tensors[fqn] = h.contiguous()
        readers[fqn] = [owner, count]
    return save_artifact(path, tensors, {**meta, "readers": json.dumps(readers)})


def load_hessians(path: Path, fingerprint: str) -> dict[str, tuple[torch.Tensor, int]]:
    """The matrices of a cache file, refused in one line when it is not ours or was made for another model."""
    meta, tensors = load_artifact(path, "calibration Hessians", ARTIFACT_FORMAT, ARTIFACT_VERSION)
    if meta.get("fingerprint") != fingerprint:
        raise PolicyError(f"calibration Hessians {path} were made for another model (fingerprint "
                          f"{meta.get('fingerprint')}, this model is {fingerprint})")
    return {fqn: (tensors[owner], int(count)) for fqn, (owner, count) in json.loads(meta["readers"]).items()}
