"""Continuous batching, the bounded queue, cancellation, policy switches, the controller, the batcher."""
import time

import pytest
import torch

from workbench import Engine, Policy
from workbench.batcher import DynamicBatcher
from workbench.controller import ControllerConfig, ElasticController, Forecaster
from workbench import SamplingParams
from workbench.errors import InputError
from workbench.metrics import Metrics
from workbench.scheduler import QueueFull, Scheduler

PROMPTS = [f"prompt number {i} " + "word " * (i % 5) for i in range(12)]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("synthetic:tiny-llama", device="cpu")


def test_every_request_gets_its_own_sequential_greedy_answer(engine):
    lengths = [3 + (i % 4) * 3 for i in range(len(PROMPTS))]
    expected = [engine.generate([p], max_new_tokens=n, chat=False)[0] for p, n in zip(PROMPTS, lengths)]
    metrics = Metrics()
    with Scheduler(engine, max_num_seqs=4, metrics=metrics) as scheduler:
        requests = [scheduler.submit(p, SamplingParams(max_new_tokens=n), chat=False) for p, n in zip(PROMPTS, lengths)]
        results = [r.result(timeout=120) for r in requests]
    assert [r["text"] for r in results] == expected
    assert all(r["policies"] == ["identity"] and r["ttft_s"] > 0 for r in results)
    batch = metrics.batch.collect()[0].samples
    steps = next(s.value for s in batch if s.name.endswith("_count"))
    total = next(s.value for s in batch if s.name.endswith("_sum"))
    assert total / steps > 1.5  # requests really were decoded together
    assert scheduler.steps < sum(lengths)
    assert scheduler.prefills < len(PROMPTS)  # and prompts prefilled together


def test_gemma_requests_batched_together_get_transformers_answers():
    """Gemma 3 (an 8-key sliding layer and a global one) in the scheduler: each of several concurrent
    requests gets what transformers' generate gives it alone."""
    gemma = Engine.from_pretrained("synthetic:gemma3-tiny-window", device="cpu")
    prompts, n = PROMPTS[:6], 8
    with Scheduler(gemma, max_num_seqs=4) as scheduler:
        requests = [scheduler.submit(p, SamplingParams(max_new_tokens=n), chat=False) for p in prompts]
        results = [r.result(timeout=120)["text"] for r in requests]
    gemma.use_decode_loop = False
    assert results == [gemma.generate([p], max_new_tokens=n, chat=False)[0] for p in prompts]


def test_streamed_pieces_add_up_to_the_text(engine):
    with Scheduler(engine, max_num_seqs=2) as scheduler:
        r = scheduler.submit("stream me", SamplingParams(max_new_tokens=8), chat=False)
        assert "".join(r.pieces(timeout=60)) == r.result()["text"]


def test_a_full_queue_refuses_and_drops_nothing(engine):
    scheduler = Scheduler(engine, max_num_seqs=1, max_queue=2, start=False)
    a = scheduler.submit("a", SamplingParams(max_new_tokens=2), chat=False)
    b = scheduler.submit("b", SamplingParams(max_new_tokens=2), chat=False)
    with pytest.raises(QueueFull, match="queue is full"):
        scheduler.submit("c", SamplingParams(max_new_tokens=2), chat=False)
    scheduler._thread.start()
    assert a.result(timeout=60)["completion_tokens"] >= 1 and b.result(timeout=60)["completion_tokens"] >= 1
    scheduler.close()


