"""Where one decode step's time goes: its kernels, grouped by the layer role they serve.

    table = profile_step(engine, engine.runner(8, 256), batch=8, context=136)
    table["groups"]["gate|up"]  # {"kernels": 64, "us": 1902.8, "bytes": 7516192768, "gb_s": 3950, ...}
    table["gaps_us"]            # the step's wall time less its kernels' sum: launch and idle time

The step runs eagerly (a graph replay hides kernel boundaries from the profiler) a few times under
`torch.profiler`. Temporary hooks (removed on exit, as TransformerLens does) open a named range
(`workbench::q|k|v`, ...) around every module that plays a role, and around each sparsity rule's
selection. Each GPU kernel (on CPU: each op's self time) then takes the first group that applies:

1. a selection kernel by its name (top-k, radix select, sort): it runs inside a projection's range;
2. the innermost role range it was launched from;
3. its name: the fused decode step runs some kernels outside any module (`_add_rmsnorm_kernel` ->
   norms, RoPE and decode attention -> attention, `_silu_mul_kernel` -> gate|up);
4. its place in the layer, whose order is norm, q|k|v, attention, o, norm, gate|up, activation, down:
   while unwrapped, the fused step multiplies q|k|v and gate|up as one concatenated matrix outside any
   module, so a matrix multiply after `o` is gate|up and any other is q|k|v; whatever else runs between
   q|k|v and `o` is attention, between gate|up and `down` the MLP's activation;
5. `other`: the embedding lookup, residual adds of the eager path, the logits' cast.

Bytes are what each group must read, bench's roofline split by role: each linear layer's weight as the
policy stores it, less the columns a sparse layer skips at batch 1; the KV cache for attention; the
norms' weights; activations are negligible. The step's wall time (on GPU the graph replay, what decoding
runs) less the kernels' sum is the gaps between kernels. A kernel launched with programmatic dependent
launch starts before its predecessor ends and waits for it: it is charged only from that end on.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import re
import time
from collections import defaultdict, deque

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from workbench.roles import attention_modules, linear_modules

GROUPS = ("q|k|v", "o", "gate|up", "down", "head", "attention", "norms", "selection", "other")
ROLE_GROUP = {"q": "q|k|v", "k": "q|k|v", "v": "q|k|v", "qkv": "q|k|v", "q_a": "q|k|v", "q_b": "q|k|v",
              "kv_a": "q|k|v", "kv_b": "q|k|v", "o": "o", "gate": "gate|up", "up": "gate|up",
              "gate_up": "gate|up", "down": "down", "lm_head": "head", "attention": "attention"}
LINEAR_GROUPS = ("q|k|v", "o", "gate|up", "down", "head")
PREFIX = "workbench::"
STEP = PREFIX + "step"

_SELECTION = re.compile(r"topk|kthvalue|radix|sort", re.I)
_NAMED = ((re.compile(r"rms_?norm", re.I), "norms"),
          (re.compile(r"rope|rotary|sparse_decode|merge_splits|index_scores|attention|sdpa|flash|fmha", re.I),
           "attention"),
          (re.compile(r"silu|swiglu", re.I), "gate|up"))
_MATMUL = re.compile(r"gemm|gemv|nvjet|xmma|cutlass|splitk|tinygemm|int4pack|gemlite|_w[48]_\w*kernel|w4_mma|"
                     r"^aten::(mm|addmm|bmm|matmul|linear)$", re.I)


# ---- bytes each group must read ----------------------------------------------------------------------------
def linear_read_bytes(module: nn.Module, batch: int) -> int:
    """Bytes one decode step reads of this linear layer's weight: as the policy stores it, less the
    columns a sparsified layer skips (batch 1 only: a batch reads the union of its tokens' columns)."""
    if not getattr(module, "is_workbench_linear", False):
        return module.weight.numel() * module.weight.element_size()
    nbytes = module.compute_weight_bytes()
    a = module.achieved_sparsity if module.sparsifier is not None else None
    return nbytes - (int(a * nbytes) if a and batch == 1 else 0)


def kv_read_bytes(model: nn.Module, batch: int, context: int) -> int:
    """Bytes of cache a decode step attends over: `context` positions in each of `batch` slots, per layer
    its keys and values (a sliding-window layer only its window), or for latent attention the latent and
    the rope key per position (and DeepSeek-V3.2's index key)."""
    cfg = model.config
    if getattr(cfg, "kv_lora_rank", None):
        per_position = [cfg.kv_lora_rank + cfg.qk_rope_head_dim + (getattr(cfg, "index_head_dim", None) or 0)]
        positions = [context] * cfg.num_hidden_layers
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_position = [2 * cfg.num_key_value_heads * head_dim]
        kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
        positions = [min(context, cfg.sliding_window) if k == "sliding_attention" else context for k in kinds]
    return per_position[0] * sum(positions) * batch * next(model.parameters()).element_size()


def expert_read_bytes(model: nn.Module, batch: int) -> int:
    """Bytes of routed experts' weights a decode step reads: per MoE layer the experts its `batch` tokens
    go to, expected under even routing (E (1 - (1 - k / E)^batch) of E experts, each top-k)."""
    from workbench.expert_load import routers
    k = getattr(model.config, "num_experts_per_tok", 1)
    total = 0.0
    for i, _, n in routers(model):
        experts = model.model.layers[i].mlp.experts
        nbytes = sum(p.numel() * p.element_size() for p in experts.parameters())
        total += nbytes * (1 - (1 - min(k, n) / n) ** batch)
    return int(total)


def read_bytes(model: nn.Module, batch: int, context: int) -> dict[str, int]:
    """Bytes each group must read in one decode step (see the module docstring); `sum` over the linear
    groups, attention and other is bench's `step_bytes`."""
    out = dict.fromkeys(GROUPS, 0)
    for _, m, role in linear_modules(model):
        out[ROLE_GROUP.get(role, "other")] += linear_read_bytes(m, batch)
    out["attention"] += kv_read_bytes(model, batch, context)
    out["other"] += expert_read_bytes(model, batch)
    out["norms"] = sum(m.weight.numel() * m.weight.element_size() for _, m in model.named_modules()
                       if _is_norm(m) and getattr(m, "weight", None) is not None)
    return out


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


# ---- named ranges around the modules ----------------------------------------------------------------------
@contextlib.contextmanager
def role_ranges(model: nn.Module):
    """Profiler ranges named `workbench::<group>` around every module that plays a role and around each
    sparsity rule's selection, for the duration of the block (hooks removed, sparsifiers restored)."""
    open_ranges: list = []  # ranges nest, so one stack serves every hook
    handles, swapped = [], []

    def attach(module: nn.Module, group: str) -> None:
        def enter(mod, args):
            rf = record_function(PREFIX + group)
            rf.__enter__()
            open_ranges.append(rf)

        def leave(mod, args, output):
            open_ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))

    for _, m, role in linear_modules(model):
        if role in ROLE_GROUP:
            attach(m, ROLE_GROUP[role])
        sp = getattr(m, "sparsifier", None)
        if sp is not None:  # the rule's math runs inside the wrapper's forward: no module to hook
            swapped.append((m, sp))
            m.sparsifier = dataclasses.replace(sp, fn=_ranged(PREFIX + "selection", sp.fn))
    for _, m in attention_modules(model):
        attach(m, "attention")
    for fqn, m in model.named_modules():
        if _is_norm(m):
            attach(m, "norms")
        elif fqn.endswith("rotary_emb"):  # RoPE's cos/sin
            attach(m, "attention")
    try:
        yield
    finally:
        while open_ranges:  # a forward that raised left its range open
            open_ranges.pop().__exit__(None, None, None)
        for h in handles:
            h.remove()
        for m, sp in swapped:
            m.sparsifier = sp


