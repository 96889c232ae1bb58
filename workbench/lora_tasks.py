"""The two LoRA demonstrations, with data made here (nothing is downloaded).

*Teach a skill*: write a date such as "March 5, 2021" in ISO 8601 ("2021-03-05"). Training and test dates
come from disjoint seeded draws; the score is exact match of the greedy answer.

*Recover compression loss*: text chunks of the calibration part of the corpus to train on (with the KL
loss, toward the unmodified model), scored on the held-out part with `workbench.evaluate`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from workbench.corpus import corpus_split
from workbench.errors import InputError

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DAYS_IN = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
DATE_INSTRUCTION = "Write this date in ISO 8601 format (YYYY-MM-DD), nothing else: {date}"


@dataclass(frozen=True)
class SkillCase:
    prompt: str
    answer: str

    def conversation(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


def date_cases(n: int, split: str = "train", seed: int = 0) -> list[SkillCase]:
    """`n` date-conversion cases. "train" and "test" never share a date: training dates fall on an even day
    of the year, test dates on an odd one."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    if n < 1:
        raise InputError(f"need at least one case, got n={n}")
    rng = random.Random(f"{split}-{seed}")
    cases = []
    while len(cases) < n:
        year, month = rng.randint(1950, 2049), rng.randint(1, 12)
        day = rng.randint(1, DAYS_IN[month - 1])
        if (sum(DAYS_IN[:month - 1]) + day) % 2 != (split == "test"):
            continue
        cases.append(SkillCase(DATE_INSTRUCTION.format(date=f"{MONTHS[month - 1]} {day}, {year}"),
                               f"{year:04d}-{month:02d}-{day:02d}"))
    return cases


def exact_match(engine, cases: list[SkillCase], max_new_tokens: int = 12, batch: int = 16) -> dict:
    """Greedy answers to each case's prompt; accuracy is the share whose stripped answer matches exactly."""
    answers = []
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        answers += engine.generate([c.prompt for c in chunk], max_new_tokens=max_new_tokens, chat=True)
    hits = [a.strip() == c.answer for a, c in zip(answers, cases)]
    return {"accuracy": sum(hits) / len(cases), "cases": len(cases),
            "samples": [{"prompt": c.prompt, "expected": c.answer, "got": a.strip()}
                        for c, a in list(zip(cases, answers))[:5]]}


def corpus_chunks(part: str = "calibration", min_chars: int = 500, limit: int | None = None) -> list[str]:
    """Paragraph-aligned chunks of at least `min_chars` characters of one part of the default corpus."""
    chunks, current = [], ""
    for paragraph in corpus_split(part).split("\n\n"):
        if not paragraph.strip():
            continue
        current += paragraph + "\n\n"
        if len(current) >= min_chars:
            chunks.append(current.strip())
            current = ""
            if limit is not None and len(chunks) >= limit:
                break
    return chunks
