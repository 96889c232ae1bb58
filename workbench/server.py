"""An OpenAI-compatible HTTP server over the scheduler (Starlette on uvicorn).

    POST /v1/completions        prompt -> text (stream: server-sent events)
    POST /v1/chat/completions   messages -> message (stream: server-sent events)
    POST /v1/score              text -> per-token log-probabilities (dynamic batching; our extension)
    GET  /v1/models, /health, /metrics (Prometheus)

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for an invalid request,
401 without the API key when one is set, 404 for an unknown model, 413 for a body over 1 MiB, 429 when
the queue is full, 500 (naming the request id, whose traceback is in the log) when serving one request
failed; the others go on. `/health` answers 503 once the decode loop itself has died.

Sampling defaults are the model's own where its generation config sets them (temperature, top_p,
top_k, as vLLM reads them), else OpenAI's: temperature 1.0, top_p 1.0. Send "temperature": 0 for the
greedy answer the CLI gives. Every
response carries a `workbench` field: the policies it was served under, queue time, time to first token.
A client that goes away cancels its request, and its cache slot is free before the next decode step.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from workbench.batcher import DynamicBatcher
from workbench.controller import ElasticController
from workbench.errors import InputError, WorkbenchError
from workbench.metrics import Metrics
from workbench.runtime.sampling import SEED_RANGE, SamplingParams
from workbench.scheduler import QueueFull, Scheduler

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream", "seed", "n",
                     "user", "stream_options", "frequency_penalty", "presence_penalty", "logprobs", "echo", "best_of",
                     "logit_bias", "suffix"}
CHAT_FIELDS = (COMPLETION_FIELDS - {"prompt", "echo", "best_of", "suffix"}) | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice"}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _field(body: dict, name: str, kinds, default=None, check=None, message: str = ""):
    """A typed request field: wrong types and values (NaN and infinities included) are a 400 naming it."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    bad = (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds) or (
        isinstance(value, float) and not math.isfinite(value)) or (check is not None and not check(value))
    if bad:
        raise APIError(400, f"'{name}' must be {message or kinds}, got {_short(value)}", param=name)
    return value


def _short(value) -> str:
    try:
        return json.dumps(value)[:60]
    except (TypeError, ValueError):
        return type(value).__name__


def sampling_defaults(engine) -> dict:
    """The model's own sampling defaults where its generation config sets them (as vLLM reads them),
    else OpenAI's (temperature 1.0, top_p 1.0, no top-k)."""
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    config = getattr(engine.model, "generation_config", None)
    explicit = config.to_diff_dict() if config is not None and hasattr(config, "to_diff_dict") else {}
    for key in defaults:
        value = explicit.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            defaults[key] = value
    return defaults


