"""The batch runner: the one decode loop. `Engine.generate` / `stream`, the `Scheduler` and `workbench bench`
all drive it.

    runner = engine.runner(slots=4, capacity=512)
    for took in runner.run([Sequence(ids, SamplingParams(max_new_tokens=32))]):   # a whole batch
        ...
    runner.admit(new_sequences); runner.step(); runner.retire()                    # step by step

Sequences join free cache slots between steps and are prefilled together in one pass (padded prompts,
within a token budget, so a burst of prompts neither runs out of memory nor stalls decoding for long);
every running sequence takes one token per step; finished ones leave and free their slot at once.

It owns a decoder, a slot cache and the step (a CUDA graph on GPU), and builds the decoder and graphs,
keeping the cache, for each set of modules the engine holds (`engine.version`) and for the reference
(`engine.in_reference`: a graph would replay the policy). It keeps the builds of the last few versions,
so a switch back to a policy it ran replays the graphs it captured then (`workbench.policy_builds`). One sequence's failure (its prompt, its
sampling) fails that sequence alone; a failed step fails the sequences it was stepping and the runner
rebuilds; nothing is left holding a slot.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Iterator

import torch

from workbench.errors import InputError
from workbench.policy_builds import KEEP_POLICIES
from workbench.runtime.cache import SlotKVCache
from workbench.runtime.decoder import Decoder
from workbench.runtime.graphs import GraphedPrefill, GraphedStep
from workbench.runtime.sampling import Finisher, Sequence, new_generator, sample

log = logging.getLogger(__name__)

PREFILL_TOKENS = 4096  # padded prompt tokens per batched prefill: bounds its activations and its stall


def padded_cost(lengths: list[int]) -> int:
    """Positions a right-padded batch of these prompt lengths computes."""
    return len(lengths) * max(lengths, default=0)


def padded_groups(items: list, length: Callable, budget: int = PREFILL_TOKENS) -> list[list]:
    """Split `items` (in order) into batches whose padded size stays within `budget`; a prompt longer than
    the budget goes alone."""
    groups, group = [], []
    for item in items:
        if group and padded_cost([length(i) for i in group + [item]]) > budget:
            groups.append(group)
            group = []
        group.append(item)
    return groups + [group] if group else groups


class BatchRunner:
    """Decoding for one engine over one slot cache (see the module docstring)."""

    def __init__(self, engine, slots: int, capacity: int, graphed_prefill: bool = False,
                 finisher: Finisher | None = None):
        self.engine = engine
        self.cache = SlotKVCache.for_model(engine.model, slots, capacity)
        self.finisher = finisher or engine.finisher()
        self.graphed_prefill = graphed_prefill
        self.running: list[Sequence] = []
        self.decoder: Decoder | None = None
        self.graph: GraphedStep | None = None
        self._prefill = None
        self._built = None  # the (engine epoch, version, in reference) the decoder and graphs in use are for
        self._builds: OrderedDict[tuple, tuple] = OrderedDict()  # that key -> (decoder, graph, prefill)

    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def free_slots(self) -> int:
        return self.cache.free_slots

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    # ---- building ------------------------------------------------------------------------------------
    def _ensure(self) -> None:
        key = (self.engine.epoch, self.engine.version, self.engine.in_reference)
        if self._built == key:
            return
        for old in [k for k in self._builds if k[0] != key[0]]:
            del self._builds[old]  # built before the engine's modules changed behind its policy
        build = self._builds.get(key)
        if build is None:
            build = self._build()
            self._builds[key] = build
            while len(self._builds) > KEEP_POLICIES + 1:  # the kept policies, and the reference
                self._builds.popitem(last=False)
        self._builds.move_to_end(key)
        self.decoder, self.graph, self._prefill = build
        self._built = key

    def _build(self) -> tuple:
        decoder = Decoder(self.engine.model)
        graph, prefill = None, decoder.prefill_batch
        if self.engine.use_cuda_graphs and decoder.capturable and not self.engine.in_reference:
            with torch.inference_mode():
                graph = GraphedStep(decoder, self.cache)
            self.engine.reset_stats()  # the warm-up steps are not traffic
            if self.graphed_prefill:
                prefill = GraphedPrefill(decoder, self.cache)
        return decoder, graph, prefill

    @property
    def built_versions(self) -> list[int]:
        """The engine versions this runner holds a decoder (and, on GPU, graphs) for, oldest first."""
        return [key[1] for key in self._builds]

    def rebuild(self) -> None:
        """Drop the decoders and graphs; the next admission or step builds them anew (the cache is kept)."""
        self._built = None
        self._builds.clear()

    @property
    def prefill_graphs(self) -> GraphedPrefill | None:
        self._ensure()
        return self._prefill if isinstance(self._prefill, GraphedPrefill) else None

    # ---- one sequence at a time --------------------------------------------------------------------------
    def check(self, seq: Sequence) -> None:
        """Raise before any work when `seq` cannot run here."""
        seq.params.validate()
        if not seq.prompt_ids:
            raise InputError("prompt is empty after tokenization")
        self.cache.check_fits(len(seq.prompt_ids), seq.params.max_new_tokens)

    def admit(self, seqs: list[Sequence], budget: int = PREFILL_TOKENS) -> list[Sequence]:
        """Put `seqs` (at most `free_slots`) into free slots, prefill them together within `budget` padded
        tokens per pass, and take each one's first token; returns them (each has a token, or failed)."""
        if len(seqs) > self.free_slots:
            raise InputError(f"{len(seqs)} sequences for {self.free_slots} free slots")
        self._ensure()
        ready = []
        for seq in seqs:
            try:
                self.check(seq)
                seq.slot = self.cache.acquire()
                seq.generator = new_generator(seq.params)
            except Exception as e:
                seq.fail("at admission", e)
                continue
            ready.append(seq)
        for group in padded_groups(ready, lambda s: len(s.prompt_ids), budget):
            self._prefill_group(group)
        return seqs

    def _prefill_group(self, group: list[Sequence]) -> None:
        """One prefill pass for `group`; when it fails, each sequence alone, so only the culprit fails."""
        device = self.cache.lengths.device
        try:
            prompts = [torch.tensor(s.prompt_ids, dtype=torch.long, device=device) for s in group]
            with self.engine.dense_prefill():
                logits = self._prefill(self.cache, [s.slot for s in group], prompts)
        except Exception as e:
            if len(group) == 1:
                self._release(group[0])
                group[0].fail("in prefill", e)
                return
            for seq in group:
                self._prefill_group([seq])
            return
        for seq, row in zip(group, logits):
            self.running.append(seq)
            self._sample(seq, row)

    def step(self) -> list[Sequence]:
        """One decode step for every running sequence: each takes a token (or fails); returns them."""
        if not self.running:
            return []
        self._ensure()
        running = list(self.running)
        ids = torch.zeros(self.cache.slots, dtype=torch.long)
        active = torch.zeros(self.cache.slots, dtype=torch.long)
        for seq in running:
            ids[seq.slot], active[seq.slot] = seq.tokens[-1], 1
        device = self.cache.lengths.device
        try:
            logits = (self.graph or self.decoder.step)(self.cache, ids.to(device))
            self.cache.advance(active.to(device), [s.slot for s in running])
            chosen = logits.argmax(-1).tolist() if all(s.params.greedy for s in running) else None
        except Exception as e:
            log.error("a decode step failed for %d sequences: %s: %s", len(running), type(e).__name__, e)
            for seq in running:
                seq.fail("in a decode step", e)
            self.retire()
            self.rebuild()
            return running
        for seq in running:
            if chosen is not None:  # one small transfer instead of S x V logits
                self._take(seq, chosen[seq.slot])
            else:
                self._sample(seq, logits[seq.slot])
        return running

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        try:
            token = sample(logits, seq.params, seq.generator, seq.tokens)
        except Exception as e:
            seq.fail("in sampling", e)
            return
        self._take(seq, token)

    def _take(self, seq: Sequence, token: int) -> None:
        try:
            self.finisher.update(seq, token)
        except Exception as e:  # decoding its text (a stop-string check) failed
            seq.fail("decoding its text", e)
            return
        if not seq.finished and len(seq.prompt_ids) + len(seq.tokens) >= self.cache.capacity:
            seq.finish_reason = "length"

    def cancel(self, seq: Sequence) -> None:
        """End `seq` now (its slot is freed by the next `retire`)."""
        if not seq.finished:
            seq.finish_reason = "cancelled"

    def retire(self) -> list[Sequence]:
        """Free the slots of finished sequences; returns them."""
        done = [s for s in self.running if s.finished]
        for seq in done:
            self._release(seq)
        self.running = [s for s in self.running if not s.finished]
        return done

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.cache.release(seq.slot)
            seq.slot = None

    def raw_step(self, ids: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """The decode step alone on device ids (S,), no bookkeeping: what a benchmark times. `eager`: the
        decoder's own step even where a graph exists (a profiler sees kernel boundaries a replay hides)."""
        self._ensure()
        return (self.decoder.step if eager or self.graph is None else self.graph)(self.cache, ids)

    # ---- a whole batch ---------------------------------------------------------------------------------------
    def run(self, seqs: list[Sequence]) -> Iterator[list[Sequence]]:
        """Run `seqs` to completion; yields after each prefill and each step with the sequences that took
        a token (streaming reads them). More sequences than slots wait for a free one. Every sequence is
        checked before any work starts; a failed one raises, as a whole batch has one caller."""
        for seq in seqs:
            self.check(seq)
        waiting = list(seqs)
        try:
            while waiting or self.running:
                joined = [waiting.pop(0) for _ in range(min(len(waiting), self.free_slots))]
                if joined:
                    self.admit(joined)
                    self._raise_failures(joined)
                    yield joined
                    self.retire()
                if not self.running:
                    continue
                self._ensure()
                if self.graph is not None and not waiting and all(s.params.greedy for s in self.running):
                    yield from self._pipelined()
                    continue
                took = self.step()
                self._raise_failures(took)
                yield took
                self.retire()
        finally:  # a caller that stops early (a closed stream, an error) leaves no sequence holding a slot
            for seq in seqs:
                self.cancel(seq)
            self.retire()

    @staticmethod
    def _raise_failures(seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.finish_reason == "error":
                raise seq.exception

    def _pipelined(self) -> Iterator[list[Sequence]]:
        """Greedy decoding with the host one step behind the GPU: step t+1 is queued (its input is step t's
        argmax, fed back on the device) before the host reads step t's tokens, so the host's work (stop
        checks, streaming) overlaps the GPU's instead of idling it. A sequence that finishes at step t has
        one extra token computed for it at t+1, which is dropped; its slot is freed after that step."""
        step, cache = self.graph, self.cache
        ids = torch.zeros(cache.slots, dtype=torch.long)
        active = torch.zeros(cache.slots, dtype=torch.long)
        for seq in self.running:
            ids[seq.slot], active[seq.slot] = seq.tokens[-1], 1
        step.ids.copy_(ids.to(step.ids.device))
        step.active.copy_(active.to(step.active.device))
        host = [torch.empty(cache.slots, dtype=torch.long, pin_memory=True) for _ in range(2)]
        done = [torch.cuda.Event(), torch.cuda.Event()]

        def launch(i: int) -> None:
            step.greedy_graph.replay()
            host[i % 2].copy_(step.ids, non_blocking=True)
            done[i % 2].record()

        i = 0
        launch(0)
        while self.running:
            launch(i + 1)  # queued before the host looks at step i
            done[i % 2].synchronize()
            tokens = host[i % 2].tolist()
            for seq in self.running:
                cache.host_lengths[seq.slot] += 1
                self._take(seq, tokens[seq.slot])
            yield list(self.running)
            if any(s.finished for s in self.running):
                for seq in self.running:
                    if seq.finished:
                        active[seq.slot] = 0
                step.active.copy_(active.to(step.active.device))  # ordered after the step in flight
                self.retire()
            i += 1
        done[i % 2].synchronize()  # the last, unneeded step
