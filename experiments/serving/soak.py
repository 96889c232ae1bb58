"""Soak test of the OpenAI-compatible server: hundreds of concurrent streaming clients for minutes, some
hanging up mid-stream, greedy and sampled requests mixed, the policy switched every few seconds.

    python experiments/serving/soak.py --seconds 180 --clients 300 --out experiments/serving/soak_cpu.json
    python experiments/serving/soak.py --model default --seconds 60 --clients 100

The server runs in this process (uvicorn on 127.0.0.1, a free port, in a thread, so the script can switch
the scheduler's policy); the clients (asyncio + httpx) run in a child process, so they do not share the
server's GIL, only the machine: on a small CPU their share shows in the latencies. Each client loops
until the deadline: one streamed completion (greedy at temperature 0 or sampled), a fraction of them
closed after a few chunks; a 429 makes it back off 0.1-0.5 s. Every `--switch-every` seconds the
scheduler switches between the `--policies`. Every loop is bounded: clients stop at the deadline, each
request has a timeout, the child process is waited for (and ended) by its handle.

Greedy answers depend on the policy, so each completed greedy answer is compared with the sequential
answer (`engine.generate`, computed before the server starts) under the policy it was served under, and
only when it was served under exactly one (the response's `workbench.policies`); answers that saw a
switch mid-flight are counted as unchecked. Reported: completed / cancelled (by the client) / rejected
(429) / failed (anything else: a status, a transport error, an error event, a missing [DONE]), latency
percentiles of completed requests, the peak numbers of requests in flight and of streams open (answered
200, not yet closed) at once, client side, the greedy equality counts, and the server's state afterwards
(health, running requests on the scheduler and on /metrics, free cache slots, one more greedy answer).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from workbench import Engine
from workbench.policy import Policy
from workbench.environment import environment
from workbench.server import build, close

PROMPTS = [f"Soak prompt {i}: tell me about {topic}" for i, topic in enumerate(
    ["rivers", "the moon", "bread", "compilers", "tides", "owls", "glass", "trains", "salt", "clocks", "maps",
     "bees", "copper", "storms", "violins", "ice", "paper", "deserts", "ferns", "bridges", "ink", "wolves",
     "coral", "kites"])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="synthetic:tiny-llama")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=180.0, help="how long clients keep sending")
    p.add_argument("--clients", type=int, default=300, help="concurrent streaming clients")
    p.add_argument("--cancel-fraction", type=float, default=0.2, help="requests closed mid-stream")
    p.add_argument("--greedy-fraction", type=float, default=0.5, help="requests at temperature 0")
    p.add_argument("--policies", default="dense,topk30", help="the policies switched between (bench names)")
    p.add_argument("--switch-every", type=float, default=5.0, help="seconds between policy switches")
    p.add_argument("--max-tokens", type=int, default=16, help="the longest completion asked for")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--request-timeout", type=float, default=120.0, help="a request slower than this fails")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.clients < 1 or not 0 <= args.cancel_fraction <= 1 or args.max_tokens < 2:
        p.error("--seconds and --clients must be positive, --cancel-fraction in [0, 1], --max-tokens >= 2")
    return args


def expected_answers(engine, policies, max_tokens: int) -> dict:
    """(policy name, prompt index) -> the sequential greedy answer, and each prompt's token budget."""
    budgets = [2 + (i * 5) % (max_tokens - 1) for i in range(len(PROMPTS))]
    answers = {}
    for policy in policies:
        engine.reconfigure(policy)
        for i, (prompt, n) in enumerate(zip(PROMPTS, budgets)):
            answers[(policy.name, i)] = engine.generate([prompt], max_new_tokens=n, chat=False)[0]
    engine.reconfigure(policies[0])
    return {"answers": answers, "budgets": budgets}


