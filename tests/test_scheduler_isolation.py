"""One request's failure stays that request's: a raise in its sampling, its prefill, a decode step or its
listener fails it (and, for a step, the requests of that step) with an error naming it, while everyone
else, and everyone after, gets the exact greedy answer. Only the loop's own death makes /health say
unhealthy, and then nothing hangs: submit and set_policy answer with an error at once."""
import dataclasses
import threading
import time

import httpx
import pytest
from conftest import live_server

import workbench.runtime.decoder
import workbench.runtime.runner
from workbench import Engine, Policy
from workbench import SamplingParams
from workbench.errors import InputError, PolicyError, WorkbenchError
from workbench.scheduler import Scheduler
from workbench.server import build

BAD_SEED = 4242
MARKER = "~"  # a prompt holding this byte fails in prefill (test d)
PROMPTS = [f"normal request {i} about topic {i * 3}" for i in range(10)]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("synthetic:tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def expected(engine):
    """Sequential greedy answers, computed before any scheduler shares the engine (or a patch lands)."""
    prompts = PROMPTS + ["in flight alongside", "a long one in flight", "batched with the culprit"]
    return {p: engine.generate([p], max_new_tokens=NEW_TOKENS, chat=False)[0] for p in prompts}


def greedy(n: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


def assert_ten_normal_requests(scheduler, expected):
    requests = [scheduler.submit(p, greedy(), chat=False) for p in PROMPTS]
    assert [r.result(timeout=60)["text"] for r in requests] == [expected[p] for p in PROMPTS]


@pytest.fixture
def failing_seed(monkeypatch):
    """`sample` raises for the request whose seed is BAD_SEED, and only for it."""
    real = workbench.runtime.runner.sample

    def sample(logits, params, generator, previous=None):
        if params.seed == BAD_SEED:
            raise RuntimeError("boom in sampling")
        return real(logits, params, generator, previous)
    monkeypatch.setattr(workbench.runtime.runner, "sample", sample)


# ---- (a) a raise in one request's sampling ---------------------------------------------------------------
def test_a_request_failing_in_sampling_fails_alone(engine, expected, failing_seed):
    with Scheduler(engine, max_num_seqs=4, start=False) as scheduler:
        alongside = scheduler.submit("in flight alongside", greedy(), chat=False)
        bad = scheduler.submit("the culprit", greedy(temperature=0.7, seed=BAD_SEED), chat=False)
        sampled = scheduler.submit("sampled, not failing", greedy(temperature=0.7, seed=1), chat=False)
        scheduler._thread.start()  # all three are admitted together and decoded in one batch
        with pytest.raises(WorkbenchError, match=rf"{bad.id} failed in sampling: RuntimeError: boom"):
            bad.result(timeout=60)
        assert alongside.result(timeout=60)["text"] == expected["in flight alongside"]
        assert sampled.result(timeout=60)["completion_tokens"] >= 1
        assert_ten_normal_requests(scheduler, expected)
        assert scheduler.alive and scheduler.failed_requests == 1 and scheduler.load["running"] == 0


# ---- (b) the same, through the live server -----------------------------------------------------------------
def serve(server):
    """The live server and a stop function: (url, stop)."""
    ctx = live_server(server)
    port = ctx.__enter__()
    return f"http://127.0.0.1:{port}", lambda: ctx.__exit__(None, None, None)


def assert_openai_error(response, status: int):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    return error


def test_the_failing_request_gets_a_json_500_and_the_next_ones_their_answers(engine, expected, failing_seed):
    url, stop = serve(build(engine, max_num_seqs=4, max_queue=16, max_model_len=256))
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            bad = http.post("/v1/completions", json={"prompt": "the culprit", "max_tokens": NEW_TOKENS,
                                                     "temperature": 0.7, "seed": BAD_SEED})
            error = assert_openai_error(bad, 500)
            assert error["type"] == "server_error" and "req-" in error["message"] and "in sampling" in error["message"]
            for p in PROMPTS:
                ok = http.post("/v1/completions", json={"prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0})
                assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected[p]
            assert http.get("/health").json()["status"] == "ok"
    finally:
        stop()


# ---- (c) a failed decode step ------------------------------------------------------------------------------
def test_a_failed_decode_step_fails_its_requests_then_serving_goes_on(engine, expected, monkeypatch):
    real, armed = workbench.runtime.decoder.Decoder.step, threading.Event()

    def step(self, cache, ids):
        if armed.is_set():
            armed.clear()  # one call only
            raise RuntimeError("boom in a decode step")
        return real(self, cache, ids)
    monkeypatch.setattr(workbench.runtime.decoder.Decoder, "step", step)
    with Scheduler(engine, max_num_seqs=4) as scheduler:
        stepping = [scheduler.submit(f"long {i}", greedy(200, ignore_eos=True), chat=False) for i in range(3)]
        deadline = time.time() + 60
        while not all(r.seq.tokens for r in stepping) and time.time() < deadline:
            time.sleep(0.005)
        armed.set()
        for r in stepping:
            with pytest.raises(WorkbenchError, match=rf"{r.id} failed in a decode step: RuntimeError: boom"):
                r.result(timeout=60)
        assert not armed.is_set() and scheduler.alive
        assert_ten_normal_requests(scheduler, expected)
        assert scheduler.load["running"] == 0 and scheduler.runner.free_slots == 4


# ---- (d) a failed prefill of a batch ---------------------------------------------------------------------------
def test_a_failed_batched_prefill_fails_only_the_culprit(engine, expected, monkeypatch):
    marker = engine.token_ids([MARKER], chat=False)[0][-1]
    real = workbench.runtime.decoder.Decoder.prefill_batch
    batched = []

    def prefill_batch(self, cache, slots, prompts):
        batched.append(len(prompts))
        if any(bool((p == marker).any()) for p in prompts):
            raise RuntimeError("boom in prefill")
        return real(self, cache, slots, prompts)
    monkeypatch.setattr(workbench.runtime.decoder.Decoder, "prefill_batch", prefill_batch)
    with Scheduler(engine, max_num_seqs=4, start=False) as scheduler:
        good = [scheduler.submit(p, greedy(), chat=False) for p in ("batched with the culprit", PROMPTS[0])]
        bad = scheduler.submit(f"the culprit {MARKER} here", greedy(), chat=False)
        good.append(scheduler.submit(PROMPTS[1], greedy(), chat=False))
        scheduler._thread.start()
        with pytest.raises(WorkbenchError, match=rf"{bad.id} failed in prefill: RuntimeError: boom"):
            bad.result(timeout=60)
        assert [r.result(timeout=60)["text"] for r in good] == [
            expected[p] for p in ("batched with the culprit", PROMPTS[0], PROMPTS[1])]
        assert batched[0] == 4  # they really were prefilled as one batch first
        assert_ten_normal_requests(scheduler, expected)
        assert scheduler.failed_requests == 1 and scheduler.runner.free_slots == 4


# ---- a listener that raises (the server's bridge, once its event loop is gone) ----------------------------------
def test_a_raising_listener_fails_its_request_alone(engine, expected):
    def listener(piece):
        raise RuntimeError("the event loop is closed")
    with Scheduler(engine, max_num_seqs=4, start=False) as scheduler:
        alongside = scheduler.submit("in flight alongside", greedy(), chat=False)
        bad = scheduler.submit("a deaf listener", greedy(), chat=False, listener=listener)
        scheduler._thread.start()
        with pytest.raises(WorkbenchError, match=rf"{bad.id} failed"):
            bad.result(timeout=60)
        assert alongside.result(timeout=60)["text"] == expected["in flight alongside"]
        assert_ten_normal_requests(scheduler, expected)
        assert scheduler.alive


# ---- (e) the loop itself dies -----------------------------------------------------------------------------------
def test_a_dead_loop_makes_health_503_and_nothing_hangs(engine, expected):
    server = build(engine, max_num_seqs=4, max_queue=16, max_model_len=256)
    scheduler = server.scheduler

    def drop_cancelled():
        raise RuntimeError("boom in the loop itself")
    url, stop = serve(server)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").json()["status"] == "ok"
            running = scheduler.submit("a long one in flight", greedy(200, ignore_eos=True), chat=False)
            while not running.seq.tokens:
                time.sleep(0.005)
            scheduler._drop_cancelled = drop_cancelled  # the next iteration raises outside any one request
            with pytest.raises(WorkbenchError, match="the scheduler stopped: RuntimeError: boom in the loop"):
                running.result(timeout=30)
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "unhealthy"
            assert "boom in the loop itself" in health.json()["error"]
            t0 = time.perf_counter()
            with pytest.raises(WorkbenchError):
                scheduler.submit("after the death", greedy(), chat=False)
            r = http.post("/v1/completions", json={"prompt": "after the death", "max_tokens": 2})
            assert assert_openai_error(r, 503)["type"] == "server_error"
            with pytest.raises(WorkbenchError):
                scheduler.set_policy(Policy.uniform(0.5, "topk"), timeout=30)
            assert time.perf_counter() - t0 < 5  # answered at once, not after a timeout
    finally:
        stop()


# ---- (f) a bad policy --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, error", [
    (dataclasses.replace(Policy.identity(), name="needs-a-file", calibration="/nonexistent/calibration.json"),
     PolicyError),
    ("topk50", InputError),  # a name is not a Policy
    (None, InputError),
])
def test_a_bad_policy_raises_to_the_caller_and_serving_goes_on(engine, expected, policy, error):
    with Scheduler(engine, max_num_seqs=4) as scheduler:
        before = engine.policy.name
        running = scheduler.submit("a long one in flight", greedy(), chat=False)
        t0 = time.perf_counter()
        with pytest.raises(error):
            scheduler.set_policy(policy, timeout=30)
        assert time.perf_counter() - t0 < 5
        assert engine.policy.name == before
        assert running.result(timeout=60)["text"] == expected["a long one in flight"]
        assert running.result()["policies"] == [before]
        assert_ten_normal_requests(scheduler, expected)
        scheduler.set_policy(Policy.uniform(0.5, "topk"))  # a good one still goes through
        assert engine.policy.name == "topk-0.50"
        scheduler.set_policy(Policy.identity())
