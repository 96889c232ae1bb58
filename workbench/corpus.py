"""Calibration and evaluation text, and the token windows every measurement scores.

Default corpus: the Python language reference that ships with CPython (`pydoc_data.topics`, about 465,000
characters of human-written technical English), split by topic name into a calibration part and a
held-out part with a stable hash, so every machine gets the same split for the same Python version
(recorded with every result, since the text varies a little between versions). Any UTF-8 file can
stand in for it.

Windows start with BOS when the model uses one (`workbench.tokens`), as the model saw text in training;
the BOS is context only, never a scored target.
"""
from __future__ import annotations

import platform
import zlib
from pathlib import Path

import torch

from workbench.errors import InputError
from workbench.tokens import bos_id

HELDOUT_EVERY = 5  # one topic in five is held out
DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 4096


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics
    return dict(topics)


def corpus_split(part: str = "heldout") -> str:
    """The calibration or held-out part of the Python reference text (topics in sorted order).

    >>> len(corpus_split("heldout")) > 10_000
    True
    """
    topics = pydoc_topics()
    return "\n\n".join(topics[n].strip() for n in topic_names(part))


def topic_names(part: str) -> list[str]:
    """Sorted topic names of one part; a stable hash of the name decides, so the split never drifts."""
    if part not in ("heldout", "calibration"):
        raise InputError(f"corpus part must be 'heldout' or 'calibration', got {part!r}")
    return [n for n in sorted(pydoc_topics()) if (zlib.crc32(n.encode()) % HELDOUT_EVERY == 0) == (part == "heldout")]


def load_text(corpus: str | None = None, part: str = "heldout") -> tuple[str, str]:
    """(text, description): the default corpus part, or a UTF-8 text file."""
    if corpus in (None, "pydoc"):
        return corpus_split(part), f"pydoc_data.topics:{part} (Python {platform.python_version()})"
    path = Path(corpus).expanduser()
    if not path.exists():
        raise InputError(f"corpus file not found: {corpus}")
    if not path.is_file():
        raise InputError(f"corpus must be a regular text file, and {corpus} is not one")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"corpus file is not UTF-8 text: {corpus}") from None
    except OSError as e:
        raise InputError(f"cannot read corpus file {corpus}: {e.strerror}") from None
    if not text.strip():
        raise InputError(f"corpus file is empty: {corpus}")
    return text, str(path)


def token_windows(tokenizer, text: str, seq_len: int = DEFAULT_SEQ_LEN,
                  max_tokens: int = DEFAULT_MAX_TOKENS) -> list[torch.Tensor]:
    """Non-overlapping windows of at most `seq_len` token ids, `max_tokens` scored positions in all.

    A window scores every position after its first: with a BOS the window is BOS + text and every text
    token is a target; without one the first text token is context only."""
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    bos = bos_id(tokenizer)
    lead = torch.tensor([bos], dtype=ids.dtype) if bos is not None else ids[:0]
    step = seq_len - len(lead)
    windows, scored = [], 0
    for start in range(0, len(ids) - (0 if len(lead) else 1), step):
        window = torch.cat([lead, ids[start:start + step]])
        take = min(len(window), max_tokens - scored + 1)
        if take < 2:
            break
        windows.append(window[:take])
        scored += take - 1
    if not windows:
        raise InputError("the evaluation text is too short: it needs at least 2 tokens")
    return windows
