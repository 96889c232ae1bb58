"""transformers' `generate` for the architectures the batch runner does not cover (Gemma 3, DeepSeek,
...), given the workbench's sampling rules: the same stop-string rule (the stop string is not returned),
OpenAI's presence and frequency penalties, seeds, and dense prefill.
"""
from __future__ import annotations

import threading
from typing import Any, Iterator

import torch

from workbench.runtime.sampling import SamplingParams, first_stop, held_back


def generate(engine, batch: dict, params: SamplingParams) -> list[str]:
    """Completions of a left-padded batch (`engine.encode`)."""
    kwargs = generation_kwargs(engine, batch, params)
    with engine.exclusive(), engine.dense_prefill():
        out = engine.model.generate(**batch, **kwargs)
    new = out[:, batch["input_ids"].shape[1]:]
    return [cut_at_stop(text, params.stop) for text in engine.tokenizer.batch_decode(new, skip_special_tokens=True)]


def texts(engine, batch: dict, params: SamplingParams) -> Iterator[str]:
    """The visible completion of a one-prompt batch as it grows (never a stop string, nor its start)."""
    text = ""
    for piece in _pieces(engine, batch, params):
        text += piece
        if cut_at_stop(text, params.stop) != text:
            break
        yield held_back(text, params.stop)
    yield cut_at_stop(text, params.stop)


def _pieces(engine, batch: dict, params: SamplingParams) -> Iterator[str]:
    from transformers import TextIteratorStreamer
    kwargs = generation_kwargs(engine, batch, params)
    streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def work():
        try:
            with torch.inference_mode(), engine.exclusive(), engine.dense_prefill():
                engine.model.generate(**batch, **kwargs, streamer=streamer)
        except BaseException as e:  # surfaced in the caller's thread below
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from (piece for piece in streamer if piece)
    thread.join()
    if errors:
        raise errors[0]


def generation_kwargs(engine, batch: dict, params: SamplingParams) -> dict:
    engine.check_context(batch["input_ids"].shape[1], params.max_new_tokens)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    kwargs: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, pad_token_id=engine.tokenizer.pad_token_id)
    if params.temperature > 0:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if params.stop:
        kwargs.update(stop_strings=list(params.stop), tokenizer=engine.tokenizer)
    if params.presence_penalty or params.frequency_penalty:
        kwargs["logits_processor"] = [Penalties(params, batch["input_ids"].shape[1])]
    return kwargs


def cut_at_stop(text: str, stops) -> str:
    """transformers' `generate` keeps the stop string; the workbench returns the text before it."""
    at = first_stop(text, tuple(stops))
    return text if at is None else text[:at]


class Penalties:
    """OpenAI's presence and frequency penalties as a transformers logits processor (completion only)."""

    def __init__(self, params: SamplingParams, prompt_len: int):
        self.params, self.prompt_len = params, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row in range(scores.shape[0]):
            done = input_ids[row, self.prompt_len:]
            if done.numel():
                ids, counts = done.unique(return_counts=True)
                scores[row, ids] -= self.params.presence_penalty + self.params.frequency_penalty * counts.to(scores.dtype)
        return scores
