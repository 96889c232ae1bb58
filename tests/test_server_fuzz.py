"""Fuzzing the live server: a few hundred generated requests (hypothesis, derandomized, so CI sees the same
ones every run), malformed, extreme and valid, against a real uvicorn server on the loopback.

Whatever arrives gets an allowed status (400 invalid, 401, 404, 405, 413, 429; no fault is injected here,
so a 500 is a bug) and every non-2xx body is OpenAI's error shape. Random JSON of every type goes into
every field; raw bodies bring NaN and Infinity literals, integers of thousands of digits, 100000-deep
nesting, lone surrogates, non-UTF-8 bytes, cut-off JSON, wrong content types and bodies over 1 MiB; some
clients hang up mid-stream, mid-body or before the answer; bursts overflow the queue. Valid greedy
requests among them (stop strings included) must get exactly the engine's own sequential answer, computed
before the server starts. Afterwards /health is 200, a normal request is answered correctly and no cache
slot is held (scheduler and /metrics agree).
"""
import collections
import concurrent.futures
import json
import logging
import re
import socket
import time

import httpx
import pytest
from conftest import live_server
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from workbench import Engine
from workbench.server import MAX_BODY_BYTES, build

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED = {200, 400, 401, 404, 405, 413, 429}
BASE_PROMPTS = [("hello there", 4), ("the quick brown fox", 6), ("count with me: one two", 5),
                ("a b c d e f", 3), ("Why is the sky blue?", 8), ("x", 5)]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("synthetic:tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def valid(engine):
    """(prompt, max_tokens, stop) -> the sequential greedy answer, computed before any server shares the
    engine. Each prompt twice: as is, and with a stop string cut from its own answer, so the stop really
    fires (and must not be part of the text)."""
    answers = {}
    for prompt, n in BASE_PROMPTS:
        full = engine.generate([prompt], max_new_tokens=n, chat=False)[0]
        answers[(prompt, n, ())] = full
        if len(full) >= 3:
            stop = (full[1:3],)
            cut = engine.generate([prompt], max_new_tokens=n, chat=False, stop=list(stop))[0]
            assert stop[0] not in cut and len(cut) < len(full)
            answers[(prompt, n, stop)] = cut
    return answers


@pytest.fixture(scope="module")
def live(engine, valid):
    server = build(engine, max_num_seqs=4, max_queue=3, max_model_len=256, api_key=KEY)
    with live_server(server) as port:
        yield "127.0.0.1", port, server


# ---- strategies -------------------------------------------------------------------------------------------
SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800", "ok"])
BIG_INTS = st.sampled_from([2 ** 64, 2 ** 64 - 1, -2 ** 63, -2 ** 63 - 1, -2 ** 70, 10 ** 30, 2 ** 1030, -1, 0])
LEAF = st.one_of(st.none(), st.booleans(), st.integers(), BIG_INTS, st.floats(), st.text(max_size=12), SURROGATES)
ANY_JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6) | SURROGATES, inner, max_size=4), max_leaves=12)
# Valid token counts stay small (a decode step of the tiny model costs ~13 ms on 2 cores); 9..256 is skipped.
TOKENS = st.one_of(st.integers(-3, 8), BIG_INTS, st.sampled_from([257, 10 ** 9, 2.0, "8", True]), ANY_JSON)
NUMBER = st.one_of(st.floats(-3, 3), st.floats(), st.sampled_from([0, 1, 2, 0.0, 1e-300, -0.0]), BIG_INTS)
PROMPT = st.one_of(st.text(min_size=1, max_size=40), st.just(""), st.lists(st.text(min_size=1, max_size=10),
                                                                           max_size=3),
                   st.lists(st.integers(0, 300), max_size=4), st.just("y " * 300), SURROGATES, ANY_JSON)
MESSAGE = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "banana"]),
                                           "content": st.text(max_size=20)}),
                    st.fixed_dictionaries({"role": ANY_JSON, "content": ANY_JSON}),
                    st.fixed_dictionaries({"role": st.just("user")}), ANY_JSON)
MESSAGES = st.one_of(st.lists(MESSAGE, max_size=4), ANY_JSON)
STOP = st.one_of(st.text(max_size=4), st.lists(st.text(max_size=3), max_size=6), ANY_JSON)
COMMON = {"max_tokens": TOKENS, "temperature": NUMBER, "top_p": NUMBER, "top_k": TOKENS | st.integers(0, 400),
          "seed": BIG_INTS | st.integers() | ANY_JSON, "stop": STOP, "stream": st.booleans() | ANY_JSON,
          "n": st.sampled_from([1, 2, 0, -1, 1.0, "1", True]) | ANY_JSON,
          "presence_penalty": NUMBER, "frequency_penalty": NUMBER,
          "model": st.sampled_from(["synthetic:tiny-llama", "gpt-4o", ""]) | ANY_JSON,
          "user": ANY_JSON, "stream_options": ANY_JSON, "logprobs": ANY_JSON, "logit_bias": ANY_JSON,
          "frobnicate": ANY_JSON}
