"""Progress on long work: a bar where a person watches it, plain log lines everywhere else.

tqdm's bar is made for a terminal: with stderr going to a file, a pipe, CI or a captured cell it either
prints nothing useful or one carriage-return soup. So the bar (tqdm.auto: a widget in a notebook) shows
only on a terminal or in a notebook kernel; elsewhere the same loop writes a line now and then,
"calibrating: 12/40 windows (30%), 8.1 s elapsed, about 19 s left" (every 10 s), and one at the end.

    for window in progress(windows, desc="calibrating", unit="window"):
        ...
    with progress(total=steps, desc="LoRA", unit="step") as bar:
        bar.update(1)
"""
from __future__ import annotations

import sys
import time
from typing import Iterable

LINE_EVERY_S = 10.0


def interactive() -> bool:
    """True in a terminal or a Jupyter kernel, where a live bar is what a person reads."""
    if "ipykernel" in sys.modules:
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, **tqdm_kwargs):
    """A tqdm bar, a `LineProgress`, or (enabled=False) a silent pass-through with the same methods."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not enabled:
        return LineProgress(iterable, total, desc, unit, silent=True)
    if interactive():
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, **tqdm_kwargs)
    return LineProgress(iterable, total, desc, unit)


class LineProgress:
    """The part of tqdm's interface the package uses, reporting as lines on stderr."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 silent: bool = False, every_s: float | None = None):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.silent, self.every_s = silent, LINE_EVERY_S if every_s is None else every_s
        self.n, self.postfix = 0, ""
        self.start = self._last = time.perf_counter()
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._write()

    def set_postfix(self, values: dict | None = None, refresh: bool = True, **kwargs) -> None:
        values = dict(values or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write(final=True)

    def _write(self, final: bool = False) -> None:
        if self.silent:
            return
        elapsed = time.perf_counter() - self.start
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        line = f"{self.desc or 'progress'}: {done} {self.unit}"
        if self.total:
            line += f" ({100 * self.n / self.total:.0f}%)"
        line += f", {elapsed:.1f} s elapsed"
        if not final and self.total and self.n:
            line += f", about {elapsed / self.n * (self.total - self.n):.0f} s left"
        if self.postfix:
            line += f" [{self.postfix}]"
        print(line + (" - done" if final else ""), file=sys.stderr, flush=True)
