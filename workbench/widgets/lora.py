"""LoRATrainer: set LoRA's hyperparameters, start (and stop) a run, watch the loss fall, compare answers."""
from __future__ import annotations

import html
import threading

import ipywidgets as W

from workbench.widgets.panel import Panel, metrics_html

TARGETS = {"q, v": ("q", "v"), "q, k, v, o": ("q", "k", "v", "o"), "all linear": "all-linear"}


class LoRATrainer(Panel):
    """Train LoRA adapters on `data` (texts, conversations or a JSONL path) with the engine's current policy.

    Start attaches fresh adapters with the chosen settings and trains in the background: the progress bar
    and the loss curve move step by step, Stop ends the run after the current step (the adapters keep
    the last completed one). Before the first step and after the last, the model answers `prompts`
    (greedy) and the two answers sit side by side; with `expected` answers the exact-match share is shown.

    >>> trainer = LoRATrainer(engine, conversations, prompts=[...], expected=[...])   # doctest: +SKIP
    >>> trainer.start.click(); trainer.wait()
    """

    def __init__(self, engine, data, prompts=(), expected=None, steps: int = 30, lr: float = 2e-3,
                 batch: int = 8, max_new_tokens: int = 16, loss: str = "lm"):
        super().__init__("LoRA fine-tuning")
        from workbench.viz import loss_figure
        if expected is not None and len(expected) != len(prompts):
            raise ValueError("expected needs one answer per prompt")
        self.engine, self.data, self.max_new_tokens = engine, data, max_new_tokens
        self.prompts, self.expected = list(prompts), None if expected is None else list(expected)
        self.rank = W.Dropdown(options=[2, 4, 8, 16, 32, 64], value=16, description="rank r")
        self.alpha = W.FloatText(value=32.0, description="alpha")
        self.targets = W.Dropdown(options=list(TARGETS), value="q, v", description="targets")
        self.dropout = W.FloatSlider(value=0.1, min=0.0, max=0.5, step=0.05, description="dropout",
                                     continuous_update=False)
        self.lr = W.FloatLogSlider(value=lr, base=10, min=-5, max=-1.5, step=0.25, description="learning rate",
                                   readout_format=".1e", continuous_update=False)
        self.steps = W.IntSlider(value=steps, min=1, max=500, description="steps", continuous_update=False)
        self.steps.add_class("wb-lora-steps")
        self.batch = W.IntSlider(value=batch, min=1, max=32, description="batch", continuous_update=False)
        self.loss = W.Dropdown(options=[("next-token (lm)", "lm"), ("KL to the unmodified model", "kl")],
                               value=loss, description="loss")
        self.start = W.Button(description="Start", button_style="success", icon="play")
        self.start.add_class("wb-lora-start")
        self.stop = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.stop.add_class("wb-lora-stop")
        self.progress = W.IntProgress(value=0, min=0, max=steps, description="step 0")
        self.progress.add_class("wb-lora-progress")
        self.metrics = W.HTML()
        self.figure = loss_figure(title="training loss (live)", widget=True)
        figure_box = W.Box([self.figure])
        figure_box.add_class("wb-lora-loss")
        self.answers = W.HTML()
        self.answers.add_class("wb-lora-answers")
        for w in (self.rank, self.alpha, self.targets, self.dropout, self.lr, self.steps, self.batch, self.loss):
            w.style.description_width = "initial"
        self._box(W.HBox([self.rank, self.alpha, self.targets, self.dropout]),
                  W.HBox([self.lr, self.steps, self.batch, self.loss]),
                  W.HBox([self.start, self.stop, self.progress]), self.metrics, figure_box, self.answers)
        self.start.on_click(lambda _: self.run())
        self.stop.on_click(lambda _: self._stop.set())
        self._stop, self._thread = threading.Event(), None
        self.result = None
        self.before: list[str] = []
        self.after: list[str] = []

    # ---- a run -----------------------------------------------------------------------------------------------
    def run(self) -> None:
        """What Start does: a fresh run in the background (ignored while one is running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.wait(cancel=True, engine=self.engine)  # a panel's background text on this engine stops first
        self._stop.clear()
        self.start.disabled, self.stop.disabled = True, False
        self.status.value = "<span class='wb-busy' style='color:#888'>training…</span>"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from workbench.lora import attach_lora, train, unload
        try:
            if getattr(self.engine.model, "workbench_lora", None) is not None:
                unload(self.engine)  # Start means fresh adapters with the settings shown
            self.before, self.after = self._answer(), []
            self._show_answers()
            handle = attach_lora(self.engine, r=self.rank.value, alpha=self.alpha.value,
                                 targets=TARGETS[self.targets.value], dropout=self.dropout.value)
            total = self.steps.value
            self.progress.max, self.progress.value, self.progress.description = total, 0, f"step 0/{total}"
            with self.figure.batch_update():
                self.figure.data[0].x, self.figure.data[0].y = [], []
            self.result = train(self.engine, self.data, steps=total, lr=self.lr.value, batch=self.batch.value,
                                loss=self.loss.value, stop=self._stop, progress=False,
                                callback=lambda step, value: self._on_step(step, value, total))
            self.after = self._answer()
            self._show_answers()
            r = self.result
            self.metrics.value = metrics_html(
                steps=f"{r.steps}{' (stopped)' if r.stopped else ''}",
                loss=f"{r.losses[0]:.4f} → {r.losses[-1]:.4f}" if r.losses else "-",
                tokens_per_s=f"{r.tokens_per_s:.0f}", trainable_params=f"{handle.trainable:,}",
                **self._accuracy())
            self.status.value = f"<span class='wb-idle' style='color:#888'>trained {r.steps} steps in {r.seconds:.1f} s</span>"
        except Exception as e:  # shown in the panel, never a dead thread with a lost traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.status.value = f"<span class='wb-error' style='color:#c62828'>{html.escape(first)}</span>"
        finally:
            self.start.disabled, self.stop.disabled = False, True

    def _on_step(self, step: int, value: float, total: int) -> None:
        fig = self.figure.data[0]
        with self.figure.batch_update():
            fig.x, fig.y = (*fig.x, step), (*fig.y, value)
        self.progress.value, self.progress.description = step, f"step {step}/{total}"
        self.metrics.value = metrics_html(step=f"{step}/{total}", loss=f"{value:.4f}")

    def wait(self, cancel: bool = False, engine=None) -> None:
        """Block until the training run (and any background text) has finished; `cancel` stops them."""
        if self._thread is not None and engine is None:
            if cancel:
                self._stop.set()
            self._thread.join()
        super().wait(cancel, engine)

    # ---- answers before and after ----------------------------------------------------------------------------
    def _answer(self) -> list[str]:
        if not self.prompts:
            return []
        return [a.strip() for a in self.engine.generate(self.prompts, max_new_tokens=self.max_new_tokens)]

    def _accuracy(self) -> dict:
        if self.expected is None or not self.after:
            return {}
        score = lambda answers: sum(a == e for a, e in zip(answers, self.expected)) / len(self.expected)
        return {"exact_match": f"{score(self.before):.0%} → {score(self.after):.0%}"}

    def _show_answers(self) -> None:
        if not self.prompts:
            return
        head = "<tr><th>prompt</th>" + ("<th>expected</th>" if self.expected else "") + \
               "<th>before</th><th>after</th></tr>"
        rows = []
        for i, p in enumerate(self.prompts):
            cells = [p] + ([self.expected[i]] if self.expected else [])
            cells += [self.before[i] if i < len(self.before) else "", self.after[i] if i < len(self.after) else "…"]
            rows.append("<tr>" + "".join(f"<td style='padding:2px 8px'>{html.escape(c)}</td>" for c in cells) + "</tr>")
        self.answers.value = f"<table class='wb-answers'>{head}{''.join(rows)}</table>"
