"""The OpenAI-compatible server: the official client works unchanged, many concurrent clients each get
their own answer, bad input gets OpenAI's error body with 400/401/404/429, /metrics is there."""
import concurrent.futures
import json
import time

import httpx
import pytest
from conftest import live_server
from starlette.testclient import TestClient

from workbench import Engine
from workbench.server import build, close


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("synthetic:tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def live(engine):
    """A real uvicorn server on a free port, in a thread."""
    server = build(engine, max_num_seqs=4, max_queue=256, max_model_len=256)
    with live_server(server) as port:
        yield f"http://127.0.0.1:{port}", server


def test_the_official_client_works_unchanged(live, engine):
    from openai import OpenAI
    url, _ = live
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [engine.name]
    out = client.completions.create(model=engine.name, prompt="hello there", max_tokens=5, temperature=0)
    assert out.choices[0].text == engine.generate(["hello there"], max_new_tokens=5, chat=False)[0]
    assert out.usage.completion_tokens <= 5 and out.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].text for c in client.completions.create(model=engine.name, prompt="hello there",
                                                                      max_tokens=5, temperature=0, stream=True)]
    assert "".join(pieces) == out.choices[0].text
    chat = client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.model_extra["workbench"]["policies"] == ["identity"]
    stream = client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content


def test_many_concurrent_clients_each_get_exactly_their_own_answer(live, engine):
    url, _ = live
    prompts = [f"client {i} asks about item {i * 7}" for i in range(24)]
    expected = {p: engine.generate([p], max_new_tokens=6, chat=False)[0] for p in prompts}

    def ask(prompt):
        stream = prompt.endswith(("1", "3", "5"))  # a mix of streamed and plain responses
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": stream}
        with httpx.Client(timeout=120) as http:
            if not stream:
                return prompt, http.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
            text = ""
            with http.stream("POST", url + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text += json.loads(line[6:])["choices"][0]["text"]
            return prompt, text

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = dict(pool.map(ask, prompts))
    assert answers == expected


def test_metrics_endpoint_lists_the_documented_names(live):
    url, _ = live
    text = httpx.get(url + "/metrics").text
    for name in ("workbench:num_requests_running", "workbench:time_to_first_token_seconds_bucket",
                 "workbench:inter_token_latency_seconds_bucket", "workbench:generation_tokens_total",
                 "workbench:sparsity_level", "workbench:request_success_total"):
        assert name in text
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_client_leaving_mid_stream_frees_its_slot(live):
    url, server = live
    body = {"prompt": "go on and on", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
    deadline = time.time() + 30
    while server.scheduler.load["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.scheduler.load["running"] == 0
    ok = httpx.post(url + "/v1/completions", json={"prompt": "still alive?", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200  # the server stays up


@pytest.fixture(scope="module")
def client(engine):
    server = build(engine, max_num_seqs=2, max_queue=8, max_model_len=256, api_key="sekret")
    with TestClient(server.app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = "Bearer sekret"
        yield c
    close(server)


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe\x00", 400, "not UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": 5}).encode(), 400, "'prompt' must be a string"),
    (json.dumps({"prompt": ""}).encode(), 400, "'prompt' is empty"),
    (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400, "'max_tokens' must be a positive integer"),
    (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, "'max_tokens' must be"),
    (json.dumps({"prompt": "x", "max_tokens": 10 ** 9}).encode(), 400, "exceeds"),
    (json.dumps({"prompt": "x", "temperature": 9}).encode(), 400, "'temperature'"),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400, "'stream' must be a boolean"),
    (json.dumps({"prompt": "x", "n": 3}).encode(), 400, "only n=1"),
    (json.dumps({"prompt": "x", "frobnicate": 1}).encode(), 400, "unknown field"),
    (json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), 404, "does not exist"),
]


@pytest.mark.parametrize("body, status, message", BAD)
def test_bad_requests_get_openai_error_bodies(client, body, status, message):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_chat_needs_well_formed_messages(client):
    for messages in (None, [], [{"role": "user"}], [{"role": "user", "content": 3}]):
        r = client.post("/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 400 and "'messages'" in r.json()["error"]["message"]


def test_the_api_key_is_required_when_set(client):
    r = client.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": ""}).status_code == 401


def test_a_full_queue_answers_429(engine):
    server = build(engine, max_num_seqs=1, max_queue=0)
    with TestClient(server.app) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    close(server)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_score_endpoint_batches(client):
    r = client.post("/v1/score", json={"text": "score this text please"})
    assert r.status_code == 200 and r.json()["total_logprob"] < 0
    assert client.post("/v1/score", json={"text": ""}).status_code == 400