def _ranged(name: str, fn):
    def ranged(x):
        with record_function(name):
            return fn(x)
    return ranged


# ---- the profile ---------------------------------------------------------------------------------------------
def profile_step(engine, runner, batch: int, context: int | None = None, steps: int = 3,
                 bandwidth: float | None = None, top: int = 12) -> dict:
    """One decode step of `runner` (every slot, each attending over `context` positions; `batch` of them
    hold sequences, which sets the bytes a sparse layer skips), kernel by kernel, grouped by role: a
    JSON-able dict (see the module docstring). `bandwidth` (bytes/s, the measured copy bandwidth) adds
    each group's fraction of it. On CPU the step is the profiled eager one, so gaps include the
    profiler's own overhead; `eager_step_us` is the step without it."""
    cache, device = runner.cache, engine.device
    context = max(1, min(context or cache.capacity // 2, cache.capacity))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, engine.model.config.vocab_size, (cache.slots,), generator=g).to(device)
    saved = list(cache.host_lengths)

    def eager():  # the decoder's step itself, never the graph: a replay hides kernel boundaries
        return runner.raw_step(ids, eager=True)

    with engine.exclusive(), torch.inference_mode():
        runner.raw_step(ids)  # builds the decoder (and its graph) for the current modules
        for slot in range(cache.slots):
            cache.set_length(slot, context - 1)  # the new token is the context's last position
        try:
            graph_us = _time_us(lambda: runner.raw_step(ids), device, 20) if runner.graph is not None else None
            eager_us = _time_us(eager, device, 3)
            nbytes = read_bytes(engine.model, batch, context)  # before the profiled steps move the counters
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with role_ranges(engine.model), profile(activities=activities) as prof:
                for _ in range(steps):
                    with record_function(STEP):
                        eager()
                    _sync(device)
            events = prof.events()
        finally:
            for slot, n in enumerate(saved):
                cache.set_length(slot, n)
    launches, step_total_us = _launches(events, device.type == "cuda")
    if device.type == "cuda":
        step_us, source = (graph_us, "graph replay") if graph_us is not None else (eager_us, "eager step")
    else:
        step_us, source = step_total_us / steps, "profiled eager step"
    return _table(launches, steps, step_us, nbytes, bandwidth, top) | {
        "device": device.type, "unit": "GPU kernels" if device.type == "cuda" else "CPU ops (self time)",
        "batch": batch, "context": context, "steps_profiled": steps, "step_source": source,
        "graph_us": None if graph_us is None else round(graph_us, 2), "eager_step_us": round(eager_us, 2)}


def _time_us(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps * 1e6


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _launches(events, cuda: bool) -> tuple[list[tuple[str, str, float, str]], float]:
    """(name, group, us, the rule that decided) of every GPU kernel, or every CPU op inside a profiled
    step, in the order they ran; and the profiled steps' summed wall time on the host."""
    step_us = sum(e.time_range.elapsed_us() for e in events
                  if e.name == STEP and e.device_type == DeviceType.CPU and not e.is_async)
    return _grouped(_gpu_kernels(events) if cuda else _cpu_ops(events)), step_us


def _cpu_ops(events) -> list[tuple]:
    """(name, self us, innermost role range, how it was found) of each op inside a step, in the order
    the ops began."""
    rows = []
    for e in events:
        if e.device_type != DeviceType.CPU or e.is_async or e.name.startswith((PREFIX, "[")):
            continue
        inside, ranged = _enclosing(e)
        if inside:
            rows.append((e.time_range.start, e.name, e.self_cpu_time_total, ranged, "range" if ranged else None))
    return [r[1:] for r in sorted(rows, key=lambda r: r[0])]


def _gpu_kernels(events) -> list[tuple]:
    """(name, us, role range, how it was found) of each GPU kernel, in the order they ran. The range is
    the launching CPU op's (kernels an aten op launched: the profiler links them), else the innermost
    GPU-side span of a range (kernels launched straight from Python, as Triton's are, belong to no op:
    the profiler follows them only through the range they were launched in)."""
    ops, launchers, spans, kernels = {}, [], [], []
    for e in events:
        if e.device_type == DeviceType.CPU:
            if e.kernels and not e.is_async:
                ops[e.id] = e
                launchers.append(e)
        elif e.name.startswith(PREFIX):  # a range's span on the GPU timeline
            if e.name != STEP:
                spans.append((e.time_range.start, e.time_range.end, e.name[len(PREFIX):]))
        elif not getattr(e, "is_user_annotation", False):
            kernels.append(e)
    # Where device events do not name their op (torch before 2.13), each op's kernel list does: kernels
    # of one name and duration ran in the order their ops launched them (one stream), so the n-th such
    # kernel on the GPU is the n-th such launch.
    launched_by: dict[tuple, deque] = defaultdict(deque)
    for e in sorted(launchers, key=lambda e: e.time_range.start):
        for k in e.kernels:
            launched_by[(k.name, k.duration)].append(e)
    spans.sort()
    starts = [s[0] for s in spans]
    rows = []
    # A kernel launched with PDL starts while its predecessor still runs and waits for it in hardware:
    # each kernel is charged from the later of its start and the previous kernel's end (one stream), so the
    # overlap is counted once and the groups add up to the GPU's busy time.
    busy_until = float("-inf")
    for k in sorted(kernels, key=lambda k: k.time_range.start):
        start, end, dur = k.time_range.start, k.time_range.end, k.time_range.elapsed_us()
        us = max(0.0, end - max(start, busy_until))  # time_range is in microseconds
        busy_until = max(busy_until, end)
        op_id = getattr(k, "linked_correlation_id", None)
        queue = launched_by.get((k.name, dur))
        op = ops.get(op_id) if op_id is not None else queue.popleft() if queue else None
        ranged, via = (_enclosing(op)[1] if op is not None else None), "op range"
        if ranged is None:  # spans nest or are disjoint: the innermost holder began last
            i = bisect.bisect_right(starts, start)
            ranged = next((g for s, e, g in reversed(spans[max(0, i - 16):i]) if s <= start and end <= e), None)
            via = "GPU span"
        rows.append((k.name, us, ranged, via if ranged else None))
    return rows


def _enclosing(event) -> tuple[bool, str | None]:
    """(whether `event` lies inside a profiled step, the innermost role range around it, itself included)."""
    ranged, e = None, event
    while e is not None:
        if e.name == STEP:
            return True, ranged
        if ranged is None and e.name.startswith(PREFIX):
            ranged = e.name[len(PREFIX):]
        e = e.cpu_parent
    return False, ranged


def _grouped(rows) -> list[tuple[str, str, float, str]]:
    """Rules 1-5 of the module docstring over (name, us, range, how found) in the order they ran:
    (name, group, us, the rule that decided). `state` is the layer's last linear group (a step ends with
    the head, so the next one starts afresh)."""
    out, state = [], None
    for name, us, ranged, via in rows:
        group, rule = _group_of(name, ranged, state)
        if group in LINEAR_GROUPS:
            state = group
        out.append((name, group, us, via if rule == "range" else rule))
    return out


def _group_of(name: str, ranged: str | None, state: str | None) -> tuple[str, str]:
    """(group, rule): the first of rules 1-5 that applies."""
    if _SELECTION.search(name):
        return "selection", "name"
    if ranged is not None:
        return ranged, "range"
    for pattern, group in _NAMED:
        if pattern.search(name):
            return group, "name"
    if _MATMUL.search(name):
        return ("gate|up" if state == "o" else "q|k|v"), "layer order"
    if state == "q|k|v":
        return "attention", "layer order"
    if state == "gate|up":  # the activation's multiply, on the eager path
        return "gate|up", "layer order"
    return "other", "none"


def _table(launches, steps: int, step_us: float, nbytes: dict, bandwidth, top: int) -> dict:
    groups = {g: {"kernels": 0, "us": 0.0} for g in GROUPS}
    kernels: dict[str, dict] = defaultdict(lambda: {"calls": 0, "us": 0.0, "groups": set()})
    rules: dict[str, int] = defaultdict(int)
    for name, group, us, rule in launches:
        rules[rule] += 1
        groups[group]["kernels"] += 1
        groups[group]["us"] += us
        k = kernels[name]
        k["calls"] += 1
        k["us"] += us
        k["groups"].add(group)
    kernel_us = sum(v["us"] for v in groups.values()) / steps
    out = {}
    for g, v in groups.items():
        us = v["us"] / steps
        gb_s = nbytes[g] / us / 1e3 if us > 0 and nbytes[g] else None
        out[g] = {"kernels": _per_step(v["kernels"], steps), "us": round(us, 2), "bytes": nbytes[g],
                  "gb_s": None if gb_s is None else float(f"{gb_s:.4g}"),
                  "of_bandwidth": None if gb_s is None or not bandwidth else round(gb_s * 1e9 / bandwidth, 3),
                  "share": round(us / step_us, 4) if step_us else None}
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:top]
    return {"step_us": round(step_us, 2), "kernel_us": round(kernel_us, 2), "gaps_us": round(step_us - kernel_us, 2),
            "kernels_per_step": _per_step(sum(v["kernels"] for v in groups.values()), steps),
            "groups": out, "decided_by": {r: _per_step(n, steps) for r, n in sorted(rules.items())},
            "top_kernels": [{"name": name, "calls": _per_step(k["calls"], steps), "us": round(k["us"] / steps, 2),
                             "groups": sorted(k["groups"])} for name, k in ranked]}


def _per_step(count: int, steps: int) -> float | int:
    return count // steps if count % steps == 0 else round(count / steps, 2)


# ---- the printed table ---------------------------------------------------------------------------------------
def format_profile(p: dict, title: str) -> str:
    """A compact per-group table of one profile (the CLI prints one per policy and batch)."""
    if "error" in p:
        return f"{title}: profile failed: {p['error']}"
    source = p["step_source"] + (f"; {p['eager_step_us'] / 1e3:.3f} ms unprofiled" if p["device"] == "cpu"
                                 else f"; eager {p['eager_step_us'] / 1e3:.3f} ms")
    lines = [f"{title}: step {p['step_us'] / 1e3:.3f} ms ({source}) = {p['unit']} {p['kernel_us'] / 1e3:.3f} ms "
             f"({p['kernels_per_step']} per step) + gaps {p['gaps_us'] / 1e3:.3f} ms; context {p['context']}",
             f"  {'group':<10}{'kernels':>8}{'us':>10}{'share':>7}{'MB read':>11}{'GB/s':>8}"]
    for g, v in p["groups"].items():
        if not v["kernels"] and not v["bytes"]:
            continue
        gb_s = "" if v["gb_s"] is None else f"{v['gb_s']:.0f}" if v["gb_s"] >= 10 else f"{v['gb_s']:.2f}"
        share = "" if v["share"] is None else f"{100 * v['share']:.1f}%"
        lines.append(f"  {g:<10}{v['kernels']:>8}{v['us']:>10.1f}{share:>7}{v['bytes'] / 1e6:>11.3f}{gb_s:>8}")
    share = p["gaps_us"] / p["step_us"] if p["step_us"] else 0
    lines.append(f"  {'gaps':<10}{'':>8}{p['gaps_us']:>10.1f}{100 * share:>6.1f}%")
    return "\n".join(lines)
