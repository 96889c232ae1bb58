"""Text to token ids the way the model was trained to see them: the one place every path tokenizes.

Prompts, chat conversations, calibration and evaluation windows, LoRA data, the server and the scoring
batcher all come through here. Why one place: most models (Llama 3, Gemma, Mistral) begin every
training sequence with a BOS token and run out of distribution without it. A Gemma 3 270M asked "What
is the capital of France?" without its BOS answers "???????????????"; with it, "The capital of France is
Paris." Chat templates write BOS themselves, so a rendered conversation is tokenized without adding
special tokens: a doubled BOS is as wrong as a missing one. SmolLM2 (the default model) uses no BOS.

    ids = encode_text(tokenizer, "Once upon a time")                    # [BOS] + text, if the model uses BOS
    ids = encode_chat(tokenizer, [{"role": "user", "content": "Hi"}])  # exactly the template's tokens
"""
from __future__ import annotations

from typing import Sequence

from workbench.errors import InputError

Prompt = str | Sequence[dict]  # a plain string, or chat messages [{"role": ..., "content": ...}]


def bos_id(tokenizer) -> int | None:
    """The BOS id the tokenizer puts in front of plain text (its own rule), or None when it adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of plain text: BOS first when the model uses one, and no end token (text continues)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = bos_id(tokenizer)
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as the chat template writes it (special tokens included, as text)."""
    check_messages(messages)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation: the template's own tokens, nothing added (the template writes BOS).
    A model without a template gets the messages' contents, one per line, as plain text."""
    if not has_chat_template(tokenizer):
        check_messages(messages)
        return encode_text(tokenizer, "\n".join(m["content"] for m in messages))
    return tokenizer(render_chat(tokenizer, messages, add_generation_prompt), add_special_tokens=False)["input_ids"]


def check_messages(messages) -> None:
    if isinstance(messages, str) or not isinstance(messages, Sequence) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise InputError("a chat prompt must be a non-empty list of {'role': str, 'content': str} messages")


def check_text(text: str, what: str = "prompt") -> None:
    """Refuse strings that are not text: a lone surrogate (from JSON's "\\ud800", or a command-line
    argument that was not UTF-8) makes every tokenizer fail deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the {what} is not valid text: it holds a lone surrogate (bytes that were not UTF-8?)") from None


def encode_prompt(tokenizer, prompt: Prompt, chat: bool) -> list[int]:
    """A prompt's ids: a string is wrapped as one user message when `chat`, else encoded as text."""
    for text in [prompt] if isinstance(prompt, str) else [m.get("content", "") for m in prompt if isinstance(m, dict)]:
        if isinstance(text, str):
            check_text(text)
    if isinstance(prompt, str):
        if not prompt:
            raise InputError("prompt is empty")
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}]) if chat else encode_text(tokenizer, prompt)
    ids = encode_chat(tokenizer, prompt)
    if not ids:
        raise InputError("prompt is empty after tokenization")
    return ids
