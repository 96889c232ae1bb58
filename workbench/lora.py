"""LoRA on the engine's model, plain or under any policy, through peft.

    handle = attach_lora(engine, r=16, alpha=32, targets=("q", "v"), dropout=0.1)
    ...train...
    report = merge(engine)      # folds the adapters into the weights, format by format
    unload(engine)              # or drop them

A layer a policy has wrapped (sparse input, packed weights) gets our own LoRA layer, registered with
peft: peft's plain LoRA layer would add the update to `weight.data`, which for packed weights is not the
weight. Ours merges by dequantize, add, requantize (`WorkbenchLinear.merge_delta`) and reports what the
requantization cost. Both branches read the input after the layer's sparsity rule, so training sees the
compressed model it is meant to repair, and the merged layer computes what the adapter layer did (up to
the requantization). While adapters are attached, layers take the reference path (no Triton kernels);
merge to get the kernels back.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.errors import InputError
from workbench.layers import WorkbenchLinear
from workbench.progress import progress as progress_bar
from workbench.roles import linear_modules
from workbench.sparsity.calibration import model_fingerprint
from workbench.tokens import encode_text, render_chat


def _lora_linear():
    from peft.tuners.lora.layer import Linear

    class WorkbenchLoraLinear(Linear):
        """peft's LoRA layer over a WorkbenchLinear: the adapter reads the input after the layer's sparsity
        rule (what the weight multiplies), and merges through the layer's format."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            base = self.get_base_layer()
            if self.disable_adapters or self.merged or base.bypass:
                return super().forward(x, *args, **kwargs)
            y, xs = base.forward_and_input(x)  # the reference path: training needs its gradients
            for name in self.active_adapters:
                if name in self.lora_A:
                    a, b = self.lora_A[name], self.lora_B[name]
                    y = y + b(a(self.lora_dropout[name](xs.to(a.weight.dtype)))).to(y.dtype) * self.scaling[name]
            return y

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge
            for name in check_adapters_to_merge(self, adapter_names):
                if name in self.lora_A:
                    delta = self.get_delta_weight(name)
                    self.merge_reports[name] = self.get_base_layer().merge_delta(delta)
                    self.merged_adapters.append(name)

        def unmerge(self) -> None:
            while self.merged_adapters:  # exact for plain weights; within one requantization for packed ones
                name = self.merged_adapters.pop()
                self.get_base_layer().merge_delta(-self.get_delta_weight(name))

    return WorkbenchLoraLinear


@dataclass
class LoraHandle:
    """What `attach_lora` did: the targeted modules, the settings, and the trainable parameter count."""

    targets: list[str]
    r: int
    alpha: float
    dropout: float
    trainable: int
    merged: dict = field(default_factory=dict)


def _resolve_targets(model: nn.Module, targets) -> list[str]:
    wanted = None if targets == "all-linear" else set([targets] if isinstance(targets, str) else targets)
    if wanted is not None and not wanted:
        raise InputError("targets must name at least one role (q, k, v, o, gate, up, down, ...) or be 'all-linear'")
    names = [fqn for fqn, _, role in linear_modules(model)
             if role not in (None, "lm_head") and (wanted is None or role in wanted or fqn in wanted)]
    if not names:
        roles = sorted({r for _, _, r in linear_modules(model) if r})
        raise InputError(f"LoRA targets {sorted(wanted)} match no module; roles in this model: {', '.join(roles)}")
    return names


def attach_lora(engine, r: int = 16, alpha: float = 32, targets=("q", "v"), dropout: float = 0.0) -> LoraHandle:
    """Add LoRA adapters to the engine's model (plain layers and policy wrappers alike); only they train."""
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InputError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0 or not 0 <= dropout < 1:
        raise InputError(f"LoRA needs alpha > 0 and dropout in [0, 1), got alpha={alpha}, dropout={dropout}")
    if getattr(engine.model, "workbench_lora", None) is not None:
        raise InputError("this engine already has LoRA adapters; merge or unload them first")
    model = engine.model
    names = _resolve_targets(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    config._register_custom_module({WorkbenchLinear: _lora_linear()})
    with engine.exclusive():
        engine.invalidate()  # captured decode graphs hold the modules being replaced
        for p in model.parameters():
            p.requires_grad_(False)
        with warnings.catch_warnings():  # peft warns about any custom layer type; ours is registered above
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            inject_adapter_in_model(config, model)
        for m in model.modules():
            if hasattr(m, "lora_A"):
                m.merge_reports = {}
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)
    handle = LoraHandle(names, r, float(alpha), float(dropout), trainable)
    model.workbench_lora = handle
    return handle


