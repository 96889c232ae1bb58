"""`workbench bench`: decode speed and memory for a matrix of policies, in one run, on one model.

For each policy and batch size: prefill random prompts, then time the engine's decode loop (the same
code `Engine.generate` runs: CUDA-graph step on GPU, token selection and stop checks on the host) and
report the median milliseconds per decode step, tokens per second and peak memory. In the same run:
transformers' eager `generate` on the same model (dense), and the measured copy bandwidth, which turns
the bytes a token must read into a roofline (the fastest a memory-bound decode can be).

Policy names are `Policy.parse`'s shorthand: ``dense``, a weight format (``int8``, ``int4-g64``, ...; it
covers the output head too), ``topkNN`` (NN% activation sparsity, exact per token), ``thresholdNN``
(TEAL's calibrated cut), and ``+`` to combine (``topk50+int8``).

With ``contexts`` (``--context 8k,32k``) every policy and batch is timed at each context: the prompt is that
long (prefilled in chunks), so each step attends over it; a context beyond the model's maximum is refused
before anything is timed. Attention selectors (``topk:2048``, ``indexer:2048``) are policies like the others.

With ``profile=True`` (``--profile``) each row also holds `workbench.profiling.profile_step`'s table: the
kernels of one decode step, grouped by layer role, with their time, the bytes they must read, the
bandwidth they reach, and the gaps between them.
"""
from __future__ import annotations

import gc
import logging
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from workbench.engine import Engine
from workbench.environment import environment
from workbench.errors import InputError
from workbench.policy import Policy
from workbench.profiling import expert_read_bytes, format_profile, kv_read_bytes, linear_read_bytes, profile_step
from workbench.roles import linear_modules
from workbench.runtime.cache import cache_capacity
from workbench.runtime.decoder import unsupported_reason
from workbench.runtime.sampling import SamplingParams, Sequence
from workbench.transforms import wrappers

log = logging.getLogger(__name__)

DEFAULT_POLICIES = ("dense", "int8", "int4-g64", "topk25", "topk40", "topk50", "topk50+int8")
PDL_MODES = {"on": (True,), "off": (False,), "both": (True, False)}


@dataclass
class Row:
    policy: str
    batch: int
    ms_per_step: float
    tokens_per_s: float
    weight_bytes: int
    peak_bytes: int | None
    roofline_ms: float | None = None  # bytes one step must read / measured bandwidth
    kernels: dict = field(default_factory=dict)  # kernel name -> number of layers it serves
    achieved_sparsity: float | None = None
    graph_ms: float | None = None  # the captured step alone, without the host's token handling
    profile: dict | None = None  # profiling.profile_step's table, with --profile
    pdl: bool = True  # kernels launched with programmatic dependent launch (`workbench.kernels.pdl`)
    resident_bytes: int | None = None  # device memory held after the row (the peak adds the tuner's copies)
    context: int | None = None  # the prompt's tokens, which every decode step attends over


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s (reads + writes), the denominator of the roofline."""
    if device.type != "cuda":
        nbytes = 1 << 27
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process high-water mark (Linux: KiB)


def step_bytes(engine, batch: int, context: int) -> int:
    """Bytes one decode step must read at least: every linear layer's weight as the policy stores it,
    less the columns a sparsified layer skips (batch 1 only: a batch reads the union of its tokens'
    columns), the routed experts its tokens reach, plus the KV cache it attends over. The embedding table
    is not read (one row per token)."""
    weights = sum(linear_read_bytes(m, batch) for _, m, _ in linear_modules(engine.model))
    return weights + expert_read_bytes(engine.model, batch) + kv_read_bytes(engine.model, batch, context)


def time_decode(engine, batch: int, prompt_tokens: int, new_tokens: int, seed: int = 0) -> list[float]:
    """Milliseconds of each decode step (after prefill) through the engine's batch runner, the loop
    `Engine.generate` runs (CUDA-graph step on GPU, greedy tokens fed back on the device)."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    seqs = [Sequence(torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist(), params) for _ in range(batch)]
    runner = engine.runner(batch, cache_capacity(prompt_tokens + new_tokens))
    device = engine.device
    stamps = []
    with engine.exclusive(), torch.inference_mode():  # the loop yields once after the prefills, then every step
        for _ in runner.run(seqs):
            _sync(device)
            stamps.append(time.perf_counter())
    times = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return times[1:] if len(times) > 2 else times  # the first step after the prefills is not steady state


