"""A small launch-config tuner: time each candidate once per problem shape, keep the fastest.

Why not `triton.autotune`: a candidate here is a whole launch (a split-K config includes zeroing the
float32 buffer and the final cast), and the timing must cover that, not the kernel alone.

With WORKBENCH_TUNING_CACHE=path.json the choices persist across processes (keyed by the GPU's name,
Triton's version and the problem), so a long benchmark can be resumed or re-run without timing every
candidate again (compiling them dominates a fresh machine's start).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Hashable, Sequence

import torch

log = logging.getLogger(__name__)
_BEST: dict[Hashable, dict] = {}


def tuned(key: Hashable, candidates: Sequence[dict], launch: Callable[[dict], object], reps: int = 20) -> dict:
    """The fastest of `candidates` for `key` (measured on first use, remembered for the process).

    Each candidate is timed as `reps` launches replayed from a CUDA graph, as the decode step runs them:
    timing eager launches would measure Triton's host-side launch cost (tens of microseconds) instead of
    the kernel, and favour configs with fewer launches. With WORKBENCH_TUNE=0 the first candidate is
    used untimed (deterministic, and fast to start).
    """
    if key in _BEST:
        return _BEST[key]
    saved = _disk().get(_disk_key(key)) if _disk_path() else None
    if saved is not None and saved in candidates:
        _BEST[key] = saved
        return saved
    if (len(candidates) == 1 or os.environ.get("WORKBENCH_TUNE", "1") == "0" or not torch.cuda.is_available()
            or capturing()):
        _BEST[key] = candidates[0]
        return candidates[0]
    best, best_ms, failed = None, float("inf"), []
    for cfg in candidates:
        try:
            ms = _graph_time(lambda: launch(cfg), reps)
        except Exception as e:  # noqa: BLE001 - a config that does not compile or launch here is not a choice
            failed.append(f"{cfg}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if failed:
        log.warning("tuner: %d of %d configs for %s failed and were skipped (first: %s)", len(failed),
                    len(candidates), key, failed[0])
    if best is None:
        raise RuntimeError(f"no launch config works for {key}: {failed[0]}")
    _BEST[key] = best
    _remember_on_disk(key, best)
    return best


# ---- the optional on-disk cache ----------------------------------------------------------------------------------
_DISK: dict | None = None


def _disk_path() -> str | None:
    return os.environ.get("WORKBENCH_TUNING_CACHE") or None


def _disk() -> dict:
    global _DISK
    if _DISK is None:
        _DISK = {}
        path = _disk_path()
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    _DISK = json.load(f)
            except (OSError, ValueError):
                log.warning("tuning cache %s is unreadable; tuning afresh", path)
    return _DISK


def _disk_key(key: Hashable) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        triton = version("triton")
    except PackageNotFoundError:
        triton = "none"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{device} | triton {triton} | {key!r}"


def _remember_on_disk(key: Hashable, cfg: dict) -> None:
    path = _disk_path()
    if not path:
        return
    entries = _disk()
    entries[_disk_key(key)] = cfg
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=0, sort_keys=True)
        os.replace(tmp, path)  # whole or not at all: a run cut short keeps what it had tuned
    except (OSError, TypeError) as e:
        log.warning("tuning cache %s not written: %s", path, e)


def _graph_time(fn: Callable[[], object], reps: int) -> float:
    """Milliseconds per call of `fn`, replayed `reps` times from one CUDA graph (after a compile/warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                fn()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        graph.replay()
        end.record(stream)
    end.synchronize()
    torch.cuda.current_stream().wait_stream(stream)
    return start.elapsed_time(end) / reps


def graph_replay_ms(fn: Callable[[], object], iters: int = 200) -> float:
    """Median milliseconds of one replay of `fn` captured in a CUDA graph (micro-benchmarks: no launch
    overhead, each replay timed by events)."""
    import statistics
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def split_for(n_tiles: int, k_steps: int, sms: int, waves: int = 4) -> list[int]:
    """Split-K factors worth trying: enough programs for a few waves over the SMs, never more than steps."""
    want = max(1, (waves * sms) // max(1, n_tiles))
    out = sorted({1, min(k_steps, want), min(k_steps, max(1, want // 2)), min(k_steps, 2 * want)})
    return [s for s in out if s >= 1]


def sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if torch.cuda.is_available() else 1


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (False on a CPU-only build)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def remembered(key: Hashable) -> dict | None:
    """The config `tuned` kept for `key`, or None before it was tuned."""
    return _BEST.get(key)


def saved(key: Hashable) -> dict | None:
    """The config kept for `key` in this process or in the on-disk cache, or None."""
    if key in _BEST:
        return _BEST[key]
    return _disk().get(_disk_key(key)) if _disk_path() else None