@pytest.mark.parametrize("prompt, params, message", [
    ("", SamplingParams(), "prompt is empty"),
    ("x", SamplingParams(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    ("x", SamplingParams(max_new_tokens=10_000), "exceeds"),
    ("x", SamplingParams(temperature=-1.0), "temperature"),
])
def test_bad_requests_are_refused_before_queueing(engine, prompt, params, message):
    with Scheduler(engine, max_num_seqs=1, max_model_len=256) as scheduler:
        with pytest.raises(InputError, match=message):
            scheduler.submit(prompt, params, chat=False)
        assert scheduler.load["waiting"] == 0


def test_cancel_frees_the_slot_for_the_next_request(engine):
    with Scheduler(engine, max_num_seqs=1) as scheduler:
        long = scheduler.submit("long one", SamplingParams(max_new_tokens=200, ignore_eos=True), chat=False)
        short = scheduler.submit("short one", SamplingParams(max_new_tokens=3), chat=False)
        next(long.pieces(timeout=60))  # it is running
        long.cancel()
        assert short.result(timeout=60)["completion_tokens"] >= 1
        assert long.result(timeout=60)["finish_reason"] == "cancelled"
        assert len(long.seq.tokens) < 200


def test_policy_switches_under_load_drop_nothing(engine):
    with Scheduler(engine, max_num_seqs=4) as scheduler:
        requests = [scheduler.submit(p, SamplingParams(max_new_tokens=12, ignore_eos=True), chat=False)
                    for p in PROMPTS]
        while not any(r.seq.tokens for r in requests):
            time.sleep(0.001)
        scheduler.set_policy(Policy.uniform(0.5, "topk"))
        scheduler.set_policy(Policy.identity())
        results = [r.result(timeout=120) for r in requests]
    assert all(r["completion_tokens"] == 12 for r in results)
    assert any(len(r["policies"]) > 1 for r in results)  # some were served under more than one policy
    assert {p for r in results for p in r["policies"]} <= {"identity", "topk-0.50"}


def test_close_finishes_waiting_requests_with_an_error(engine):
    scheduler = Scheduler(engine, max_num_seqs=1, start=False)
    r = scheduler.submit("never run", SamplingParams(max_new_tokens=2), chat=False)
    scheduler._thread.start()
    scheduler.close()
    assert r.done


def test_holt_forecast_follows_a_trend():
    f = Forecaster("holt", alpha=0.5, beta=0.5)
    for y in (0.1, 0.2, 0.3, 0.4, 0.5):
        f.update(y)
    assert f.predict(2) > 0.55  # a rising load is expected to keep rising
    e = Forecaster("ewma", alpha=0.5, beta=0.0)
    for y in (0.0, 1.0):
        e.update(y)
    assert e.predict(5) == 0.5


def test_controller_steps_up_and_down_with_hysteresis_and_dwell(engine):
    with Scheduler(engine, max_num_seqs=2) as scheduler:
        config = ControllerConfig(ladder=("dense", "topk30", "topk50"), period_s=1.0, dwell_s=5.0, forecast=None)
        controller = ElasticController(scheduler, config)
        assert controller.tick(load=0.9, now=100.0)["to"] == "topk30"
        assert controller.tick(load=0.95, now=102.0) is None  # dwell: too soon to move again
        assert controller.tick(load=0.95, now=106.0)["to"] == "topk50"
        assert controller.tick(load=0.99, now=112.0) is None  # the top rung
        assert controller.tick(load=0.6, now=118.0) is None  # inside the band: stay (hysteresis)
        assert controller.tick(load=0.2, now=124.0)["to"] == "topk30"
        assert controller.tick(load=0.2, now=130.0)["to"] == "dense"
        deadline = time.time() + 30  # switches land between steps, the latest one wins
        while scheduler.engine.policy.name != "dense" and time.time() < deadline:
            time.sleep(0.01)
        assert scheduler.engine.policy.name == "dense"
        assert [d["direction"] for d in controller.decisions] == ["up", "up", "down", "down"]


def test_controller_steps_back_from_a_rung_that_decodes_no_faster(engine):
    with Scheduler(engine, max_num_seqs=2) as scheduler:  # idle: the step times below are set by hand
        config = ControllerConfig(ladder=("dense", "topk30", "topk50"), period_s=1.0, dwell_s=5.0, forecast=None)
        controller = ElasticController(scheduler, config)
        scheduler.step_ms.update({("dense", 2): (10.0, 9), ("topk30", 2): (8.0, 9), ("topk50", 2): (9.5, 9)})
        controller.level = 1  # as if it had climbed to topk30: 20% faster than dense, so it stays
        assert controller.tick(load=0.95, now=100.0) is None  # loaded, but topk50 is slower than topk30: no climb
        assert controller.unprofitable == {2} and "no faster than topk30 at batch 2" in controller.why_not["topk50"]
        scheduler.step_ms[("topk30", 2)] = (12.0, 9)  # measured again while serving: now slower than dense
        move = controller.tick(load=0.99, now=106.0)
        assert move["to"] == "dense" and "no faster than dense" in move["reason"]
        assert controller.tick(load=0.99, now=112.0) is None  # and it is not tried again


def test_the_scheduler_times_decode_steps_per_policy_and_batch(engine):
    with Scheduler(engine, max_num_seqs=2) as scheduler:
        for r in [scheduler.submit(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in ("a b", "c d")]:
            r.result(timeout=60)
        (name, batch), (ms, n) = max(scheduler.step_ms.items(), key=lambda kv: kv[1][1])
        assert name == engine.policy.name and batch in (1, 2) and ms > 0 and n >= 3


def test_a_profiled_rung_that_is_slower_is_never_climbed_to(engine):
    serving = engine.policy.name
    with Scheduler(engine, max_num_seqs=2) as scheduler:
        request = scheduler.submit("running while we profile", SamplingParams(max_new_tokens=12, ignore_eos=True))
        times = scheduler.profile([Policy.identity(), Policy.uniform(0.5, "topk")], steps=3)
        assert set(times) == {"identity", "topk-0.50"} and all(ms > 0 for ms in times.values())
        assert engine.policy.name == serving and request.result(timeout=60)["completion_tokens"] == 12
        assert request.result()["policies"] == [serving]  # profiling served no one under another policy
        config = ControllerConfig(ladder=("dense", "topk50"), period_s=1.0, dwell_s=0.0, forecast=None)
        controller = ElasticController(scheduler, config)
        scheduler.profiled_ms.update({("dense", 2): 10.0, ("topk50", 2): 11.0})
        assert controller.tick(load=0.99, now=100.0) is None  # loaded, but the rung up would be slower
        assert "no faster than dense" in controller.why_not["topk50"] and not controller.decisions


def test_controller_refuses_a_bad_ladder(engine):
    with pytest.raises(InputError):
        ControllerConfig(ladder=())
    with pytest.raises(InputError):
        ControllerConfig(low=0.9, high=0.5)
    with pytest.raises(InputError):
        ControllerConfig(min_speedup=1.5)


def test_the_batcher_merges_concurrent_requests_and_scores_like_a_forward(engine):
    texts = [f"text to score number {i}" for i in range(6)]
    batcher = DynamicBatcher(engine, max_batch_size=8, timeout_ms=50)
    futures = [batcher.score(t) for t in texts]
    results = [f.result(timeout=60) for f in futures]
    batcher.close()
    assert max(batcher.batches) > 1
    for text, r in zip(texts, results):
        ids = torch.tensor([engine.tokenizer(text, add_special_tokens=False)["input_ids"]])
        lp = torch.log_softmax(engine.forward(ids)[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        assert abs(r["total_logprob"] - float(lp.sum())) < 1e-3
    with pytest.raises(InputError):
        DynamicBatcher(engine).score("")


def test_metrics_have_the_documented_names(engine):
    metrics = Metrics()
    with Scheduler(engine, max_num_seqs=2, metrics=metrics) as scheduler:
        scheduler.generate("hello", SamplingParams(max_new_tokens=3), chat=False, timeout=60)
    text = metrics.exposition().decode()
    for name in ("workbench:num_requests_running", "workbench:num_requests_waiting",
                 "workbench:time_to_first_token_seconds_bucket", "workbench:inter_token_latency_seconds_bucket",
                 "workbench:e2e_request_latency_seconds_count", "workbench:request_queue_time_seconds_sum",
                 "workbench:batch_size_bucket", "workbench:generation_tokens_total", "workbench:prompt_tokens_total",
                 "workbench:request_success_total", "workbench:sparsity_level", "workbench:achieved_sparsity",
                 "workbench:estimated_kld", "workbench:request_rejected_total", "workbench:generation_tokens_per_second"):
        assert name in text, name


def test_the_grafana_dashboard_uses_only_metrics_we_export():
    import json
    import re
    from pathlib import Path
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "experiments/serving/grafana_dashboard.json")
                           .read_text())
    exported = Metrics().exposition().decode()
    names = {n for p in dashboard["panels"] for t in p["targets"] for n in re.findall(r"workbench:[a-z0-9_]+", t["expr"])}
    assert len(names) >= 12
    for name in names:  # a histogram's series carry suffixes after its base name; a counter's TYPE line has _total
        base = re.sub(r'_(bucket|sum|count)$', '', name)
        assert f"# TYPE {base} " in exported, name
