"""The base of every live panel: a layout, a busy indicator, errors shown in the panel, timings.

A panel is an ipywidgets box (`panel.layout`, or `display(panel)`) whose controls call `refresh`.
Sliders use `continuous_update=False`: one update when the handle is released, not one per pixel.
Every update runs inside `_work`, which shows "working…" while it runs, records how long the update
took (`panel.timings`, what experiments/widgets/panel_latency.py reports) and turns any error into a
red line in the panel instead of a traceback and a dead widget.
"""
from __future__ import annotations

import html
import threading
import time
import weakref

import ipywidgets as W

GENERATION_DELAY_S = 0.3  # the text waits this long after an update, so a burst of changes starts none


class Panel:
    css = "wb-panel"  # stable class names: the browser tests select on them

    def __init__(self, title: str):
        self.status = W.HTML(value="", layout=W.Layout(min_height="1.6em"))
        self.status.add_class("wb-status")
        self.timings: list[float] = []  # ms per update, slider event to updated figures
        self.title = W.HTML(f"<b>{html.escape(title)}</b>")
        self.layout: W.Box | None = None

    def _box(self, *children) -> W.VBox:
        box = W.VBox([self.title, *children, self.status])
        box.add_class(self.css)
        box.add_class("wb-" + type(self).__name__.lower())
        self.layout = box
        return box

    def _ipython_display_(self):
        from IPython.display import display
        display(self.layout)

    def display(self):
        self._ipython_display_()

    def _work(self, fn, *args) -> bool:
        """Run one update with the busy indicator; True when it succeeded."""
        self.status.value = "<span class='wb-busy' style='color:#888'>working…</span>"
        t0 = time.perf_counter()
        try:
            fn(*args)
        except Exception as e:  # shown in the panel: a widget callback's traceback would be lost
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.status.value = f"<span class='wb-error' style='color:#c62828'>{html.escape(first)}</span>"
            return False
        ms = (time.perf_counter() - t0) * 1e3
        self.timings.append(ms)
        self.status.value = f"<span class='wb-idle' style='color:#888'>updated in {ms:.0f} ms</span>"
        return True


    # ---- the generated text, streamed in the background ----------------------------------------------------
    def start_generation(self, engine, prompt: str, max_new_tokens: int, target: W.HTML) -> None:
        """Stream the continuation of `prompt` (text as the model sees it: template applied, truncated)
        into `target` off the callback path: the figures and numbers are already updated; the next update
        of any panel on this engine cancels it between two tokens, or before it starts (it waits
        GENERATION_DELAY_S first: while a slider is being moved key by key, no prefill is started)."""
        self.wait(cancel=True, engine=engine)
        target.value = "<i style='color:#888'>generating…</i>"
        cancel = threading.Event()

        def run():
            if cancel.wait(GENERATION_DELAY_S):  # a quick follow-up change: this text was never wanted
                return
            out = ""
            try:
                for piece in engine.stream(prompt, max_new_tokens=max_new_tokens, chat=False):
                    if cancel.is_set():
                        return
                    out += piece
                    target.value = f"<div class='wb-generated'>{html.escape(out)}</div>"
                if not out:
                    target.value = "<div class='wb-generated'><i>(the model ended without text)</i></div>"
            except Exception as e:  # shown, never a dead panel
                target.value = f"<span class='wb-error' style='color:#c62828'>{html.escape(str(e))}</span>"

        thread = threading.Thread(target=run, daemon=True)
        GENERATIONS[engine] = (thread, cancel)  # one per engine: panels sharing it cancel each other's
        self._engine = engine
        thread.start()

    def wait(self, cancel: bool = False, engine=None) -> None:
        """Block until the engine's background generation (if any) has finished; `cancel` stops it first."""
        engine = engine or getattr(self, "_engine", None)
        running = GENERATIONS.get(engine) if engine is not None else None
        if running is not None:
            thread, stop = running
            if cancel:
                stop.set()
            thread.join()


# engine -> its panels' background generation (thread, cancel event): held here, not on the engine
GENERATIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def metrics_html(**items) -> str:
    """A one-line table of named numbers, each in a span with a stable class (wb-metric-NAME)."""
    cells = "".join(f"<span class='wb-metric wb-metric-{k}' style='margin-right:1.2em'><b>{k.replace('_', ' ')}</b> "
                    f"<span class='wb-value'>{v}</span></span>" for k, v in items.items())
    return f"<div class='wb-metrics'>{cells}</div>"
