"""The Engine: the one facade that notebooks, widgets, the CLI, the server and the benchmarks go through.

    engine = Engine.from_pretrained("default", policy=Policy.identity())
    engine.generate(["What is the capital of France?"], max_new_tokens=32)
    engine.reconfigure(new_policy)   # live: wrappers swap, weights are not reloaded
    engine.stats()                   # measured facts, not configured ones

Its public surface is all that other modules use (a test greps the package for `engine._`):
`exclusive()` (one caller at a time), `invalidate()` (modules changed: captured graphs are stale),
`version` and `epoch` (which modules the model holds; `workbench.policy_builds`), `in_reference`, `dense_prefill()`, `runner(slots, capacity)` (the batch runner of
`workbench.runtime`), `token_ids`, `finisher()`, `eos_ids()`, `check_context`.

By default the unmodified weights stay in memory as the reference (for KL divergence, exact `unwrap`
and live switching); `keep_reference=False` releases what a packed format replaced (`workbench.memory`),
and a later reconfigure that needs the originals reloads them from the model's source.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Iterator, Sequence

import torch

from workbench.accounting import weight_accounting
from workbench.attention.backend import attention_recall, reset_recall
from workbench.errors import InputError, PolicyError
from workbench.expert_load import expert_load, install as install_expert_load, reset as reset_expert_load
from workbench.formats.awq import NormFolds, groups as awq_groups
from workbench.memory import ReleasedOriginals, release_freed_memory
from workbench.models import LoadedModel, load, model_summary
from workbench.policy import Policy
from workbench.policy_builds import PolicyBuilds
from workbench.roles import linear_modules
from workbench.runtime import hf
from workbench.runtime.cache import cache_capacity
from workbench.runtime.decoder import concatenate_projections, unsupported_reason
from workbench.runtime.runner import BatchRunner
from workbench.runtime.sampling import Finisher, SamplingParams, Sequence as Seq
from workbench.sparsity.calibrate import cached_calibration
from workbench.sparsity.calibration import Calibration, needs_calibration
from workbench.tokens import Prompt, encode_prompt, has_chat_template
from workbench.transforms import apply_policy, bypassed, unwrap, wrappers

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
        self.released = ReleasedOriginals()  # originals given up (keep_reference=False)
        # packed weights by (original, format): switching back to a seen format needs no requantization;
        # off when the engine runs lean (keep_reference=False), where memory is the point
        self.store_cache: dict | None = {} if keep_reference else None
        # the policies run so far, so that switching back to one reuses its modules and graphs
        self.builds = PolicyBuilds(enabled=keep_reference)
        self.norm_folds = NormFolds()  # awq's scales, folded into RMSNorm weights (the originals kept)
        self.version = 0  # which set of modules the model holds: runners keep decoders and graphs per version
        self.epoch = 0  # bumped by `invalidate`: every version before it is stale
        self.use_decode_loop = True  # False: transformers' generate even where our loop applies
        self._lock = threading.RLock()  # one forward at a time: widgets and servers call from threads
        self._reference_depth = 0
        self._runner: BatchRunner | None = None  # generate's runner, kept while its shape fits
        concatenate_projections(self.model)  # before any packed weight is keyed on weight storage
        install_expert_load(self.model)  # tokens per routed expert (MoE models), in stats()
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

    # ---- the public surface for the rest of the package ---------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the engine for the block: one forward, generation or module change at a time (widgets,
        the scheduler's thread and servers call from several threads)."""
        with self._lock:
            yield self

    def invalidate(self) -> None:
        """The model's modules changed behind the policy (a LoRA attach, merge or unload): every graph and
        every kept policy build is stale. Runners rebuild before their next step; generate's own runner is
        dropped (its cache is large on big models)."""
        with self._lock:
            self.epoch += 1
            self.builds.forget()
            self.version = self.builds.new_version()
            self._runner = None

    @property
    def in_reference(self) -> bool:
        """True inside `reference()`, where the wrappers bypass the policy (a graph would replay it)."""
        return self._reference_depth > 0

    @contextlib.contextmanager
    def dense_prefill(self):
        """Prompt tokens run dense unless a layer's sparsity asks for sparse prefill (TEAL's default)."""
        marked = [w for _, w in wrappers(self.model) if not w.setting.sparsity.prefill]
        for w in marked:
            w.dense_multi_token = True
        try:
            yield
        finally:
            for w in marked:
                w.dense_multi_token = False

    def runner(self, slots: int, capacity: int, cached: bool = True, graphed_prefill: bool = False) -> BatchRunner:
        """A batch runner over `slots` x `capacity` (see `workbench.runtime.runner`); `cached` keeps one
        for `generate` and `bench` to reuse while its shape fits, a fresh one (the scheduler's, a profile's)
        otherwise."""
        if self.decode_path != "workbench":
            raise InputError(f"the batch runner cannot run this model: {unsupported_reason(self.model)}")
        if not cached:
            return BatchRunner(self, slots, capacity, graphed_prefill)
        r = self._runner
        if r is None or (r.slots, r.capacity) != (slots, capacity):
            self._runner = None  # one at a time: free the old cache before allocating the new one
            self._runner = BatchRunner(self, slots, capacity, graphed_prefill)
        return self._runner

    @property
    def decode_path(self) -> str:
        """"workbench" (the batch runner) or "transformers" (its generate, for other architectures)."""
        if not self.use_decode_loop or unsupported_reason(self.model):
            return "transformers"
        return "workbench"

    @property
    def use_cuda_graphs(self) -> bool:
        return self.device.type == "cuda" and os.environ.get("WORKBENCH_CUDA_GRAPHS", "1") != "0"

    # ---- configuration ---------------------------------------------------------------------------------
    def reconfigure(self, policy: Policy, calibration: Any = None) -> None:
        """Switch to `policy` live. Invalid policies raise before anything changes."""
        if not isinstance(policy, Policy):
            raise InputError(f"reconfigure takes a Policy, got {type(policy).__name__}")
        with self._lock:
            if calibration is not None:
                self.calibration = calibration
            self._ensure_calibration(policy)
            self.released.restore(self.model, self.loaded.name, self.loaded.source)
            awq_groups(self.model, policy)  # a half-awq norm group is refused before anything changes
            folded = self.norm_folds.restore(self.model)  # calibration inputs are the unmodified model's
            try:
                hessians = self._hessians_for(policy)
                scales = self.norm_folds.plan(self.model, policy, hessians)
                apply_policy(self.model, policy, self.calibration, self.store_cache, hessians=hessians,
                             built=self.builds.wrappers, scales=scales)
            except BaseException:
                self.norm_folds.fold(self.model, folded)  # the old policy's norms, as they were
                raise
            self.norm_folds.fold(self.model, scales)
            self.version, fresh = self.builds.settle(policy.to_json(), self.model,
                                                     reused=self.model.workbench_built_new == 0)
            if fresh:
                self._runner = None  # generate's runner: its cache is large on big models
            self.policy = policy
            self.reset_stats()
            if not self.keep_reference:
                self.released.release(self.model)
            release_freed_memory()

    def _ensure_calibration(self, policy: Policy) -> None:
        """Load the policy's calibration artifact, or calibrate once (cached) when a rule needs one."""
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

    def _hessians_for(self, policy: Policy) -> dict | None:
        """Calibration Hessians for the layers whose method needs them and that are not packed already
        (a policy seen before reuses its packed weights: no second calibration)."""
        from workbench.formats.calibrated import needs_hessians, pending_calibrated
        if not needs_hessians(policy):
            return None
        fqns = pending_calibrated(self.model, policy, self.store_cache)
        if not fqns:
            return {}
        from workbench.transforms import calibrated_as_run
        from workbench.formats.hessians import cached_hessians
        settings = {fqn: policy.setting_for(fqn, role) for fqn, _, role in linear_modules(self.model)}
        as_run = [f for f in fqns if calibrated_as_run(settings[f])]
        dense = [f for f in fqns if f not in as_run]
        out = cached_hessians(self, dense) if dense else {}
        if as_run:
            out.update(self._hessians_as_run(policy, as_run))
        return out

    def _hessians_as_run(self, policy: Policy, fqns: list[str]) -> dict:
        """Hessians of the inputs `fqns` get under `policy`'s sparsity (weights as loaded): the model is
        put under the policy without its weight formats, run over the calibration text, and left for
        `reconfigure` to finish. Collected each time (they depend on the cut), not cached on disk."""
        from workbench.formats.hessians import collect_hessians
        apply_policy(self.model, policy.without_weights(), self.calibration, self.store_cache)
        return collect_hessians(self, fqns, sparsified=True)

    def reset_stats(self) -> None:
        """Start measuring achieved sparsity, attention recall and expert load afresh."""
        for _, w in wrappers(self.model):
            w.reset_stats()
        reset_recall(self.model)
        reset_expert_load(self.model)

    def unwrap(self) -> None:
        """Back to the unmodified model (identity policy)."""
        with self._lock:
            self.invalidate()
            unwrap(self.model)
            self.norm_folds.restore(self.model)
            self.policy = Policy.identity()

    @contextlib.contextmanager
    def reference(self):
        """The unmodified model for the duration of the block (the yardstick for quality)."""
        if self.released:
            raise InputError("this engine released its original weights (keep_reference=False); "
                             "reference logits need keep_reference=True")
        with self._lock, bypassed(self.model):
            folded = self.norm_folds.restore(self.model)
            self._reference_depth += 1
            try:
                yield self
            finally:
                self._reference_depth -= 1
                self.norm_folds.fold(self.model, folded)

    # ---- tokens ----------------------------------------------------------------------------------------
    def uses_chat_template(self, chat: bool | None) -> bool:
        has_template = has_chat_template(self.tokenizer)
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

    def check_context(self, prompt_tokens: int, new_tokens: int) -> None:
        if prompt_tokens + new_tokens > self.max_positions:
            raise InputError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({new_tokens}) "
                             f"exceeds the model's context of {self.max_positions} tokens")

    def finisher(self) -> Finisher:
        """The stop rule of this model's sequences (its end tokens, stop strings, budgets) and the text
        a client may see of them."""
        return Finisher(self.eos_ids(), lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))

    def eos_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if source is not None:
                ids.update(source if isinstance(source, (list, tuple)) else [source])
        return ids

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

    def sampling(self, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[str] | None = None, **extra) -> SamplingParams:
        """Validated sampling parameters (`extra`: the other SamplingParams fields, e.g. penalties)."""
        if stop is not None and (isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop)):
            raise InputError("stop must be a list of non-empty strings")
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k or 0, seed, tuple(stop or ()), **extra)
        params.validate()
        return params

    def sequences(self, prompts: Sequence[Prompt], params: SamplingParams, chat: bool | None = None) -> list[Seq]:
        """The prompts as runner sequences, each checked against the model's context."""
        rows = self.token_ids(prompts, chat)
        for row in rows:
            self.check_context(len(row), params.max_new_tokens)
        return [Seq(list(row), params) for row in rows]

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, chat: bool | None = None,
                 stop: Sequence[str] | None = None) -> list[str]:
        """Generate a completion for each prompt (greedy when temperature is 0).

        Llama-family, Gemma 3 and DeepSeek-V3 models run the batch runner (`workbench.runtime`: static slot
        cache, CUDA graphs on GPU); other architectures run transformers' `generate`.

        >>> Engine.from_pretrained("synthetic:tiny-llama").generate(["hi"], max_new_tokens=2)  # doctest: +SKIP
        """
        params = self.sampling(max_new_tokens, temperature, top_p, top_k, seed, stop)
        if self.decode_path != "workbench":
            return hf.generate(self, self.encode(prompts, chat), params)
        seqs = self.sequences(prompts, params, chat)
        for _ in self._run(seqs):
            pass
        finisher = self.finisher()
        return [finisher.visible(s) for s in seqs]

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, chat: bool | None = None,
               stop: Sequence[str] | None = None) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as it is generated."""
        params = self.sampling(max_new_tokens, temperature, top_p, top_k, seed, stop)
        if self.decode_path != "workbench":
            texts = hf.texts(self, self.encode([prompt], chat), params)
        else:
            (seq,) = self.sequences([prompt], params, chat)
            finisher = self.finisher()
            texts = (finisher.visible(seq) for _ in self._run([seq]))
        shown = ""
        for text in texts:
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
                shown = text

    def _run(self, seqs: list[Seq]) -> Iterator[list[Seq]]:
        """`seqs` through generate's runner, holding the engine throughout."""
        longest = max(len(s.prompt_ids) for s in seqs) + seqs[0].params.max_new_tokens
        with self._lock:
            runner = self.runner(min(len(seqs), MAX_SLOTS), cache_capacity(longest, self.max_positions))
            t0 = time.perf_counter()
            with torch.inference_mode():
                yield from runner.run(seqs)
            self.last_latency_ms = (time.perf_counter() - t0) * 1e3

    # ---- measured facts --------------------------------------------------------------------------------
    def export(self, path, format: str = "gguf", check: bool = True, **options) -> dict:
        """Write the model under the current policy for another engine to serve; the export report.

        `format="gguf"` (one file for llama.cpp and transformers) or `"compressed-tensors"` (a folder for
        vLLM and transformers), exact where the format holds the policy's storage; see `workbench.export`
        for `allow_requantize`, `weights_only`, `force`. With `check` the export is read back by
        transformers and its KLD / top-1 against this policy and the unmodified model added."""
        from workbench.export import EXPORTERS
        if format not in EXPORTERS:
            raise InputError(f"export format must be one of {', '.join(EXPORTERS)}, got {format!r}")
        write, read_back = EXPORTERS[format]
        report = write(self, path, **options)
        if check:
            report["check"] = read_back(self, path)
        return report

    def stats(self) -> dict:
        """Measured per-module facts: parameters, bytes by format, achieved sparsity, last latency."""
        with self._lock:
            facts = weight_accounting(self.model)
            facts.update(model=self.name, policy=self.policy.name, architecture=model_summary(self.model),
                         last_forward_ms=self.last_latency_ms, attention_recall=attention_recall(self.model),
                         fallbacks=dict(getattr(self.model, "workbench_fallbacks", {})),
                         switch_cache_bytes=self._switch_cache_bytes(), kv_cache=self._kv_cache(),
                         expert_load=expert_load(self.model),
                         awq={n: f for n, f in self.norm_folds.facts.items() if n in self.norm_folds.folded})
            facts["held_bytes"] = facts["weight_bytes"] + facts["reference_bytes"] + facts["switch_cache_bytes"]
            return facts

    def _kv_cache(self) -> dict | None:
        """The KV cache `generate` holds between calls: slots, tokens per slot, bytes, bytes per token (None
        before any); for latent attention also what per-head keys and values would take per token."""
        cache = self._runner.cache if self._runner is not None else None
        if cache is None:
            return None
        out = {"slots": cache.slots, "capacity": cache.capacity, "bytes": cache.nbytes,
               "bytes_per_token": cache.bytes_per_token}
        cfg = self.model.config
        if getattr(cfg, "kv_lora_rank", None):  # MLA: the latent against expanded keys and values
            per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
            out["expanded_bytes_per_token"] = (cfg.num_hidden_layers * cfg.num_attention_heads * per_head
                                               * cache.keys[0].element_size())
        return out

    def _switch_cache_bytes(self) -> int:
        """Packed weights kept for instant switching back to a format, beyond those the policy uses now."""
        if not self.store_cache:
            return 0
        in_use = {id(m.store) for m in self.model.modules() if getattr(m, "store", None) is not None}
        return sum(st.nbytes for st in {id(v): v for v in self.store_cache.values()}.values() if id(st) not in in_use)