def lora_layers(model: nn.Module):
    from peft.tuners.lora.layer import LoraLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def merge(engine) -> dict:
    """Fold every adapter into its layer's weights (each format: dequantize, add, requantize) and remove
    the adapter layers. Returns the requantization error per layer whose merge was not exact (SQNR dB,
    max abs error); a float32 layer takes the update exactly and is left out."""
    report = {}
    with engine.exclusive():
        engine.invalidate()
        for name, layer in lora_layers(engine.model):
            layer.merge()
            for adapter, r in getattr(layer, "merge_reports", {}).items():
                if r and r.get("max_abs_error", 0.0) > 0.0:
                    report[name] = r
        _remove_adapters(engine.model)
        if engine.store_cache is not None:  # packed weights were rebuilt from new values
            engine.store_cache.clear()
    return report


def unload(engine) -> None:
    """Remove the adapters without merging: the model is as it was before `attach_lora`."""
    with engine.exclusive():
        engine.invalidate()
        _remove_adapters(engine.model)


def _remove_adapters(model: nn.Module) -> None:
    for name, layer in lora_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if hasattr(model, "workbench_lora"):
        del model.workbench_lora


# ---- data ------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # -100 where no loss is taken (prompt and template tokens of chat data)


def load_examples(engine, data, max_len: int = 256) -> list[Example]:
    """Texts, chat conversations ([{"role", "content"}, ...]) or a JSONL file whose lines hold "text" or
    "messages". Plain text trains on every token; a conversation on its assistant turns only."""
    if isinstance(data, (str, Path)) and str(data).endswith(".jsonl"):
        data = read_jsonl(data)
    if isinstance(data, str) or not isinstance(data, (list, tuple)) or not data:
        raise InputError("the dataset is empty: give a list of texts, a list of conversations, or a JSONL file")
    examples = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            if not item.strip():
                raise InputError(f"example {i} is an empty text")
            ids = encode_text(engine.tokenizer, item)[:max_len]  # BOS first where the model uses one
            examples.append(Example(ids, list(ids)))
        elif isinstance(item, (list, tuple)) and item and all(isinstance(m, dict) and "role" in m and "content" in m
                                                              for m in item):
            examples.append(_chat_example(engine.tokenizer, list(item), max_len, i))
        else:
            raise InputError(f"example {i} is neither a text nor a list of {{'role', 'content'}} messages")
    if all(len(e.ids) < 2 for e in examples):
        raise InputError("every example is shorter than two tokens: nothing to learn from")
    return examples


def read_jsonl(path) -> list:
    """The examples of a JSONL file: each line an object with "text" (a string) or "messages" (a chat)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not ({"text", "messages"} & set(obj)):
            raise InputError(f"{path}:{n}: each line needs a \"text\" or a \"messages\" field")
        rows.append(obj.get("messages", obj.get("text")))
    if not rows:
        raise InputError(f"the dataset {path} is empty")
    return rows


def _chat_example(tokenizer, messages: list[dict], max_len: int, index: int) -> Example:
    """Tokens of the rendered conversation; labels only on each assistant message (its span is the
    difference between the conversation rendered up to it, with and without it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"example {index} is a conversation, but this model has no chat template")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"example {index} has no assistant message to learn")
    render = lambda msgs, gen: render_chat(tokenizer, msgs, gen)  # the template writes BOS itself
    ids = tokenizer(render(messages, False), add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer(render(messages[:k], True), add_special_tokens=False)["input_ids"])
        end = len(tokenizer(render(messages[:k + 1], False), add_special_tokens=False)["input_ids"])
        labels[start:end] = ids[start:end]
    return Example(ids[:max_len], labels[:max_len])


