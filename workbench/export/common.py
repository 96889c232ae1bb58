"""What every export shares: the target check, the settings no serving format carries, writing under a
temporary name, the report's byte table, and scoring a reader's model against the engine."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from workbench.errors import InputError


def check_target(out: Path, force: bool, folder: bool = False) -> None:
    """One line for a target that must not be written: it exists (without `force`), or its folder is
    missing or not writable. A folder export replaces with `force` only a folder that holds an export
    (a config.json and safetensors, nothing nested): never a folder of other things."""
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} exists: pass --force to replace it")
    if out.exists() and folder and out.is_dir() and not looks_like_export(out):
        raise InputError(f"{out} is a folder that does not hold an export: not replaced, even with --force")
    if not out.parent.exists():
        raise InputError(f"{out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"{out.parent} is not writable")


def looks_like_export(folder: Path) -> bool:
    entries = list(folder.iterdir())
    return (folder / "config.json").is_file() and any(e.suffix == ".safetensors" for e in entries) \
        and not any(e.is_dir() for e in entries)


@contextmanager
def staged(out: Path, folder: bool = False):
    """Yield a temporary path beside `out` (a file, or a folder with `folder`); on success it replaces
    `out` in one rename, on any error it is removed: an export is there whole or not at all."""
    out = Path(out)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".partial", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=out.name + ".", suffix=".partial", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if folder and out.exists():  # --force: a folder cannot be replaced by os.replace while it has files
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def runtime_only_settings(policy) -> list[str]:
    """The settings of `policy` that GGUF and compressed-tensors cannot carry (activation sparsity,
    attention selectors), as sentences."""
    out = []
    for setting in [policy.default] + [r.setting for r in policy.rules]:
        sp, att = setting.sparsity, setting.attention
        if not sp.is_identity:
            out.append(f"activation sparsity ({sp.rule}, {sp.target:g} of the inputs)")
        if not att.is_identity:
            out.append(f"attention selector {att.selector}" + (f" (budget {att.budget})" if att.budget else ""))
    return sorted(set(out))


def refuse_runtime_only(policy, weights_only: bool, fmt: str) -> list[str]:
    """The runtime-only settings, after refusing them unless `weights_only` (they then go to a sidecar)."""
    runtime = runtime_only_settings(policy)
    if runtime and not weights_only:
        raise InputError(f"{fmt} has no place for {'; '.join(runtime)}: export with --weights-only to write "
                         "the weights and put these settings in a sidecar JSON")
    return runtime


def by_type(rows: list[dict]) -> dict:
    """Tensors and bytes per stored type."""
    out: dict = {}
    for r in rows:
        slot = out.setdefault(r["type"], {"tensors": 0, "bytes": 0})
        slot["tensors"] += 1
        slot["bytes"] += r["bytes"]
    return out


def score_reader(engine, model, reader: str, max_tokens: int = 512, seq_len: int = 256) -> dict:
    """Next-token distributions of `model` (the exported weights as another reader loaded them) on held-out
    text, against the engine's policy model and against the unmodified model: KLD and top-1 agreement."""
    from workbench.corpus import load_text, token_windows
    from workbench.evaluate import compare_logits
    model.eval()
    text, _ = load_text(None, "heldout")
    windows = token_windows(engine.tokenizer, text, min(seq_len, engine.max_positions), max_tokens)
    parts: dict[str, list[torch.Tensor]] = {}
    largest = 0.0  # the largest logit difference from the policy model: 0 when the export is exact
    with torch.inference_mode():
        for window in windows:
            ids = window[None]
            exported = model(ids).logits[0, :-1].float()
            policy = engine.forward(ids.to(engine.device))[0, :-1].float().cpu()
            reference = engine.reference_logits(ids.to(engine.device))[0, :-1].float().cpu()
            largest = max(largest, (exported - policy).abs().max().item())
            for against, logits in (("policy", policy), ("reference", reference)):
                for key, value in compare_logits(logits, exported, ids[0, 1:]).items():
                    parts.setdefault(f"{against}_{key}", []).append(value)
    m = {k: torch.cat(v).double() for k, v in parts.items()}
    return {"reader": reader, "tokens": int(m["policy_kld"].numel()),
            "vs_policy": {"kld_mean": m["policy_kld"].mean().item(), "top1": m["policy_same_top1"].mean().item(),
                          "max_abs_logit_diff": largest},
            "vs_reference": {"kld_mean": m["reference_kld"].mean().item(),
                             "top1": m["reference_same_top1"].mean().item()}}


def format_report(report: dict) -> str:
    """An export report as a short table: bytes by stored type, what was re-quantized, the read-back check."""
    lines = [f"{report['path']}: {report['bytes'] / 2**20:.1f} MiB, {report['architecture']}, policy {report['policy']}",
             f"{'type':>12} {'tensors':>8} {'MiB':>9}"]
    for typ, slot in sorted(report["by_type"].items()):
        lines.append(f"{typ:>12} {slot['tensors']:>8} {slot['bytes'] / 2**20:9.2f}")
    if report["requantized"]:
        lines.append(f"re-quantized (no exact {report['format']} type): {len(report['requantized'])} tensor(s), e.g. "
                     + ", ".join(report["requantized"][:3]))
    for note in report.get("notes", []):
        lines.append(note)
    check = report.get("check")
    if check:
        lines.append(f"read back by {check['reader']} on {check['tokens']} held-out tokens: "
                     f"KLD {check['vs_policy']['kld_mean']:.2e} / top-1 {check['vs_policy']['top1']:.3f} against "
                     f"the policy model, KLD {check['vs_reference']['kld_mean']:.4f} / top-1 "
                     f"{check['vs_reference']['top1']:.3f} against the unmodified model")
    if report.get("sidecar"):
        lines.append(f"runtime-only settings: {report['sidecar']}")
    return "\n".join(lines)


def write_sidecar(out: Path, policy, runtime: list[str]) -> str:
    """The runtime-only settings beside the export (`PATH.runtime.json`)."""
    import json
    sidecar = Path(str(out) + ".runtime.json")
    sidecar.write_text(json.dumps({"policy": policy.name, "runtime_only": runtime}, indent=1) + "\n")
    return str(sidecar)