COMPLETION = st.fixed_dictionaries({"prompt": st.just("fuzz me") | PROMPT}, optional={
    **COMMON, "echo": ANY_JSON, "best_of": ANY_JSON, "suffix": ANY_JSON})
CHAT = st.fixed_dictionaries({"messages": st.just([{"role": "user", "content": "fuzz me"}]) | MESSAGES}, optional={
    **COMMON, "max_completion_tokens": TOKENS, "top_logprobs": ANY_JSON, "response_format": ANY_JSON,
    "tools": ANY_JSON, "tool_choice": ANY_JSON})


def _nested(depth: int, opener: bytes, closer: bytes, closed: bool) -> bytes:
    return opener * depth + (b"1" if opener != b"[" else b"") + (closer * depth if closed else b"")


RAW_BODIES = st.one_of(
    st.binary(max_size=48),
    st.builds(lambda d, o, closed, wrap: (b'{"prompt": "x", "stop": %s}' if wrap else b"%s") % _nested(d, *o, closed),
              st.sampled_from([10, 999, 1000, 5000, 100000]), st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]),
              st.booleans(), st.booleans()),
    st.builds(lambda field, lit: b'{"prompt": "x", "max_tokens": 2, "%s": %s}' % (field, lit),
              st.sampled_from([b"temperature", b"top_p", b"top_k", b"seed", b"max_tokens", b"n", b"stop", b"user",
                               b"presence_penalty", b"frequency_penalty", b"logprobs", b"echo", b"stream"]),
              st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" + b"0" * 5000,
                               b"-" + b"9" * 4301, b"1e-400", b'"\\ud800"', b"tru", b"0x10", b"01"])),
    st.builds(lambda body, k: body[:k], st.sampled_from([
        b'{"prompt": "cut me off", "max_tokens": 3, "temperature": 0}',
        b'{"messages": [{"role": "user", "content": "cut"}], "stream": true}']), st.integers(0, 70)),
    st.sampled_from([b"", b"null", b"[]", b'"a string"', b"1", b"{}", b'{"\\udfff": 1}', b'{"prompt": "\xff\xfe"}',
                     b'\xef\xbb\xbf{"prompt": "x"}', '{"prompt": "x"}'.encode("utf-16"),
                     b'{"prompt": "x", "prompt": 3}', b'{"prompt": "x"} trailing', b'{"prompt": "\\u0000"}']))
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "", "application/json; charset=latin-1"])
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
VALID_CASE = st.tuples(st.integers(0, 10 ** 6), st.booleans(), st.booleans())  # (which, stream, prompt as a list)

CASES = st.one_of(
    st.tuples(st.just("completion"), COMPLETION, st.booleans()),
    st.tuples(st.just("chat"), CHAT, st.booleans()),
    st.tuples(st.just("raw"), PATHS, RAW_BODIES, CONTENT_TYPES),
    st.tuples(st.just("oversize"), PATHS, st.sampled_from([1, 4096, 1 << 19]), st.booleans()),
    st.tuples(st.just("hang_up_mid_stream"), PATHS, st.integers(0, 3)),
    st.tuples(st.just("hang_up_mid_body"), PATHS, st.integers(1, 60), st.booleans()),
    st.tuples(st.just("hang_up_before_answer"), PATHS),
    st.tuples(st.just("valid"), VALID_CASE),
    st.tuples(st.just("valid"), VALID_CASE),
    st.tuples(st.just("burst"), st.lists(VALID_CASE, min_size=3, max_size=8)),
    st.tuples(st.just("auth"), PATHS, st.sampled_from([{}, {"Authorization": "Bearer wrong"},
                                                      {"Authorization": "Basic " + KEY}, {"Authorization": KEY}])),
    st.tuples(st.just("route"), st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
              st.sampled_from(["/v1/models", "/health", "/metrics", "/v1/completions", "/v1/score", "/nope",
                               "/v1/chat/completions/x", "/v1"])),
    st.tuples(st.just("score"), st.one_of(st.text(max_size=30), st.just("z" * 1500), ANY_JSON)),
)


