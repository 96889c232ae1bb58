"""Load generation and serving benchmarks against the scheduler, in process.

A workload is a list of requests with Poisson arrival times (rate per second; `inf`: all at once),
prompt lengths and output lengths drawn from uniform ranges around their means, and prompts cut from
the held-out corpus as token ids (so every mode sees exactly the same tokens). Outputs run to their
length (`ignore_eos`), as serving benchmarks do, so modes do the same work.

Measured per run: request and token throughput, time to first token (p50, p99), time per output token
(TPOT: (e2e - ttft) / (tokens - 1); p50, p99), and goodput: requests per second that met the SLO
(TTFT and TPOT both under their limits). Modes, in one run:

    one-at-a-time     the scheduler with one slot (each request waits for the previous)
    continuous        the scheduler with `max_num_seqs` slots (iteration-level batching)
    elastic           continuous + the elastic controller along its ladder
    transformers      transformers' `generate_batch` (its continuous batching), all requests at once
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import random
import threading
import time
from dataclasses import dataclass

import torch

from workbench.controller import ControllerConfig, ElasticController
from workbench.corpus import corpus_split
from workbench.environment import environment
from workbench.errors import InputError
from workbench.evaluate import evaluate
from workbench.metrics import Metrics
from workbench.policy import Policy
from workbench.runtime.cache import cache_capacity
from workbench.runtime.sampling import SamplingParams
from workbench.scheduler import QueueFull, Scheduler
from workbench.tokens import bos_id


@dataclass(frozen=True)
class WorkItem:
    arrival_s: float
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


def make_workload(tokenizer, n: int, rate: float, prompt_tokens: int = 64, output_tokens: int = 32,
                  spread: float = 0.5, seed: int = 0) -> list[WorkItem]:
    """`n` requests arriving as a Poisson process of `rate` per second (inf: all at time 0); lengths
    uniform in [mean * (1 - spread), mean * (1 + spread)]."""
    if n < 1 or not rate > 0 or prompt_tokens < 1 or output_tokens < 1 or not 0 <= spread < 1:
        raise InputError("a workload needs n >= 1, rate > 0, positive lengths and spread in [0, 1)")
    rng = random.Random(seed)
    corpus = tokenizer(corpus_split("heldout")[:200_000], add_special_tokens=False)["input_ids"]
    lead = [] if bos_id(tokenizer) is None else [bos_id(tokenizer)]  # prompts start as the model expects
    t, items = 0.0, []
    for _ in range(n):
        if math.isfinite(rate):
            t += rng.expovariate(rate)
        p = max(1, round(prompt_tokens * rng.uniform(1 - spread, 1 + spread)))
        o = max(1, round(output_tokens * rng.uniform(1 - spread, 1 + spread)))
        start = rng.randrange(0, len(corpus) - p)
        items.append(WorkItem(t, tuple(lead + corpus[start:start + p - len(lead)]), o))
    return items


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def summarise(results: list[dict], seconds: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    """Throughput, latency percentiles and goodput of finished requests (dicts from Request.result)."""
    ttft = [r["ttft_s"] for r in results]
    tpot = [(r["e2e_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1) for r in results if r["completion_tokens"] > 1]
    good = [r for r in results if r["ttft_s"] <= slo_ttft_s and (
        r["completion_tokens"] <= 1 or (r["e2e_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1) <= slo_tpot_s)]
    tokens = sum(r["completion_tokens"] for r in results)
    policies: dict[str, int] = {}
    for r in results:
        for p in r.get("policies", []):
            policies[p] = policies.get(p, 0) + 1
    return {"requests": len(results), "seconds": round(seconds, 3),
            "requests_per_s": len(results) / seconds, "output_tokens_per_s": tokens / seconds,
            "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
            "tpot_p50_s": _percentile(tpot, 50), "tpot_p99_s": _percentile(tpot, 99),
            "goodput_rps": len(good) / seconds, "slo_met": len(good) / max(1, len(results)),
            "policies": policies}


def run_scheduler(scheduler, workload: list[WorkItem], slo_ttft_s: float, slo_tpot_s: float,
                  on_tick=None) -> dict:
    """Submit each request at its arrival time (a feeder thread), wait for all, summarise.
    A request refused with QueueFull counts as failed (it misses the SLO), never as silently dropped."""
    requests, refused = [], []
    before = (scheduler.busy_s, scheduler.prefill_s, scheduler.decode_s)
    t0 = time.perf_counter()

    def feed():
        for item in workload:
            delay = t0 + item.arrival_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                requests.append(scheduler.submit(list(item.prompt_ids),
                                                 SamplingParams(max_new_tokens=item.max_new_tokens, ignore_eos=True)))
            except QueueFull:
                refused.append(item)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    while feeder.is_alive() or not all(r.done for r in requests):
        if on_tick is not None:
            on_tick()
        time.sleep(0.02)
    feeder.join()
    seconds = time.perf_counter() - t0
    results = [r.result() for r in requests]
    summary = summarise(results, seconds, slo_ttft_s, slo_tpot_s)
    summary["refused"] = len(refused)  # they met no SLO: in no goodput numerator
    busy, prefill, decode = (now - then for now, then in
                             zip((scheduler.busy_s, scheduler.prefill_s, scheduler.decode_s), before))
    # where the wall time went: what limits serving (prefill stalls, decode steps, or host work around them)
    summary["time_s"] = {"prefill": round(prefill, 3), "decode": round(decode, 3),
                         "other_busy": round(busy - prefill - decode, 3), "idle": round(seconds - busy, 3)}
    return summary


def run_transformers(engine, workload: list[WorkItem], slots: int) -> dict:
    """transformers' own continuous batching (`generate_batch`) on the same prompts, all submitted at
    once, at most `slots` requests per batch (as ours): its saturation throughput (it has no arrival
    process). It takes one max_new_tokens for all, so every request runs to the longest output; tokens
    per second counts what it generated. A small untimed call first builds its manager (and CUDA graphs)."""
    from transformers import GenerationConfig  # here: the server's import stays free of it until it runs
    config = GenerationConfig(max_new_tokens=max(w.max_new_tokens for w in workload), do_sample=False,
                              eos_token_id=-1, pad_token_id=engine.tokenizer.pad_token_id or 0)
    kwargs = {"generation_config": config, "progress_bar": False}
    if "continuous_batching_config" in inspect.signature(engine.model.generate_batch).parameters:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        longest = max(len(w.prompt_ids) for w in workload) + config.max_new_tokens
        # A cache sized for the work (its default sizes itself from free memory, which on a CPU is most of RAM).
        # The page size is `page_size` since transformers 5.17's successors, `block_size` before.
        fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        page = "page_size" if "page_size" in fields else "block_size"
        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            **{page: 64}, num_blocks=slots * -(-longest // 64) + 4, max_requests_per_batch=slots)
    prompts = [list(w.prompt_ids) for w in workload]
    # no_grad, not inference_mode: its generation loop runs in a thread of its own and updates its
    # static tensors in place, which inference tensors refuse.
    with engine.exclusive(), torch.no_grad():
        engine.model.generate_batch(prompts[:2], **kwargs)  # warm-up, untimed
        t0 = time.perf_counter()
        outputs = engine.model.generate_batch(prompts, **kwargs)
        seconds = time.perf_counter() - t0
    failed = [o.error for o in outputs.values() if o.error] + ["missing"] * (len(workload) - len(outputs))
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(workload)} requests failed in generate_batch: {failed[0]}")
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return {"requests": len(outputs), "seconds": round(seconds, 3), "requests_per_s": len(outputs) / seconds,
            "output_tokens_per_s": tokens / seconds}


def run_loadtest(engine, requests: int = 16, rates=(math.inf,), prompt_tokens: int = 64, output_tokens: int = 32,
                 max_num_seqs: int = 8, slo_ttft_s: float = 2.0, slo_tpot_s: float = 0.2,
                 modes=("one-at-a-time", "continuous", "transformers", "elastic"), ladder=("dense", "topk30", "topk50"),
                 overload: float = 2.0, control_period_s: float = 0.5, seed: int = 0, progress=None) -> dict:
    """The comparison the serving experiment reports: saturation throughput per mode, a Poisson rate sweep
    of continuous batching, and, at `overload` x the measured capacity, the fixed policy against the
    elastic controller (with the held-out KLD of every rung it used)."""
    say = progress or (lambda msg: None)
    base = engine.policy
    saturated = make_workload(engine.tokenizer, requests, math.inf, prompt_tokens, output_tokens, seed=seed)
    capacity_len = cache_capacity(int(prompt_tokens * 1.5) + int(output_tokens * 1.5) + 2)
    rows = []

    def scheduled(name, slots, workload, rate, controller_config=None):
        scheduler = Scheduler(engine, max_num_seqs=slots, max_queue=10 * len(workload), max_model_len=capacity_len,
                              metrics=Metrics())
        controller = None
        try:
            if controller_config is not None:
                controller = ElasticController(scheduler, controller_config, warm=True)  # profiles its rungs
            # graph captures (GPU) happen before the clock, every rung's too
            scheduler.warm_up(int(prompt_tokens * 1.5) + 1, policies=controller.policies if controller else ())
            if controller_config is not None:
                last = [time.perf_counter()]

                def tick():
                    if time.perf_counter() - last[0] >= controller_config.period_s:
                        last[0] = time.perf_counter()
                        controller.tick()
                row = run_scheduler(scheduler, workload, slo_ttft_s, slo_tpot_s, on_tick=tick)
                row["decisions"] = controller.decisions
                row["profiled_ms"] = {f"{name} @ batch {b}": round(ms, 2) for (name, b), ms in
                                      scheduler.profiled_ms.items()}
                row["rungs_that_do_not_pay"] = dict(controller.why_not)
            else:
                row = run_scheduler(scheduler, workload, slo_ttft_s, slo_tpot_s)
        finally:
            scheduler.close()
            if controller is not None:
                engine.reconfigure(base)
        row.update(mode=name, rate=rate, slots=slots)
        say(f"{name:>14} rate {rate:>6}: {row['output_tokens_per_s']:8.1f} tok/s, TTFT p50 {row['ttft_p50_s']:.3f} s, "
            f"goodput {row['goodput_rps']:.2f} req/s")
        rows.append(row)
        return row

    if "one-at-a-time" in modes:
        scheduled("one-at-a-time", 1, saturated, "inf")
    continuous = scheduled("continuous", max_num_seqs, saturated, "inf") if "continuous" in modes else None
    if "transformers" in modes:
        try:
            row = run_transformers(engine, saturated, max_num_seqs)
            row.update(mode="transformers", rate="inf", slots=max_num_seqs)
            say(f"  transformers rate    inf: {row['output_tokens_per_s']:8.1f} tok/s")
        except Exception as e:  # report, do not hide: the comparison row says why it is missing
            row = {"mode": "transformers", "rate": "inf", "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
    for rate in rates:
        if math.isfinite(rate) and continuous is not None:
            scheduled("continuous", max_num_seqs, make_workload(engine.tokenizer, requests, rate, prompt_tokens,
                                                               output_tokens, seed=seed), rate)
    overload_rows = {}
    if "elastic" in modes and continuous is not None:
        rate = overload * continuous["requests_per_s"]
        workload = make_workload(engine.tokenizer, 2 * requests, rate, prompt_tokens, output_tokens, seed=seed + 1)
        overload_rows["fixed"] = scheduled("fixed", max_num_seqs, workload, round(rate, 3))
        config = ControllerConfig(ladder=tuple(ladder), period_s=control_period_s, dwell_s=2 * control_period_s,
                                  horizon_s=2 * control_period_s, slo_ttft_s=slo_ttft_s)
        overload_rows["elastic"] = scheduled("elastic", max_num_seqs, workload, round(rate, 3), config)
    quality = {}
    if overload_rows:
        for name in ladder:
            engine.reconfigure(Policy.parse(name))
            quality[name] = evaluate(engine, max_tokens=512, progress=False)["kld_mean"]
        engine.reconfigure(base)
    result = {"model": engine.name, "policy": base.name, "device": str(engine.device),
              "settings": {"requests": requests, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
                           "max_num_seqs": max_num_seqs, "slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s,
                           "ladder": list(ladder), "overload": overload, "seed": seed},
              "rows": rows, "ladder_kld": quality, "environment": environment()}
    by_mode = {r["mode"]: r for r in rows if r.get("rate") == "inf" and r.get("output_tokens_per_s")}
    if "continuous" in by_mode and "one-at-a-time" in by_mode:
        result["continuous_vs_one_at_a_time"] = (by_mode["continuous"]["output_tokens_per_s"]
                                                 / by_mode["one-at-a-time"]["output_tokens_per_s"])
    if "continuous" in by_mode and "transformers" in by_mode:
        result["continuous_vs_transformers"] = (by_mode["continuous"]["output_tokens_per_s"]
                                                / by_mode["transformers"]["output_tokens_per_s"])
    if overload_rows:
        result.update(elastic_summary(overload_rows["fixed"], overload_rows["elastic"]))
    return result


def elastic_summary(fixed: dict, elastic: dict) -> dict:
    """The elastic controller against the fixed policy under the same overload. A gain is a gain only if
    the controller moved: with no decision both runs served the same policy, and their ratio is noise."""
    if not elastic.get("decisions"):
        return {"elastic_goodput_gain": None,
                "elastic_note": "no rung taken: the controller made no decision, so fixed and elastic served "
                                "the same policy (their goodput differs by noise only)"}
    gain = elastic["goodput_rps"] / fixed["goodput_rps"] if fixed["goodput_rps"] else None
    return {"elastic_goodput_gain": gain, "elastic_decisions": len(elastic["decisions"])}