def _sampling(body: dict, max_tokens_field: str = "max_tokens", defaults: dict | None = None
              ) -> tuple[SamplingParams, bool]:
    d = defaults or {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    max_tokens = _field(body, max_tokens_field, int, 16, lambda v: v >= 1, "a positive integer")
    if max_tokens_field != "max_tokens":
        max_tokens = _field(body, "max_tokens", int, max_tokens, lambda v: v >= 1, "a positive integer")
    temperature = _field(body, "temperature", (int, float), d["temperature"], lambda v: 0 <= v <= 2,
                         "a number in [0, 2]")
    top_p = _field(body, "top_p", (int, float), d["top_p"], lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _field(body, "top_k", int, d["top_k"], lambda v: v >= 0, "a non-negative integer")
    seed = _field(body, "seed", int, None, lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1],
                  "an integer in [-2**63, 2**64 - 1]")
    penalties = {name: float(_field(body, name, (int, float), 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]"))
                 for name in ("presence_penalty", "frequency_penalty")}
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    if any(_field(body, name, int, 1, None, "an integer") != 1 for name in ("n", "best_of")):
        raise APIError(400, "only n=1 (and best_of=1) is supported", param="n")
    if body.get("logprobs") not in (None, False, 0) or body.get("echo"):
        raise APIError(400, "logprobs and echo are not supported; use /v1/score for log-probabilities",
                       param="logprobs")
    if body.get("logit_bias") not in (None, {}) or body.get("suffix") not in (None, ""):
        raise APIError(400, "logit_bias and suffix are not supported", param="logit_bias")
    stream = _field(body, "stream", bool, False, None, "a boolean")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                            top_k=top_k, seed=seed, stop=tuple(stop or ()), **penalties)
    try:
        params.validate()
    except InputError as e:
        raise APIError(400, str(e)) from None
    return params, stream


def _check_text(value, where: str = "body") -> None:
    """Strings must be encodable: JSON can spell a lone surrogate ("\\ud800"), which no tokenizer takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where} holds a lone Unicode surrogate, which is not text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"'{k}'" if where == "body" else where)
    elif isinstance(value, list):
        for v in value:
            _check_text(v, where)


class Server:
    """The app's state: a scheduler (and optionally a batcher and a controller) behind one model name."""

    def __init__(self, scheduler, model_name: str, api_key: str | None = None, batcher=None, metrics=None):
        self.scheduler, self.model_name, self.api_key = scheduler, model_name, api_key
        self.batcher, self.metrics = batcher, metrics
        self.defaults = sampling_defaults(scheduler.engine)
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/score", self.score, methods=["POST"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # ---- plumbing ------------------------------------------------------------------------------------------
    async def _not_found(self, request, exc):
        return APIError(404, f"no route {request.url.path}", code="not_found").response()

    async def _not_allowed(self, request, exc):
        return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()

    def _authorize(self, request: HTTPRequest) -> None:
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(401, "a valid API key is required (Authorization: Bearer ...)", code="invalid_api_key")

    async def _body(self, request: HTTPRequest, fields: set[str]) -> dict:
        too_big = APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="payload_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_big
        chunks, size = [], 0
        try:
            async for chunk in request.stream():  # read no more than the limit, whatever the header says
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise too_big
                chunks.append(chunk)
        except ClientDisconnect:  # the client's mistake (or its exit), not a failure of ours to log as one
            raise APIError(400, "the request body was cut off: the client left before sending all of it") from None
        raw = b"".join(chunks)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError(400, "the request body is not UTF-8") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"the request body is not valid JSON ({e.msg} at position {e.pos})") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        except ValueError:  # an integer literal beyond Python's digit limit (json raises plain ValueError)
            raise APIError(400, f"the request body holds an integer of over {sys.get_int_max_str_digits()} "
                                "digits") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            _check_text(body)
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        unknown = sorted(set(body) - fields)
        if unknown:
            raise APIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return body

    async def _handle(self, request: HTTPRequest, fn):
        try:
            self._authorize(request)
            return await fn(request)
        except APIError as e:
            return e.response()
        except QueueFull as e:
            return APIError(429, str(e), kind="rate_limit_error", code="queue_full").response()
        except InputError as e:
            return APIError(400, str(e)).response()
        except WorkbenchError as e:  # the scheduler is shut down or its loop died
            return APIError(503, str(e), kind="server_error", code="unavailable").response()
        except Exception as e:  # a bug serving this request: its client gets a JSON 500, the server goes on
            ident = uuid.uuid4().hex[:12]
            log.exception("error %s serving %s %s", ident, request.method, request.url.path)
            return APIError(500, f"internal error {ident} ({type(e).__name__}); see the server log",
                            kind="server_error", code="internal_error").response()

    # ---- routes ---------------------------------------------------------------------------------------------
    async def health(self, request):
        load = self.scheduler.load
        alive = self.scheduler.alive
        body = {"status": "ok" if alive else "unhealthy", "model": self.model_name,
                "policy": self.scheduler.engine.policy.name, **load}
        if not alive:
            body["error"] = self.scheduler.failure
        return JSONResponse(body, status_code=200 if alive else 503)

    async def prometheus(self, request):
        if self.metrics is None:
            return Response("", media_type="text/plain")
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")

    async def models(self, request):
        async def fn(_):
            return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                             "created": 0, "owned_by": "workbench"}]})
        return await self._handle(request, fn)

    async def completions(self, request):
        async def fn(request):
            body = await self._body(request, COMPLETION_FIELDS)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
            if not prompt:
                raise APIError(400, "'prompt' is empty", param="prompt")
            params, stream = _sampling(body, defaults=self.defaults)
            return await self._generate(request, prompt, False, params, stream, chat=False)
        return await self._handle(request, fn)

    async def chat_completions(self, request):
        async def fn(request):
            body = await self._body(request, CHAT_FIELDS)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise APIError(400, "'messages' must be a non-empty list of {'role': str, 'content': str}",
                               param="messages")
            if not any(m["content"] for m in messages):
                raise APIError(400, "every message is empty", param="messages")
            params, stream = _sampling(body, "max_completion_tokens", self.defaults)
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            return await self._generate(request, messages, True, params, stream, chat=True)
        return await self._handle(request, fn)

    async def score(self, request):
        async def fn(request):
            if self.batcher is None:
                raise APIError(404, "scoring is not enabled on this server")
            body = await self._body(request, {"model", "text"})
            text = body.get("text")
            if not isinstance(text, str) or not text:
                raise APIError(400, "'text' must be a non-empty string", param="text")
            result = await asyncio.wrap_future(self.batcher.score(text))
            return JSONResponse({"object": "score", "model": self.model_name, **result})
        return await self._handle(request, fn)

    # ---- generation -------------------------------------------------------------------------------------------
    async def _generate(self, http: HTTPRequest, prompt, is_chat: bool, params: SamplingParams, stream: bool,
                        chat: bool):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        request = self.scheduler.submit(prompt, params, chat=chat,
                                        listener=lambda p: loop.call_soon_threadsafe(pieces.put_nowait, p))
        ident = ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return StreamingResponse(self._events(http, request, pieces, ident, created, is_chat),
                                     media_type="text/event-stream")
        try:
            while True:  # drain the pieces, watching for the client going away
                try:
                    piece = await asyncio.wait_for(pieces.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        request.cancel()
                        return Response(status_code=499)
                    continue
                if piece is None:
                    break
        except asyncio.CancelledError:
            request.cancel()
            raise
        if request.error:
            raise APIError(500, request.error, kind="server_error", code="request_failed")
        return JSONResponse(self._body_of(request, ident, created, is_chat))

    def _usage(self, request) -> dict:
        p, c = len(request.seq.prompt_ids), len(request.seq.tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _extra(self, request) -> dict:
        t = request.timings
        return {"policies": list(request.policies), "queue_s": t.queue_s, "ttft_s": t.ttft_s, "e2e_s": t.e2e_s}

    def _body_of(self, request, ident: str, created: int, is_chat: bool) -> dict:
        reason = _openai_reason(request.finish_reason)
        if is_chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": request.text}, "finish_reason": reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": request.text, "finish_reason": reason, "logprobs": None}
        return {"id": ident, "object": "chat.completion" if is_chat else "text_completion", "created": created,
                "model": self.model_name, "choices": [choice], "usage": self._usage(request),
                "workbench": self._extra(request)}

    async def _events(self, http, request, pieces: asyncio.Queue, ident: str, created: int, is_chat: bool):
        kind = "chat.completion.chunk" if is_chat else "text_completion"

        def chunk(delta: str | None, reason: str | None = None, first: bool = False) -> str:
            if is_chat:
                d = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            body = {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            if reason is not None:
                body["usage"], body["workbench"] = self._usage(request), self._extra(request)
            return f"data: {json.dumps(body)}\n\n"

        try:
            if is_chat:
                yield chunk(None, first=True)
            while True:
                piece = await pieces.get()
                if piece is None:
                    break
                yield chunk(piece)
            if request.error:
                yield f"data: {json.dumps({'error': {'message': request.error, 'type': 'server_error'}})}\n\n"
            else:
                yield chunk(None, _openai_reason(request.finish_reason))
            yield "data: [DONE]\n\n"
        finally:  # the client went away mid-stream (or we are done): free the slot
            if not request.done:
                request.cancel()


def _openai_reason(reason: str | None) -> str | None:
    return {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}.get(reason, reason)


def build(engine, max_num_seqs: int = 8, max_queue: int = 64, max_model_len: int = 1024, api_key: str | None = None,
          elastic=None, score_batch: int = 8, score_timeout_ms: float = 2.0):
    """Scheduler, batcher, metrics, optional elastic controller (a ControllerConfig) and the Server around
    them; `server.close()` stops them all."""
    metrics = Metrics()
    scheduler = Scheduler(engine, max_num_seqs=max_num_seqs, max_queue=max_queue, max_model_len=max_model_len,
                          metrics=metrics)
    batcher = DynamicBatcher(engine, max_batch_size=score_batch, timeout_ms=score_timeout_ms)
    server = Server(scheduler, engine.name, api_key=api_key, batcher=batcher, metrics=metrics)
    server.controller = (ElasticController(scheduler, elastic, batcher=batcher, start=True, warm=True)
                         if elastic else None)  # warm: rungs packed and profiled before serving
    metrics.policy_changed(engine.policy)
    return server


def close(server) -> None:
    if getattr(server, "controller", None) is not None:
        server.controller.stop()
    server.batcher.close()
    server.scheduler.close()
