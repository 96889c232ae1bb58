"""The Engine: the one facade that notebooks, widgets, the CLI and the server go through.

    engine = Engine.from_pretrained("default", policy=Policy.identity())
    engine.generate(["What is the capital of France?"], max_new_tokens=32)
    engine.reconfigure(new_policy)   # live: wrappers swap, weights are not reloaded
    engine.stats()                   # measured facts, not configured ones

By default the unmodified weights stay in memory as the reference (for KL divergence, exact `unwrap`
and live switching); `keep_reference=False` lets transforms drop what they no longer need, and a later
reconfigure that needs the originals reloads them from the model's source.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Iterator, Sequence

import torch

from workbench.errors import InputError, PolicyError
from workbench.models import LoadedModel, load, model_summary
from workbench.policy import Policy
from workbench.tokens import Prompt, encode_prompt
from workbench.transforms import apply_policy, bypassed, unwrap, wrappers

log = logging.getLogger(__name__)

CACHE_QUANTUM = 256  # KV capacity is rounded up to this, so captured decode graphs get reused
MAX_SLOTS = 64  # sequences decoded together by `generate`; more wait for a free slot


class Engine:
    def __init__(self, loaded: LoadedModel, policy: Policy | None = None, keep_reference: bool = True,
                 calibration: Any = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.keep_reference = keep_reference
        self.calibration = calibration
        self.policy = Policy.identity()
        self.last_latency_ms: float | None = None
        self._dropped: set[str] = set()  # wrappers whose original weight was released (keep_reference=False)
        self._owned = False  # CPU weights copied out of the file's memory map (done once, when lean)
        # packed weights by (original, format): switching back to a seen format needs no requantization;
        # off when the engine runs lean (keep_reference=False), where memory is the point
        self.store_cache: dict | None = {} if keep_reference else None
        self._lock = threading.RLock()  # one forward at a time: widgets and servers call from threads
        self._decode_states: dict = {}  # (slots, capacity) -> (decoder, cache, graphed step)
        self.use_decode_loop = True  # False: transformers' generate even where our loop applies
        from workbench.decode import concatenate_projections
        concatenate_projections(self.model)  # before any packed weight is keyed on weight storage
        self.reconfigure(policy or Policy.identity(), calibration=calibration)

    @classmethod
    def from_pretrained(cls, name: str = "default", policy: Policy | None = None, device: str | None = None,
                        dtype: torch.dtype | None = None, keep_reference: bool = True,
                        calibration: Any = None) -> "Engine":
        """Load `name` ("default", a folder, a hub id, "synthetic:NAME") and apply `policy`.

        >>> engine = Engine.from_pretrained("synthetic:tiny-llama")
        >>> engine.policy.name
        'identity'
        """
        return cls(load(name, device=device, dtype=dtype), policy, keep_reference, calibration)

    # ---- configuration ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def reconfigure(self, policy: Policy, calibration: Any = None) -> None:
        """Switch to `policy` live. Invalid policies raise before anything changes."""
        if not isinstance(policy, Policy):
            raise InputError(f"reconfigure takes a Policy, got {type(policy).__name__}")
        with self._lock:
            if calibration is not None:
                self.calibration = calibration
            self._ensure_calibration(policy)
            self._restore_references(policy)
            self._decode_states.clear()  # captured graphs hold the old modules
            apply_policy(self.model, policy, self.calibration, self.store_cache)
            self.policy = policy
            self.reset_stats()
            self._drop_references()
            release_freed_memory()

    def _drop_references(self) -> None:
        """keep_reference=False: release original weights that a packed format has replaced."""
        if self.keep_reference:
            return
        from torch import nn

        from workbench.roles import embedding_modules
        embed = self.model.get_input_embeddings()
        shared = {id(embed.base.weight if hasattr(embed, "base") else embed.weight)}
        targets = [(f, w) for f, w in wrappers(self.model) if w.store is not None]
        targets += [(f, m) for f, m in embedding_modules(self.model) if getattr(m, "is_workbench_embedding", False)]
        for fqn, module in targets:
            w = module.base.weight
            if w.device.type == "meta" or (id(w) in shared and not getattr(module, "is_workbench_embedding", False)):
                continue
            if getattr(module, "is_workbench_embedding", False) and self._weight_used_elsewhere(w, module):
                continue
            module.base.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)
            self._dropped.add(fqn)
        self._own_cpu_weights()

    def _own_cpu_weights(self) -> None:
        """Copy what is left on the CPU out of the weight file's memory map. A loaded safetensors file
        stays mapped (and resident) while any tensor views it, so releasing the originals would
        otherwise free nothing: measured on the default model with int8, 643 MiB resident either way."""
        if self._owned or self.device.type != "cpu":
            return
        with torch.no_grad():
            for module in self.model.modules():
                for _, p in module.named_parameters(recurse=False):
                    if p.device.type == "cpu":
                        p.data = p.data.clone()
        self._owned = True

    def _weight_used_elsewhere(self, weight, owner) -> bool:
        """True when a plain (unwrapped) layer still multiplies by `weight` (a tied lm_head, say)."""
        from workbench.roles import linear_modules
        return any(m is not owner and not getattr(m, "is_workbench_linear", False) and m.weight is weight
                   for _, m, _ in linear_modules(self.model))

    def _restore_references(self, policy: Policy) -> None:
        """Reload released originals from the model's source before a policy that may need them."""
        if not self._dropped:
            return
        log.info("reloading %d original weights from %s", len(self._dropped), self.loaded.source)
        fresh = load(self.loaded.name, device=str(self.device), dtype=next(self.model.parameters()).dtype).model
        for fqn in self._dropped:
            self.model.get_submodule(fqn).base.weight = fresh.get_submodule(fqn).weight
        self._dropped.clear()

    def _ensure_calibration(self, policy: Policy) -> None:
        """Load the policy's calibration artifact, or calibrate once (cached) when a rule needs one."""
        from workbench.sparsity.calibration import Calibration, needs_calibration
        from workbench.sparsity.calibrate import cached_calibration
        need, need_greedy = needs_calibration(policy)
        if policy.calibration:
            if self.calibration is None or self.calibration.path != policy.calibration:
                cal = Calibration.load(policy.calibration)
                cal.check_model(self.model)
                self.calibration = cal
            if need_greedy and not self.calibration.has_greedy:
                raise PolicyError(f"calibration artifact {policy.calibration} has no greedy allocation; "
                                  "run `workbench calibrate --greedy`")
        elif need and (self.calibration is None or (need_greedy and not self.calibration.has_greedy)):
            self.calibration = cached_calibration(self, greedy=need_greedy)

    def reset_stats(self) -> None:
        """Start measuring achieved sparsity and attention recall afresh."""
        from workbench.attention.backend import reset_recall
        for _, w in wrappers(self.model):
            w.reset_stats()
        reset_recall(self.model)

    def unwrap(self) -> None:
        """Back to the unmodified model (identity policy)."""
        with self._lock:
            self._decode_states.clear()
            unwrap(self.model)
            self.policy = Policy.identity()

    @contextlib.contextmanager
    def reference(self):
        """The unmodified model for the duration of the block (the yardstick for quality)."""
        if self._dropped:
            raise InputError("this engine released its original weights (keep_reference=False); "
                             "reference logits need keep_reference=True")
        with self._lock, bypassed(self.model):
            yield self

    # ---- tokens ----------------------------------------------------------------------------------------
    def uses_chat_template(self, chat: bool | None) -> bool:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat and not has_template:
            raise InputError(f"model {self.name!r} has no chat template; pass chat=False")
        return has_template if chat is None else chat

    def token_ids(self, prompts: Sequence[Prompt], chat: bool | None = None) -> list[list[int]]:
        """Each prompt's token ids as the model expects them (`workbench.tokens`: BOS where the model
        uses one, a chat template's own tokens), never empty."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise InputError("prompts must be a non-empty list of strings or chat message lists")
        rows = []
        for p in prompts:
            row = encode_prompt(self.tokenizer, p, isinstance(p, str) and self.uses_chat_template(chat))
            if not row:
                raise InputError("prompt is empty after tokenization")
            rows.append(row)
        return rows

    def encode(self, prompts: Sequence[Prompt], chat: bool | None = None) -> dict[str, torch.Tensor]:
        """Left-padded input_ids and attention_mask for a batch of prompts."""
        rows = self.token_ids(prompts, chat)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    # ---- compute ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) in float32 under the current policy."""
        with self._lock:
            t0 = time.perf_counter()
            out = self.model(input_ids=input_ids.to(self.device),
                             attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                             use_cache=False)
            self.last_latency_ms = (time.perf_counter() - t0) * 1e3
            return out.logits.float()

    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the unmodified model for the same input."""
        with self.reference():
            return self.forward(input_ids, attention_mask)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, chat: bool | None = None,
                 stop: Sequence[str] | None = None) -> list[str]:
        """Generate a completion for each prompt (greedy when temperature is 0).

        Llama-family models run the engine's own decode loop (`workbench.decode`: static slot cache,
        CUDA graphs on GPU); other architectures run transformers' `generate`.

        >>> Engine.from_pretrained("synthetic:tiny-llama").generate(["hi"], max_new_tokens=2)  # doctest: +SKIP
        """
        params = self._sampling(max_new_tokens, temperature, top_p, top_k, seed, stop)
        if self.decode_path == "workbench":
            seqs = self._sequences(prompts, chat, params)
            finisher = self.finisher()
            with self._lock:
                for _ in self._loop(seqs, finisher):
                    pass
            return [finisher.visible(s) for s in seqs]
        batch = self.encode(prompts, chat)
        kwargs = self._generation_kwargs(batch, params)
        with self._lock, self._dense_prefill():
            out = self.model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        return [_cut_at_stop(text, params.stop) for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, chat: bool | None = None,
               stop: Sequence[str] | None = None) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as it is generated."""
        params = self._sampling(max_new_tokens, temperature, top_p, top_k, seed, stop)
        shown = ""
        for text in self._texts(prompt, chat, params):
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
                shown = text

    def _texts(self, prompt: Prompt, chat: bool | None, params) -> Iterator[str]:
        """The visible completion after each step (never a stop string, nor half a character)."""
        from workbench.decode import held_back
        if self.decode_path == "workbench":
            (seq,) = self._sequences([prompt], chat, params)
            finisher = self.finisher()
            with self._lock:
                for _ in self._loop([seq], finisher):
                    yield finisher.visible(seq)
            return
        text = ""
        for piece in self._hf_stream(prompt, chat, params):
            text += piece
            if _cut_at_stop(text, params.stop) != text:
                break
            yield held_back(text, params.stop)
        yield _cut_at_stop(text, params.stop)

    # ---- the decode loop -------------------------------------------------------------------------------
    @property
    def decode_path(self) -> str:
        """"workbench" (our decode loop) or "transformers" (its generate, for other architectures)."""
        from workbench.decode import unsupported_reason
        if not self.use_decode_loop or unsupported_reason(self.model):
            return "transformers"
        return "workbench"

    @property
    def use_cuda_graphs(self) -> bool:
        import os
        return self.device.type == "cuda" and os.environ.get("WORKBENCH_CUDA_GRAPHS", "1") != "0"

    def _sampling(self, max_new_tokens, temperature, top_p, top_k, seed, stop):
        from workbench.decode import SamplingParams
        if stop is not None and (isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop)):
            raise InputError("stop must be a list of non-empty strings")
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k or 0, seed, tuple(stop or ()))
        params.validate()
        return params

    def _sequences(self, prompts, chat, params) -> list:
        from workbench.decode import Sequence as Seq
        ids = self.token_ids(prompts, chat)
        for row in ids:
            self._check_context(len(row), params.max_new_tokens)
        return [Seq(list(row), params) for row in ids]

    def _check_context(self, prompt_tokens: int, new_tokens: int) -> None:
        if prompt_tokens + new_tokens > self.max_positions:
            raise InputError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({new_tokens}) "
                             f"exceeds the model's context of {self.max_positions} tokens")

    def decode_state(self, slots: int, capacity: int):
        """The (cache, step) pair for `slots` x `capacity`: allocated once and reused; the step is a CUDA
        graph on GPU. Dropped by `reconfigure` (the graph holds the old modules)."""
        from workbench.decode import Decoder, GraphedStep, SlotKVCache
        bypass = any(w.bypass for _, w in wrappers(self.model))  # the reference: graphs would replay the policy
        key = (slots, capacity, bypass)
        if key not in self._decode_states:
            self._decode_states.clear()  # one at a time: caches are large on big models
            decoder = Decoder(self.model)
            cache = SlotKVCache.for_model(self.model, slots, capacity)
            step = None
            if self.use_cuda_graphs and not decoder.sparse_attention and not bypass:
                with torch.inference_mode():
                    step = GraphedStep(decoder, cache)
                self.reset_stats()  # the warm-up steps are not traffic
            self._decode_states[key] = (decoder, cache, step)
        return self._decode_states[key]

    def _loop(self, seqs: list, finisher):
        from workbench.decode import decode_loop
        longest = max(len(s.prompt_ids) for s in seqs) + seqs[0].params.max_new_tokens
        capacity = min(self.max_positions, -(-longest // CACHE_QUANTUM) * CACHE_QUANTUM)
        slots = min(len(seqs), MAX_SLOTS)
        decoder, cache, step = self.decode_state(slots, capacity)
        t0 = time.perf_counter()
        with torch.inference_mode():
            yield from decode_loop(decoder, cache, seqs, finisher, step, self._dense_prefill)
        self.last_latency_ms = (time.perf_counter() - t0) * 1e3

    def finisher(self):
        """The stop rule of this model's sequences (its end tokens, stop strings, budgets) and the text
        a client may see of them."""
        from workbench.decode import Finisher
        return Finisher(self.eos_ids(), lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))

    def eos_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if source is not None:
                ids.update(source if isinstance(source, (list, tuple)) else [source])
        return ids

    # ---- transformers' generate (architectures the decode loop does not cover) -------------------------
    def _hf_stream(self, prompt, chat, params) -> Iterator[str]:
        from transformers import TextIteratorStreamer
        batch = self.encode([prompt], chat)
        kwargs = self._generation_kwargs(batch, params)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def work():
            try:
                with torch.inference_mode(), self._lock, self._dense_prefill():
                    self.model.generate(**batch, **kwargs, streamer=streamer)
            except BaseException as e:  # surfaced in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
        if errors:
            raise errors[0]

    def _generation_kwargs(self, batch, params) -> dict:
        self._check_context(batch["input_ids"].shape[1], params.max_new_tokens)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        kwargs: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if params.presence_penalty or params.frequency_penalty:
            kwargs["logits_processor"] = [_Penalties(params, batch["input_ids"].shape[1])]
        return kwargs

    @contextlib.contextmanager
    def _dense_prefill(self):
        """Prompt tokens run dense unless a layer's sparsity asks for sparse prefill (TEAL's default)."""
        marked = [w for _, w in wrappers(self.model) if not w.setting.sparsity.prefill]
        for w in marked:
            w.dense_multi_token = True
        try:
            yield
        finally:
            for w in marked:
                w.dense_multi_token = False

    # ---- measured facts --------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Measured per-module facts: parameters, bytes by format, achieved sparsity, last latency."""
        from workbench.accounting import weight_accounting
        with self._lock:
            facts = weight_accounting(self.model)
            from workbench.attention.backend import attention_recall
            facts.update(model=self.name, policy=self.policy.name, architecture=model_summary(self.model),
                         last_forward_ms=self.last_latency_ms, attention_recall=attention_recall(self.model),
                         fallbacks=dict(getattr(self.model, "workbench_fallbacks", {})),
                         switch_cache_bytes=self._switch_cache_bytes())
            facts["held_bytes"] = facts["weight_bytes"] + facts["reference_bytes"] + facts["switch_cache_bytes"]
            return facts

    def _switch_cache_bytes(self) -> int:
        """Packed weights kept for instant switching back to a format, beyond those the policy uses now."""
        if not self.store_cache:
            return 0
        in_use = {id(m.store) for m in self.model.modules() if getattr(m, "store", None) is not None}
        return sum(st.nbytes for st in {id(v): v for v in self.store_cache.values()}.values() if id(st) not in in_use)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Quantizing allocates float32 temporaries of every
    weight; glibc keeps them in its heap after they are freed, so without this the process stays over
    600 MiB larger than what it holds after an int8 switch of the default model."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, say): nothing to do
        pass


def _cut_at_stop(text: str, stops) -> str:
    """transformers' `generate` keeps the stop string; the workbench returns the text before it."""
    from workbench.decode import first_stop
    at = first_stop(text, tuple(stops))
    return text if at is None else text[:at]


class _Penalties:
    """OpenAI's presence and frequency penalties as a transformers logits processor (completion only)."""

    def __init__(self, params, prompt_len: int):
        self.params, self.prompt_len = params, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row in range(scores.shape[0]):
            done = input_ids[row, self.prompt_len:]
            if done.numel():
                ids, counts = done.unique(return_counts=True)
                scores[row, ids] -= self.params.presence_penalty + self.params.frequency_penalty * counts.to(scores.dtype)
        return scores