C, CHAT_PATH = "/v1/completions", "/v1/chat/completions"
EDGES = [
    *[("raw", C, b'{"prompt": "x", "max_tokens": 2, "%s": %s}' % (field, literal), "application/json")
      for field in (b"temperature", b"top_p", b"top_k", b"seed", b"max_tokens", b"presence_penalty", b"n", b"user")
      for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"1" + b"0" * 5000)],
    *[("raw", path, _nested(100000, *o, closed), "application/json") for path in (C, CHAT_PATH)
      for o in ((b"[", b"]"), (b'{"a":', b"}")) for closed in (True, False)],
    ("raw", C, b'{"prompt": "x", "stop": %s}' % _nested(100000, b"[", b"]", True), "application/json"),
    ("raw", C, b'{"prompt": "\\ud800"}', "application/json"), ("raw", C, b'{"\\udfff": 1}', "application/json"),
    ("raw", CHAT_PATH, b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "application/json"),
    ("raw", C, b'{"prompt": "\xff\xfe\x80"}', "application/json"), ("raw", C, b"\x80\x81", "text/plain"),
    ("raw", C, b'{"prompt": "cut', "application/json"), ("raw", CHAT_PATH, b"", ""),
    *[("completion", {"prompt": "x", "max_tokens": 2, "seed": seed}, False)
      for seed in (2 ** 64, -2 ** 70, 2 ** 64 - 1, -2 ** 63)],
    ("completion", {"prompt": "x", "max_tokens": 2 ** 64}, False),
    ("completion", {"prompt": "x", "max_tokens": -2 ** 70}, True),
    ("completion", {"prompt": ["a", "b"]}, False), ("completion", {"prompt": [1, 2, 3]}, False),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, False),
    ("chat", {"messages": "hi"}, False), ("chat", {"messages": [[]]}, True),
    *[("oversize", path, 1, chunked) for path in (C, CHAT_PATH) for chunked in (False, True)],
    *[("hang_up_mid_stream", path, lines) for path in (C, CHAT_PATH) for lines in (0, 2)],
    *[("hang_up_mid_body", C, 20, shut) for shut in (False, True)], ("hang_up_before_answer", C),
    ("burst", [(i, i % 2 == 0, False) for i in range(10)]),
]


# ---- checks ---------------------------------------------------------------------------------------------------
def assert_error_body(status: int, raw: bytes):
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    assert error["param"] is None or isinstance(error["param"], str)


def read_stream(response) -> str:
    """The SSE stream of a 200: every event is JSON (never an error: nothing fails here), [DONE] last."""
    text, done = "", False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: ") and not done, line
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        choice = event["choices"][0]
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    assert done
    return text


def check_answer(status: int, raw: bytes, path: str):
    assert status in ALLOWED, (status, raw[:300])
    if status != 200:
        assert_error_body(status, raw)
    elif path in ("/v1/completions", "/v1/chat/completions"):
        choice = json.loads(raw)["choices"][0]
        assert isinstance(choice["text"] if "text" in choice else choice["message"]["content"], str)


def prompt_of(path: str, text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}]} if "chat" in path else {"prompt": text}