def _batches(examples: list[Example], batch: int, pad_id: int, generator: torch.Generator):
    """Shuffled padded batches: right padding, attention mask 0 and label -100 on the pads."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    for i in range(0, len(order), batch):
        chunk = [examples[j] for j in order[i:i + batch]]
        width = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            n = len(e.ids)
            ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(e.ids), torch.tensor(e.labels), 1
        yield ids, labels, mask


# ---- training --------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    losses: list[float]
    steps: int
    tokens: int
    seconds: float
    stopped: bool  # True when `stop` was set: the adapter holds the last completed step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train(engine, data, steps: int | None = None, epochs: int | None = None, lr: float = 2e-4, batch: int = 4,
          grad_accum: int = 1, max_len: int = 256, loss: str = "lm", warmup: float = 0.05, callback=None,
          stop=None, seed: int = 0, progress: bool = True) -> TrainResult:
    """Train the attached adapters. `loss="lm"`: next-token cross-entropy on the labelled tokens;
    `loss="kl"`: KL divergence from the unmodified model (the adapters learn to undo what the policy
    changed). The learning rate warms up linearly over the first `warmup` share of the steps, then decays
    linearly to zero (as transformers' Trainer does by default). `callback(step, loss)` after every
    optimizer step; `stop` (a threading.Event) ends the run between steps, keeping the last good adapter."""

    handle = getattr(engine.model, "workbench_lora", None)
    if handle is None:
        raise InputError("attach adapters first: workbench.lora.attach_lora(engine, ...)")
    if loss not in ("lm", "kl"):
        raise InputError(f"loss must be 'lm' or 'kl', got {loss!r}")
    if (steps is None) == (epochs is None) or (steps is not None and steps < 1) or (epochs is not None and epochs < 1):
        raise InputError("give exactly one of steps >= 1 or epochs >= 1")
    if batch < 1 or grad_accum < 1 or not lr > 0 or not 0 <= warmup < 1:
        raise InputError("batch and grad_accum must be positive, lr > 0 and warmup in [0, 1)")
    examples = load_examples(engine, data, max_len)
    params = [p for n, p in engine.model.named_parameters() if "lora_" in n and p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    per_epoch = -(-len(examples) // batch)
    total = steps if steps is not None else -(-epochs * per_epoch // grad_accum)
    ramp = max(1, round(warmup * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: (k + 1) / ramp if k < ramp else max(0.0, (total - k) / max(1, total - ramp)))
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    losses, tokens, done, stopped = [], 0, 0, False
    device = engine.device
    bar = progress_bar(total=total, desc="LoRA", unit="step", enabled=progress)
    t0 = time.perf_counter()

    def batches():
        while True:
            yield from _batches(examples, batch, pad, g)

    stream = batches()
    with engine.exclusive():
        engine.invalidate()
        engine.model.train()
        try:
            while done < total:
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                saved = [p.detach().clone() for p in params]  # the last good adapter, if this step fails
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for _ in range(grad_accum):
                    ids, labels, mask = (t.to(device) for t in next(stream))
                    out = engine.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                    keep = labels[:, 1:] != -100
                    if loss == "lm":
                        value = F.cross_entropy(out[:, :-1][keep], labels[:, 1:][keep])
                    else:
                        with torch.no_grad(), _adapters_off(engine.model), engine.reference():
                            ref = engine.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                        ref_lp = F.log_softmax(ref[:, :-1][keep], -1)
                        value = (ref_lp.exp() * (ref_lp - F.log_softmax(out[:, :-1][keep], -1))).sum(-1).mean()
                    (value / grad_accum).backward()
                    step_loss += value.item() / grad_accum
                    tokens += int(mask.sum())
                if not torch.isfinite(torch.tensor(step_loss)):
                    with torch.no_grad():
                        for p, s in zip(params, saved):
                            p.copy_(s)
                    raise InputError(f"training diverged at step {done + 1} (loss {step_loss}); the adapter keeps "
                                     "the last good step: lower the learning rate")
                optimizer.step()
                schedule.step()
                done += 1
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                if callback is not None:
                    callback(done, step_loss)
        finally:
            engine.model.eval()
            for p in params:
                p.grad = None
            bar.close()
    return TrainResult(losses, done, tokens, time.perf_counter() - t0, stopped)


class _adapters_off:
    """The adapters switched off (the reference is the model without them and without the policy)."""

    def __init__(self, model):
        self.layers = [m for _, m in lora_layers(model)]

    def __enter__(self):
        for m in self.layers:
            m._disable_adapters = True
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m._disable_adapters = False
        return False


# ---- saving and loading ----------------------------------------------------------------------------------------
def save_adapter(engine, folder) -> None:
    """adapter.safetensors + adapter.json (settings, the base model's fingerprint and the policy)."""


    handle = getattr(engine.model, "workbench_lora", None)
    if handle is None:
        raise InputError("this engine has no adapters to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in engine.model.named_parameters() if "lora_" in n}
    save_file(tensors, str(folder / "adapter.safetensors"))
    meta = {"r": handle.r, "alpha": handle.alpha, "dropout": handle.dropout, "targets": handle.targets,
            "base_model": engine.name, "fingerprint": model_fingerprint(engine.model),
            "policy": engine.policy.to_dict()}
    (folder / "adapter.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_adapter(engine, folder) -> LoraHandle:
    """Attach and fill adapters saved by `save_adapter`; refuses another base model or another policy."""


    folder = Path(folder)
    if not (folder / "adapter.json").is_file() or not (folder / "adapter.safetensors").is_file():
        raise InputError(f"{folder} holds no adapter (adapter.json and adapter.safetensors)")
    meta = json.loads((folder / "adapter.json").read_text())
    if meta["fingerprint"] != model_fingerprint(engine.model):
        raise InputError(f"adapter in {folder} was trained on another base model ({meta['base_model']})")
    if meta["policy"] != engine.policy.to_dict():
        raise InputError(f"adapter in {folder} was trained under policy {meta['policy'].get('name')!r}, "
                         f"the engine runs {engine.policy.name!r}: reconfigure first")
    handle = attach_lora(engine, r=meta["r"], alpha=meta["alpha"], targets=meta["targets"], dropout=meta["dropout"])
    state = load_file(str(folder / "adapter.safetensors"))
    params = dict(engine.model.named_parameters())
    missing = set(state) ^ {n for n in params if "lora_" in n}
    if missing:
        unload(engine)
        raise InputError(f"adapter in {folder} does not fit this model: {len(missing)} tensors differ")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    return handle
