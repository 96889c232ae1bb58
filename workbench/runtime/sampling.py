"""How a sequence picks its tokens and when it stops: sampling parameters, the sequence state, sampling,
and the finisher (end tokens, stop strings, budgets, and the text a client may be shown so far).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from workbench.errors import InputError

SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens and when it stops. `validate` names the first bad field.

    Penalties follow OpenAI's definition: each token's logit is lowered by `presence_penalty` once it
    has appeared in the completion and by `frequency_penalty` times its count. Stop strings are not
    part of the returned text (as OpenAI and vLLM return it)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        _check_number("temperature", self.temperature, 0.0, 10.0)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise InputError(f"seed must be an integer in [-2**63, 2**64 - 1], got {str(self.seed)[:40]}")
        if not isinstance(self.stop, tuple) or not all(isinstance(x, str) and x for x in self.stop):
            raise InputError("stop must be a list of non-empty strings")
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)

    @property
    def greedy(self) -> bool:
        """The next token is the argmax of the logits alone (the device can pick it)."""
        return self.temperature == 0 and not self.presence_penalty and not self.frequency_penalty


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_number(name: str, v, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if low_open else low <= v) and v <= high
    if not ok:  # NaN fails every comparison, so it lands here too
        raise InputError(f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {v!r}")


@dataclass(eq=False)
class Sequence:
    """One request's state through the loop."""

    prompt_ids: list[int]
    params: SamplingParams = SamplingParams()
    tokens: list[int] = field(default_factory=list)  # generated so far
    slot: int | None = None
    finish_reason: str | None = None  # "eos", "stop", "length", "cancelled" or "error"
    generator: torch.Generator | None = None
    text: str = ""  # decoded completion, maintained when stop strings are watched
    error: str | None = None  # why it failed, when finish_reason is "error"
    exception: BaseException | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fail(self, where: str, error: BaseException) -> None:
        """This sequence alone failed (its prompt, its sampling, or the step it was in)."""
        self.finish_reason, self.error = "error", f"failed {where}: {type(error).__name__}: {error}"
        self.exception = error


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           previous: list[int] | None = None) -> int:
    """One token id from (V,) logits: argmax at temperature 0, else temperature / top-k / top-p sampling;
    presence and frequency penalties first, over the `previous` completion tokens."""
    if (params.presence_penalty or params.frequency_penalty) and previous:
        ids, counts = torch.tensor(previous, device=logits.device).unique(return_counts=True)
        logits = logits.float().clone()
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.float()
    if params.temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p > params.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def new_generator(params: SamplingParams) -> torch.Generator | None:
    return None if params.seed is None else torch.Generator().manual_seed(params.seed)


class Finisher:
    """Decides when a sequence is done: an end-of-sequence token, a stop string, or its token budget."""

    def __init__(self, eos_ids: set[int], decode: Callable[[list[int]], str] | None):
        self.eos_ids, self.decode = eos_ids, decode

    def update(self, seq: Sequence, token: int) -> None:
        if token in self.eos_ids and not seq.params.ignore_eos:
            seq.finish_reason = "eos"
            return
        seq.tokens.append(token)
        if seq.params.stop and self.decode is not None:
            seq.text = self.decode(seq.tokens)
            at = first_stop(seq.text, seq.params.stop)
            if at is not None:
                seq.text = seq.text[:at]  # the stop string is not returned (OpenAI, vLLM)
                seq.finish_reason = "stop"
                return
        if len(seq.tokens) >= seq.params.max_new_tokens:
            seq.finish_reason = "length"

    def visible(self, seq: Sequence) -> str:
        """The completion text a client may be shown now: all of it once finished; while running, less
        a trailing half character and any tail that could still become a stop string."""
        text = seq.text if seq.params.stop else self.decode(seq.tokens)  # kept up to date when stops are watched
        return text if seq.finished else held_back(text, seq.params.stop)


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> str:
    """`text` less what must wait: a trailing U+FFFD (half a multi-byte character) and the longest tail
    that is the start of a stop string (it may yet complete it, and a stop string is never shown)."""
    text = text[:-1] if text.endswith("\ufffd") else text
    hold = max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)
    return text[:len(text) - hold]
