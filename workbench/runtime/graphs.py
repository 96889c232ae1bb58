"""CUDA graphs of the decode step and of small prefills: one launch replays hundreds of kernels.

The cache's tensors and the input buffers are the graphs' fixed addresses, so a graph stays valid while
sequences join and leave their slots; any change to the model's modules (a reconfigure, a LoRA attach)
invalidates them, which the batch runner notices by the engine's version and rebuilds.
"""
from __future__ import annotations

import torch

from workbench.runtime.cache import SlotKVCache, padded_batch
from workbench.runtime.decoder import Decoder


class GraphedStep:
    """`decoder.step` captured once for a cache: replaying it costs one launch instead of hundreds.

    The cache's tensors and the input buffer are the graph's fixed addresses; the caller copies token
    ids in, replays, and reads the logits buffer. A second graph of the same step also takes the greedy
    token and feeds it back as the next input, and advances the active slots' lengths, all on the
    device: the host can queue step t+1 before it reads step t's tokens (see `decode_loop`). Any change
    to the model's modules (a reconfigure) invalidates the graphs: the engine drops them.
    """

    def __init__(self, decoder: Decoder, cache: SlotKVCache, warmup: int = 2):
        self.cache = cache
        device = cache.lengths.device
        self.ids = torch.zeros(cache.slots, dtype=torch.long, device=device)
        self.active = torch.zeros(cache.slots, dtype=torch.long, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (Triton compiles, cuBLAS picks kernels) off the graph
            for _ in range(warmup):
                decoder.step(cache, self.ids)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step(cache, self.ids)
        self.greedy_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.greedy_graph, pool=self.graph.pool()):
            chosen = decoder.step(cache, self.ids).argmax(-1)
            self.ids.copy_(chosen)
            cache.lengths.add_(self.active)

    def __call__(self, cache: SlotKVCache, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


class GraphedPrefill:
    """`decoder.prefill_batch` captured in CUDA graphs, one per (batch, length) bucket.

    On a GPU a small prefill is bound by the host launching the model's kernels one at a time: for an
    8B model one 128-token prompt takes about 18 ms of which about 9 are GPU work, so while requests
    arrive one by one, prefills rather than decode steps set the pace. A replay is one launch. Prompts
    are padded up to the bucket (see `padded_batch`); a bucket is captured on first use, after one
    eager run that also does the real work, so the first call of each shape costs more. Call it inside
    the engine's prefill context, as `prefill_batch`. Built for one cache and one set of modules: a
    reconfigure drops it with the decoder.
    """

    BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

    def __init__(self, decoder: Decoder, cache: SlotKVCache, quantum: int = 64, max_tokens: int = 512):
        self.decoder, self.cache, self.quantum = decoder, cache, quantum
        # Beyond a few hundred tokens the GPU work outweighs the launches and the bucket's padding costs
        # more than the graph saves (Llama-3-8B shape on an H200, experiments/serving/prefill_h200.json:
        # 1 x 128 tokens 18.0 -> 8.9 ms; 4 x 128 18.8 -> 16.6 ms; 10 x 192 padded to 12 x 192
        # 56.8 -> 65.1 ms): those run eager.
        self.max_tokens = max_tokens
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None

    def bucket(self, batch: int, length: int) -> tuple[int, int]:
        b = next((n for n in self.BATCHES if n >= batch), batch)
        # one token stays one token: the layers treat it as a decode step (sparse rules apply)
        t = length if length == 1 else min(-(-length // self.quantum) * self.quantum, self.cache.capacity)
        return b, t

    def __call__(self, cache: SlotKVCache, slots: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        lengths = [p.shape[0] for p in prompts]
        if not prompts or len(slots) != len(prompts) or (1 in lengths and set(lengths) != {1}):
            return self.decoder.prefill_batch(cache, slots, prompts)  # its checks and its one-token split
        for n in lengths:
            cache.check_fits(n, 0)
        key = self.bucket(len(prompts), max(lengths))
        if key[0] * key[1] > self.max_tokens:
            return self.decoder.prefill_batch(cache, slots, prompts)
        if key not in self.graphs:
            self._capture(key, slots, prompts)
        graph, buffers, logits = self.graphs[key]
        padded_batch(cache, slots, prompts, *key, out=buffers)
        graph.replay()
        for slot, n in zip(slots, lengths):
            cache.set_length(slot, n)
        return logits[:len(prompts)].clone()  # the pool is shared: the next replay may reuse this memory

    def _capture(self, key: tuple[int, int], slots, prompts) -> None:
        buffers = padded_batch(self.cache, slots, prompts, *key)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the graph (kernel choice, tuning)
            self.decoder.prefill_padded(self.cache, *buffers)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.decoder.prefill_padded(self.cache, *buffers)
        self.pool = self.pool or graph.pool()
        self.graphs[key] = (graph, buffers, logits)
