"""The runtime: decoding owned in one place.

    cache.py     the slot KV cache and the one capacity rule
    decoder.py   the model's layers over the cache (prefill, decode step), per architecture family
    fused.py     the fused CUDA decode step and the projection concatenation it reads
    graphs.py    CUDA graphs of the decode step and of small prefills
    sampling.py  sampling parameters, sequences, sampling, stop conditions
    runner.py    the batch runner: the one loop that Engine.generate, the Scheduler and bench drive
"""
from workbench.runtime.cache import CACHE_QUANTUM, SlotKVCache, cache_capacity
from workbench.runtime.decoder import Decoder, unsupported_reason
from workbench.runtime.runner import BatchRunner
from workbench.runtime.sampling import Finisher, SamplingParams, Sequence, sample

__all__ = ["BatchRunner", "CACHE_QUANTUM", "Decoder", "Finisher", "SamplingParams", "Sequence", "SlotKVCache",
           "cache_capacity", "sample", "unsupported_reason"]