def time_graph(engine, batch: int, capacity: int, reps: int = 20) -> float | None:
    """Milliseconds of one replay of the captured decode step alone (no host work): the GPU's share."""
    runner = engine.runner(batch, capacity)
    with engine.exclusive(), torch.inference_mode():
        # distinct tokens: a batch of one token repeated has one token's sparsity union, a faster step than real
        ids = torch.randint(0, engine.model.config.vocab_size, (batch,), generator=torch.Generator().manual_seed(2))
        ids = ids.to(engine.device)
        runner.raw_step(ids)
        if runner.graph is None:
            return None
        _sync(engine.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            runner.raw_step(ids)
        _sync(engine.device)
    return (time.perf_counter() - t0) / reps * 1e3


def time_transformers(engine, prompt_tokens: int, new_tokens: int) -> float:
    """transformers' eager `generate` (dense, batch 1): ms per decode step, prefill subtracted."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, engine.model.config.vocab_size, (1, prompt_tokens), generator=g).to(engine.device)
    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=None)

    def run(n):
        _sync(engine.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kwargs)
        _sync(engine.device)
        return time.perf_counter() - t0

    run(2)  # warm up
    # eager generate is bound by the host's Python; the median of three damps its jitter
    return statistics.median((run(new_tokens + 1) - run(1)) / new_tokens * 1e3 for _ in range(3))


def kernel_census(engine) -> dict:
    """How many layers each kernel description serves (its candidate paths and the tuner's pick at each
    batch size run so far); joined q|k|v and gate|up kernels of the fused step count as `joined ...`."""
    if engine.device.type != "cuda":
        return {}
    from workbench.kernels.dispatch import describe
    out: dict[str, int] = {}
    for _, w in wrappers(engine.model):
        name = f"{w.role or 'linear'}: {describe(w)}"
        out[name] = out.get(name, 0) + 1
    for module in engine.model.modules():
        joint = getattr(module, "workbench_joint", None)
        if joint is not None:
            name = "|".join(layer.role or "linear" for layer in joint[1].layers) + " joined: " + joint[1].describe()
            out[name] = out.get(name, 0) + 1
    return out


def parse_contexts(text: str) -> tuple[int, ...]:
    """``8k,32k,131072`` -> (8192, 32768, 131072): k is 1024.

    >>> parse_contexts("8k, 512")
    (8192, 512)
    """
    out = []
    for part in (p.strip().lower() for p in text.split(",")):
        try:
            n = int(part[:-1]) * 1024 if part.endswith("k") else int(part)
        except ValueError:
            raise InputError(f"--context takes comma-separated token counts like 8k,32k,128k, got {part!r}") from None
        if n < 1:
            raise InputError(f"a context must be at least one token, got {part!r}")
        out.append(n)
    return tuple(out)


def run_bench(model: str, policies=DEFAULT_POLICIES, batches=(1, 8), prompt_tokens: int = 128,
              new_tokens: int = 64, transformers_baseline: bool = True, device: str | None = None,
              progress=None, profile: bool = False, pdl: str = "on", contexts: tuple[int, ...] | None = None) -> dict:
    """The whole matrix; returns a JSON-able dict (rows, baseline, roofline, environment); with `profile`,
    each row's decode step kernel by kernel (`row["profile"]`). `pdl`: "on" (the default launch), "off",
    or "both" (every row twice, with and without programmatic dependent launch, side by side). `contexts`:
    time every row at each of these prompt lengths instead of `prompt_tokens`."""
    parsed = [(name, Policy.parse(name)) for name in policies]  # bad names fail before the load
    if any(b < 1 for b in batches):
        raise InputError("batch sizes must be positive")
    contexts = tuple(contexts or (prompt_tokens,))
    if pdl not in PDL_MODES:
        raise InputError(f"--pdl takes one of {', '.join(PDL_MODES)}, got {pdl!r}")
    if min(contexts) < 1 or new_tokens < 3:
        raise InputError("bench needs --prompt-tokens >= 1 and --new-tokens >= 3")
    engine = Engine.from_pretrained(model, device=device)
    if engine.decode_path != "workbench":
        raise InputError(f"bench times the engine's decode loop, which does not cover this model: "
                         f"{unsupported_reason(engine.model)}")
    limit = getattr(engine.model.config, "max_position_embeddings", None)
    if limit and max(contexts) + new_tokens > limit:
        raise InputError(f"a context of {max(contexts)} tokens + {new_tokens} new ones exceeds {model}'s maximum of "
                         f"{limit} positions" + ("; synthetic:llama-3.1-8b has the same shapes and 128k positions"
                                                 if model == "synthetic:llama-3-8b" else ""))
    dev = engine.device
    bandwidth = copy_bandwidth(dev)
    say = progress or (lambda msg: None)
    say(f"{model} on {dev}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    result = {"model": model, "prompt_tokens": contexts[0], "contexts": list(contexts), "new_tokens": new_tokens,
              "environment": environment(dev, bandwidth), "rows": [], "transformers_eager_ms": None,
              "pdl": pdl if dev.type == "cuda" else "n/a"}
    if transformers_baseline:
        engine.use_decode_loop = False
        result["transformers_eager_ms"] = time_transformers(engine, prompt_tokens, min(new_tokens, 32))
        engine.use_decode_loop = True
        say(f"transformers eager generate: {result['transformers_eager_ms']:.2f} ms/token")
    modes = PDL_MODES[pdl] if dev.type == "cuda" else (False,)  # nothing to launch either way on a CPU
    for name, policy, launch in [(n, p, on) for n, p in parsed for on in modes]:
        os.environ["WORKBENCH_PDL"] = "1" if launch else "0"  # read at each launch; the graph is recaptured
        engine.reconfigure(policy)
        for prompt_tokens, batch in [(c, b) for c in contexts for b in batches]:
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            engine.reset_stats()
            times = time_decode(engine, batch, prompt_tokens, new_tokens)
            ms = statistics.median(times)
            stats = engine.stats()  # before the graph-only timing adds steps of token 0
            graph_ms = time_graph(engine, batch, cache_capacity(prompt_tokens + new_tokens))
            sparsity = (stats["achieved_sparsity"] or {}).get("overall")
            context = prompt_tokens + new_tokens // 2
            row = Row(name, batch, ms, batch * 1e3 / ms, stats["weight_bytes"], _peak_bytes(dev),
                      step_bytes(engine, batch, context) / bandwidth * 1e3, kernel_census(engine), sparsity, graph_ms,
                      pdl=launch, resident_bytes=torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None,
                      context=prompt_tokens)
            if profile:
                row.profile = _profile(engine, batch, cache_capacity(prompt_tokens + new_tokens), context, bandwidth)
            result["rows"].append(asdict(row))
            at = f" context {prompt_tokens}" if len(contexts) > 1 else ""
            say(f"{_label(result, asdict(row)):>14} batch {batch}{at}: {ms:7.2f} ms/step  "
                f"{row.tokens_per_s:8.1f} tok/s  "
                f"roofline {row.roofline_ms:6.2f} ms" + (f"  graph {graph_ms:6.2f} ms" if graph_ms else "")
                + (f"  kernels {row.profile['kernel_us'] / 1e3:6.2f} ms + gaps {row.profile['gaps_us'] / 1e3:5.2f} ms"
                   if row.profile and "error" not in row.profile else ""))
            fallback = sum(n for name, n in row.kernels.items() if name.endswith(": reference"))
            if fallback:  # said once per policy: these layers decode through the exact reference path
                say(f"{name:>14} batch {batch}: {fallback} layer(s) have no GPU kernel and keep the reference path")
        engine.invalidate()  # frees the runner's cache before the next policy
    os.environ.pop("WORKBENCH_PDL", None)
    _summarise(result)
    return result


def _profile(engine, batch: int, capacity: int, context: int, bandwidth: float) -> dict:
    """The row's profile; a profiler failure (CUPTI, a driver) is recorded in the row, not fatal to the
    timings already measured."""
    try:
        return profile_step(engine, engine.runner(batch, capacity), batch, context, bandwidth=bandwidth)
    except Exception as e:  # reported in the row and logged with its traceback, not hidden
        log.exception("profiling batch %d failed", batch)
        return {"error": f"{type(e).__name__}: {e}"}


def _summarise(result: dict) -> None:
    """Speed-ups against dense at the same batch, and dense against the roofline and transformers."""
    rows = result["rows"]
    dense = {(r["batch"], r["pdl"], r.get("context")): r["ms_per_step"] for r in rows if r["policy"] == "dense"}
    plain = {(r["policy"], r["batch"], r.get("context")): r["ms_per_step"] for r in rows if not r["pdl"]}
    for r in rows:
        at = r.get("context")
        if (r["batch"], r["pdl"], at) in dense:  # against dense launched the same way, at the same context
            r["speedup_vs_dense"] = dense[r["batch"], r["pdl"], at] / r["ms_per_step"]
        if r["pdl"] and (r["policy"], r["batch"], at) in plain:
            r["pdl_speedup"] = plain[r["policy"], r["batch"], at] / r["ms_per_step"]
        r["fraction_of_roofline"] = r["roofline_ms"] / r["ms_per_step"] if r["roofline_ms"] else None
    first = next((r for r in rows if r["policy"] == "dense" and r["batch"] == 1
                  and r.get("context") == result["prompt_tokens"]), None)
    if result["transformers_eager_ms"] and first:
        result["dense_speedup_vs_transformers"] = result["transformers_eager_ms"] / first["ms_per_step"]


def format_table(result: dict) -> str:
    env = result["environment"]
    contexts = result.get("contexts") or [result["prompt_tokens"]]
    prompt = "contexts " + ", ".join(map(str, contexts)) if len(contexts) > 1 else f"prompt {contexts[0]}"
    head = (f"{result['model']} on {env.get('gpu') or env.get('cpu')} (torch {env['torch']}), {prompt} + "
            f"{result['new_tokens']} new tokens, copy bandwidth {env['copy_bandwidth_gb_s']:.0f} GB/s")
    ctx = len(contexts) > 1
    columns = (f"{'policy':>14} {'batch':>5}" + (f" {'context':>7}" if ctx else "") + f" {'ms/step':>8} {'tok/s':>9} "
               f"{'vs dense':>8} {'roofline':>8} {'of bound':>8} {'weights':>9} {'peak':>9} {'resident':>9} "
               f"{'sparsity':>8}")
    lines = [head, "", columns]
    for r in result["rows"]:
        sparsity = "" if r["achieved_sparsity"] is None else f"{r['achieved_sparsity']:.2f}"
        lines.append(f"{_label(result, r):>14} {r['batch']:>5}" + (f" {r.get('context') or '':>7}" if ctx else "")
                     + f" {r['ms_per_step']:8.2f} {r['tokens_per_s']:9.1f} "
                     f"{r.get('speedup_vs_dense', float('nan')):7.2f}x {r['roofline_ms']:8.2f} "
                     f"{100 * (r['fraction_of_roofline'] or 0):7.0f}% {_size(r['weight_bytes']):>9} "
                     f"{_size(r['peak_bytes'] or 0):>9} {_size(r.get('resident_bytes') or 0):>9} "
                     f"{sparsity:>8}")
    if result["transformers_eager_ms"]:
        lines.append(f"\ntransformers eager generate (dense, batch 1): {result['transformers_eager_ms']:.2f} ms/token"
                     + (f"; the engine's dense decode is {result['dense_speedup_vs_transformers']:.1f}x faster"
                        if result.get("dense_speedup_vs_transformers") else ""))
    for r in result["rows"]:
        if r.get("profile"):
            lines += ["", format_profile(r["profile"], f"{_label(result, r)}, batch {r['batch']}")]
    return "\n".join(lines)


def _label(result: dict, row: dict) -> str:
    """The policy, marked ' -pdl' where its kernels were launched plainly on a GPU (`--pdl off|both`)."""
    return row["policy"] + (" -pdl" if result.get("pdl") in ("off", "both") and not row.get("pdl", True) else "")


def _size(n: int) -> str:
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n}B"