def serve(server):
    """uvicorn on a free loopback port, in a thread; (url, stop)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    web = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="critical",
                                        backlog=4096, timeout_keep_alive=30))
    thread = threading.Thread(target=web.run, name="soak-uvicorn", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not web.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)

    def stop():
        web.should_exit = True
        thread.join(30)
    return f"http://127.0.0.1:{port}", stop


class Tally:
    """What the clients saw, and how many streams were open at once."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.failures: collections.Counter = collections.Counter()
        self.latency_s: list[float] = []
        self.ttft_s: list[float] = []
        self.tokens = 0
        self.open = self.peak_open = 0  # streams answered 200 and not yet closed
        self.in_flight = self.peak_in_flight = 0  # requests sent (or being sent) and not yet closed
        self.greedy: collections.Counter = collections.Counter()
        self.mismatches: list[dict] = []

    def opened(self) -> None:
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)

    def fail(self, why: str) -> None:
        self.counts["failed"] += 1
        self.failures[why[:120]] += 1


async def one_request(http: httpx.AsyncClient, rng: random.Random, args, expected, tally: Tally) -> bool:
    """One streamed completion; False when it was refused (429), so the client backs off."""
    i = rng.randrange(len(PROMPTS))
    greedy = rng.random() < args.greedy_fraction
    body = {"prompt": PROMPTS[i], "max_tokens": expected["budgets"][i], "stream": True}
    body.update({"temperature": 0} if greedy else {"temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(2 ** 32)})
    cancel_after = rng.randrange(1, 4) if rng.random() < args.cancel_fraction else None
    text, chunks, last, done, t0, first = "", 0, None, False, time.perf_counter(), None
    opened = False
    tally.in_flight += 1
    tally.peak_in_flight = max(tally.peak_in_flight, tally.in_flight)
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 429:
                await r.aread()
                tally.counts["rejected"] += 1
                return False
            if r.status_code != 200:
                tally.fail(f"status {r.status_code}: {(await r.aread())[:80]!r}")
                return True
            tally.opened()
            opened = True
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    tally.fail(f"error event: {event['error'].get('message', '')[:80]}")
                    return True
                first = first or time.perf_counter()
                text += event["choices"][0]["text"]
                last, chunks = event, chunks + 1
                if cancel_after is not None and chunks >= cancel_after:
                    tally.counts["cancelled"] += 1  # leaving the block closes the connection mid-stream
                    return True
    except (httpx.HTTPError, httpx.StreamError, json.JSONDecodeError, KeyError) as e:
        tally.fail(f"{type(e).__name__}: {e}")
        return True
    finally:
        tally.open -= opened
        tally.in_flight -= 1
    if not done or last is None or last["choices"][0]["finish_reason"] is None:
        tally.fail("the stream ended without a finish reason and [DONE]")
        return True
    tally.counts["completed"] += 1
    tally.latency_s.append(time.perf_counter() - t0)
    tally.ttft_s.append((first or time.perf_counter()) - t0)
    tally.tokens += last["usage"]["completion_tokens"]
    if greedy:
        policies = last["workbench"]["policies"]
        if len(policies) != 1:
            tally.greedy["unchecked (served under several policies)"] += 1
        elif text == expected["answers"][(policies[0], i)]:
            tally.greedy["equal"] += 1
        else:
            tally.greedy["differ"] += 1
            tally.mismatches.append({"prompt": i, "policy": policies[0], "got": text,
                                     "expected": expected["answers"][(policies[0], i)]})
    return True


async def client(http, seed: int, deadline: float, args, expected, tally: Tally) -> None:
    rng = random.Random(seed)
    await asyncio.sleep(rng.random() * 2.0)  # a ramp, not a thundering herd
    while time.perf_counter() < deadline:
        try:
            served = await asyncio.wait_for(one_request(http, rng, args, expected, tally), args.request_timeout)
        except asyncio.TimeoutError:
            tally.fail(f"no answer within {args.request_timeout} s")
            served = True
        if not served:
            await asyncio.sleep(0.1 + 0.4 * rng.random())


def switch_policies(scheduler, policies, every_s: float, deadline: float, log: list) -> None:
    """Alternate the scheduler's policy until the deadline (a bounded loop in its own thread)."""
    k = 0
    while time.perf_counter() + every_s < deadline:
        time.sleep(every_s)
        k += 1
        policy = policies[k % len(policies)]
        t0 = time.perf_counter()
        try:
            scheduler.set_policy(policy, timeout=60)
            log.append({"to": policy.name, "wait_s": round(time.perf_counter() - t0, 4)})
        except Exception as e:  # reported, not fatal: the soak goes on
            log.append({"to": policy.name, "error": f"{type(e).__name__}: {e}"})


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


async def soak(url: str, args, expected, tally: Tally) -> None:
    deadline = time.perf_counter() + args.seconds
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        await asyncio.gather(*(client(http, args.seed * 100_003 + c, deadline, args, expected, tally)
                               for c in range(args.clients)))


def run_clients(url: str, args, expected, results) -> None:
    """The child process: every client, then what they saw, through `results` (a multiprocessing queue)."""
    tally = Tally()
    results.put("ready")
    t0 = time.perf_counter()
    asyncio.run(soak(url, args, expected, tally))
    results.put({"wall_s": time.perf_counter() - t0, **vars(tally)})


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    policies = [Policy.parse(name.strip()) for name in args.policies.split(",") if name.strip()]
    engine = Engine.from_pretrained(args.model, device=args.device)
    t0 = time.perf_counter()
    expected = expected_answers(engine, policies, args.max_tokens)
    print(f"sequential answers under {[p.name for p in policies]}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    server = build(engine, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue, max_model_len=256)
    url, stop = serve(server)
    tally, switches = Tally(), []
    load_before = os.getloadavg()
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    clients = spawn.Process(target=run_clients, args=(url, args, expected, results), name="soak-clients")
    clients.start()
    try:
        try:  # bounded: every request has its timeout, so the clients end by then
            if results.get(timeout=300) != "ready":
                raise RuntimeError("the client process did not start")
            switcher = threading.Thread(target=switch_policies, daemon=True, args=(
                server.scheduler, policies, args.switch_every, time.perf_counter() + args.seconds, switches))
            switcher.start()
            seen = results.get(timeout=args.seconds + args.request_timeout + 120)
        finally:
            clients.join(30)
            if clients.is_alive():
                clients.terminate()  # our own child, by its handle
        wall_s = seen.pop("wall_s")
        vars(tally).update(seen)
        switcher.join(120)
        time.sleep(0.5)  # the last cancellations land before the next step
        health = httpx.get(url + "/health", timeout=30)
        probe = httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": PROMPTS[0], "max_tokens": expected["budgets"][0], "temperature": 0}).json()
        served_under = probe["workbench"]["policies"]
        metrics = httpx.get(url + "/metrics", timeout=30).text
        after = {"health_status": health.status_code, **health.json(),
                 "a_greedy_request_after_is_right": len(served_under) == 1 and
                 probe["choices"][0]["text"] == expected["answers"][(served_under[0], 0)],
                 "metrics_running": next(float(line.split()[1]) for line in metrics.splitlines()
                                         if line.startswith("workbench:num_requests_running ")),
                 "free_slots": server.scheduler._cache.free_slots if server.scheduler._cache else None,
                 "failed_requests_in_scheduler": server.scheduler.failed_requests,
                 "decode_steps": server.scheduler.steps, "prefill_passes": server.scheduler.prefills}
    finally:
        stop()
        close(server)
    result = {
        "command": "python experiments/serving/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": engine.name, "device": args.device, "cpu_threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "wall_s": round(wall_s, 1),
        "requests": {k: tally.counts[k] for k in ("completed", "cancelled", "rejected", "failed")},
        "failures": dict(tally.failures),
        "completed_per_s": round(tally.counts["completed"] / wall_s, 2),
        "generated_tokens_per_s": round(tally.tokens / wall_s, 1),
        "latency_s": {"p50": percentile(tally.latency_s, 0.5), "p99": percentile(tally.latency_s, 0.99),
                      "max": percentile(tally.latency_s, 1.0)},
        "ttft_s": {"p50": percentile(tally.ttft_s, 0.5), "p99": percentile(tally.ttft_s, 0.99)},
        "peak_open_streams": tally.peak_open, "peak_requests_in_flight": tally.peak_in_flight,
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "greedy": dict(tally.greedy), "greedy_mismatches": tally.mismatches[:10],
        "policy_switches": len([s for s in switches if "error" not in s]),
        "policy_switch_errors": [s for s in switches if "error" in s],
        "policy_switch_wait_s_max": max((s["wait_s"] for s in switches if "wait_s" in s), default=None),
        "server_after": after, "environment": environment(),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