class Fuzzer:
    def __init__(self, host: str, port: int, valid: dict):
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60, headers=AUTH)
        self.valid = sorted(valid.items())
        self.seen: collections.Counter = collections.Counter()

    def send(self, method: str, path: str, content=None, headers=None, stream: bool = False) -> int:
        with self.http.stream(method, path, content=content, headers=headers) as r:
            if r.status_code == 200 and stream and r.headers.get("content-type", "").startswith("text/event-stream"):
                read_stream(r)
            else:
                check_answer(r.status_code, r.read(), path)
        self.seen[r.status_code] += 1
        return r.status_code

    def raw_socket(self, head: bytes, body: bytes, shut: bool) -> bytes:
        with socket.create_connection((self.host, self.port), timeout=30) as s:
            s.sendall(head + body)
            if shut:
                s.shutdown(socket.SHUT_WR)
            else:
                return b""
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data

    def valid_request(self, case) -> tuple[int, str | None, str]:
        which, stream, as_list = case
        (prompt, n, stop), expected = self.valid[which % len(self.valid)]
        body = {"prompt": [prompt] if as_list else prompt, "max_tokens": n, "temperature": 0, "stream": stream}
        if stop:
            body["stop"] = list(stop)
        with httpx.Client(base_url=self.url, timeout=60, headers=AUTH) as http:  # its own, for bursts
            with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raw = r.read()
                    assert_error_body(r.status_code, raw)
                    return r.status_code, None, expected
                text = read_stream(r) if stream else json.loads(r.read())["choices"][0]["text"]
        return 200, text, expected

    def run(self, case) -> None:
        kind = case[0]
        self.seen["case " + kind] += 1
        if kind in ("completion", "chat"):
            _, body, stream_in_body = case
            body = dict(body)  # explicit examples are shared objects
            if stream_in_body:
                body["stream"] = True
            for name in ("max_tokens", "max_completion_tokens"):  # valid but long runs: keep the file fast
                if type(body.get(name)) is int and 8 < body[name] < 257:
                    body[name] = 8
            path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
            content = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity literals, \ud800 escapes
            self.send("POST", path, content, {"content-type": "application/json"}, stream=body.get("stream") is True)
        elif kind == "raw":
            _, path, body, content_type = case
            self.send("POST", path, body, {"content-type": content_type} if content_type else None)
        elif kind == "oversize":
            _, path, extra, chunked = case
            body = b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + extra - 14) + b'"}'
            content = (body[i:i + 65536] for i in range(0, len(body), 65536)) if chunked else body
            assert self.send("POST", path, content, {"content-type": "application/json"}) == 413
        elif kind == "hang_up_mid_stream":
            _, path, lines = case
            body = {"max_tokens": 60, "temperature": 0.5, "stream": True, **prompt_of(path, "keep going")}
            with httpx.Client(base_url=self.url, timeout=60, headers=AUTH) as http:
                with http.stream("POST", path, json=body) as r:
                    assert r.status_code in (200, 429)
                    for _ in zip(range(lines), r.iter_lines()):
                        pass  # then hang up
            self.seen["hung up mid-stream"] += 1
        elif kind == "hang_up_mid_body":
            _, path, sent, shut = case
            body = b'{"prompt": "this body is cut off by its client", "max_tokens": 3}'
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}"
                    f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            data = self.raw_socket(head, body[:min(sent, len(body) - 1)], shut)
            if data:  # the client half-closed: whatever comes back is an allowed JSON answer
                status = int(data.split(b" ", 2)[1])
                check_answer(status, data.split(b"\r\n\r\n", 1)[1], path)
            self.seen["hung up mid-body"] += 1
        elif kind == "hang_up_before_answer":
            _, path = case
            body = json.dumps({"max_tokens": 8, **prompt_of(path, "gone")}).encode()
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}"
                    f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            self.raw_socket(head, body, shut=False)
            self.seen["hung up before the answer"] += 1
        elif kind == "valid":
            status, text, expected = self.valid_request(case[1])
            assert status == 200 and text == expected, (case, text, expected)
            self.seen["valid"] += 1
        elif kind == "burst":
            with concurrent.futures.ThreadPoolExecutor(len(case[1])) as pool:
                for status, text, expected in pool.map(self.valid_request, case[1]):
                    assert status in (200, 429) and (status == 429 or text == expected), (status, text, expected)
                    self.seen[f"burst {status}"] += 1
        elif kind == "auth":
            _, path, headers = case
            r = httpx.post(self.url + path, content=b'{"prompt": "x"}', headers=headers, timeout=60)
            assert r.status_code == 401
            assert_error_body(401, r.content)
            self.seen[401] += 1
        elif kind == "route":
            _, method, path = case
            self.send(method, path, b"{}" if method != "GET" else None)
        elif kind == "score":
            self.send("POST", "/v1/score", json.dumps({"text": case[1]}, allow_nan=True).encode())


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def settle(server, url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        load = server.scheduler.load
        if not load["running"] and not load["waiting"] and metric(url, "workbench:num_requests_running") == 0:
            return
        time.sleep(0.05)


def test_every_fuzzed_request_is_answered_and_the_server_stays_whole(live, valid, caplog):
    host, port, server = live
    caplog.set_level(logging.ERROR, logger="workbench")
    fuzzer = Fuzzer(host, port, valid)

    @settings(max_examples=200, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(case=CASES)
    def fuzz(case):
        fuzzer.run(case)
    for case in EDGES:  # always tried, whatever the generator draws
        fuzz = example(case=case)(fuzz)
    fuzz()
    fuzzer.http.close()

    settle(server, fuzzer.url)
    health = httpx.get(fuzzer.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    status, text, expected = fuzzer.valid_request((0, False, False))
    assert status == 200 and text == expected
    settle(server, fuzzer.url)
    assert server.scheduler.load["running"] == 0 and server.scheduler.load["waiting"] == 0
    assert server.scheduler.runner.free_slots == server.scheduler.max_num_seqs  # no slot leaked
    assert metric(fuzzer.url, "workbench:num_requests_running") == 0
    assert server.scheduler.failed_requests == 0 and server.scheduler.alive
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, failures  # nothing here is a failure of the server's (a hang-up included)
    print("answers seen:", dict(fuzzer.seen))
    # the fuzz reached what it is meant to reach (these do not depend on timing)
    for what in (200, 400, 401, 404, 413, "valid", "hung up mid-stream", "hung up mid-body"):
        assert fuzzer.seen[what] > 0, (what, fuzzer.seen)
