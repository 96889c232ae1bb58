"""The `workbench` command's arguments: one parser, the policy flags every model command shares, and
a usage error that is one line and exit code 2, like every other bad input."""
from __future__ import annotations

import argparse
import os


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"workbench: error: {message}\n")


def _policy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default', a model folder, a .gguf file, a hub id, or synthetic:NAME")
    p.add_argument("--policy", metavar="FILE.json", help="policy file (overrides the shorthand flags)")
    p.add_argument("--sparsity", type=float, default=0.0, help="model-wide activation sparsity in [0, 1)")
    p.add_argument("--sparsity-rule", default=None,
                   help="topk (default), threshold, weighted or greedy; the last three calibrate once (cached)")
    p.add_argument("--calibration", metavar="FILE", default=None, help="calibration artifact from `workbench calibrate`")
    p.add_argument("--precision", default="none",
                   help="weight format of block linears: fp32 bf16 fp16 fp8 int8 int8-block64 int4-g32 int4-g64 "
                        "int4-g128, int3-gN, int2-gN (add -asym for asymmetric groups), or auto (with --budget-bits)")
    p.add_argument("--quant-method", default=None,
                   help="how --precision rounds: rtn (nearest, default), gptq (calibrated on the corpus; "
                        "int4/int3/int2 groups and per-row int8), imatrix (group scales weighted by the corpus's "
                        "activations; groups) or awq (input channels scaled by activation, folded into the norm "
                        "that feeds q|k|v and gate|up); same as the precision suffix, e.g. int4-g64-gptq")
    p.add_argument("--calibrate-sparse", action="store_true",
                   help="a calibrated method on a sparsified layer sees the sparsified inputs it will get (the model "
                        "run under the policy's sparsity) instead of the unmodified model's; suffix -sparsecal")
    p.add_argument("--budget-bits", type=float, default=None, help="bits per weight for --precision auto")
    p.add_argument("--auto-formats", default=None,
                   help="comma-separated formats --precision auto chooses from, methods included (e.g. "
                        "int4-g64,int4-g64-gptq,int3-g64-gptq,int8); default the sensitivity scan's")
    p.add_argument("--auto-keep-fused", action="store_true",
                   help="--precision auto gives q|k|v and gate|up of a layer one format each (vLLM fuses them)")
    p.add_argument("--head-precision", default=None,
                   help="weight format for the embedding table and lm_head (default: left as loaded)")
    p.add_argument("--attention", default="dense", help="attention selector NAME[:BUDGET], e.g. dense")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="Sparse, quantized and scheduled LLM inference workbench.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="model architecture, policy and measured weight bytes")
    _policy_options(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--modules", action="store_true", help="include the per-module table")

    gen = sub.add_parser("generate", help="generate text for a prompt")
    _policy_options(gen)
    gen.add_argument("prompt", help="the prompt (chat template applied for instruct models)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")

    ev = sub.add_parser("eval", help="perplexity, KL divergence and top-1 agreement against the unmodified model")
    _policy_options(ev)
    ev.add_argument("--corpus", default=None, help="a UTF-8 text file (default: the held-out Python reference)")
    ev.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens scored")
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--json", action="store_true", help="print one JSON object")

    lab = sub.add_parser("lab", help="open JupyterLab on the curated notebooks")
    lab.add_argument("--port", type=int, default=8888)
    lab.add_argument("--no-browser", action="store_true")
    lab.add_argument("jupyter_args", nargs=argparse.REMAINDER,
                     help="anything after -- goes to JupyterLab (e.g. -- --IdentityProvider.token=...)")

    cal = sub.add_parser("calibrate", help="activation histograms (and greedy allocation) for sparsity thresholds")
    cal.add_argument("--model", default="default")
    cal.add_argument("--device", default=None)
    cal.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    cal.add_argument("--greedy", action="store_true", help="also run TEAL's block-wise greedy allocation")
    cal.add_argument("--out", default=None, help="artifact path (default: the cache, keyed by model)")
    cal.add_argument("--under", default=None, metavar="POLICY",
                     help="calibrate the model as POLICY runs it (a Policy.parse name, e.g. threshold40+int4-g64): "
                          "each layer's thresholds from the inputs it gets under the policy upstream; needs --out")
    cal.add_argument("--rounds", type=int, default=2, help="passes under the policy with --under")
    cal.add_argument("--json", action="store_true")

    sens = sub.add_parser("sensitivity", help="KLD when one module (or layer) alone is quantized, per format")
    sens.add_argument("--model", default="default")
    sens.add_argument("--device", default=None)
    sens.add_argument("--formats", default="int4-g32,int4-g64,int8,fp8,bf16", help="comma-separated formats")
    sens.add_argument("--granularity", choices=["module", "layer"], default="module")
    sens.add_argument("--tokens", type=int, default=256)
    sens.add_argument("--out", default=None, help="write the artifact here too (JSON)")
    sens.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="decode ms/token and memory for a matrix of policies, with baselines")
    bench.add_argument("--model", default=None,
                       help="model to time (default: synthetic:llama-3-8b on a GPU, the default model on CPU)")
    bench.add_argument("--policies", default=None,
                       help="comma-separated: dense, int8, int4-g64, topk25, topk50+int8, ... (default: the issue's matrix)")
    bench.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--context", default=None, metavar="LIST",
                       help="comma-separated contexts (prompt tokens; k = 1024), e.g. 8k,32k,128k: every policy and "
                            "batch is timed at each (replaces --prompt-tokens)")
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--pdl", choices=("on", "off", "both"), default="on",
                       help="GPU: launch the decode kernels with programmatic dependent launch (on), plainly (off), "
                            "or every row both ways side by side (both)")
    bench.add_argument("--kernels", choices=("auto", "triton", "reference"), default="auto",
                       help="Triton kernels on CUDA (auto, triton) or the reference paths everywhere")
    bench.add_argument("--no-transformers", action="store_true", help="skip transformers' eager generate baseline")
    bench.add_argument("--profile", action="store_true",
                       help="per policy and batch: one decode step's kernels by layer role, with time, bytes, "
                            "bandwidth and the gaps between kernels")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    bench.add_argument("--out", metavar="FILE.json", help="also write the results here")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    ex = sub.add_parser("export", help="write the model under its policy to GGUF (llama.cpp, transformers) or a "
                                       "compressed-tensors folder (vLLM, transformers), exact where a type holds "
                                       "the format")
    _policy_options(ex)
    ex.add_argument("--format", choices=("gguf", "compressed-tensors"), default="gguf",
                    help="gguf: one file; compressed-tensors: a folder (default gguf)")
    ex.add_argument("--out", required=True, metavar="PATH", help="the file or folder to write (refused if it exists)")
    ex.add_argument("--force", action="store_true", help="replace PATH if it exists")
    ex.add_argument("--allow-requantize", action="store_true",
                    help="re-quantize formats with no exact type in the target format to the nearest one "
                         "(listed in the report)")
    ex.add_argument("--weights-only", action="store_true",
                    help="export the weights of a policy with activation sparsity or attention selectors, and "
                         "write those settings into PATH.runtime.json")
    ex.add_argument("--no-check", action="store_true",
                    help="skip reading the export back with transformers and measuring its KLD")
    ex.add_argument("--check-tokens", type=int, default=512, help="held-out tokens the read-back check scores")
    ex.add_argument("--json", action="store_true", help="print the report as one JSON object")

    ft = sub.add_parser("finetune", help="train LoRA adapters (under any policy) on a JSONL dataset and save them")
    _policy_options(ft)
    ft.add_argument("--data", required=True, metavar="FILE.jsonl",
                    help='one JSON object per line: {"text": ...} or {"messages": [{"role", "content"}, ...]}')
    ft.add_argument("--out", required=True, metavar="DIR", help="folder for adapter.safetensors and adapter.json")
    ft.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ft.add_argument("--lr", type=float, default=2e-4)
    ft.add_argument("--batch", type=int, default=4)
    ft.add_argument("--grad-accum", type=int, default=1)
    ft.add_argument("--max-len", type=int, default=256, help="tokens per example (longer ones are cut)")
    ft.add_argument("--rank", type=int, default=16)
    ft.add_argument("--alpha", type=float, default=32)
    ft.add_argument("--dropout", type=float, default=0.1)
    ft.add_argument("--targets", default="q,v", help="comma-separated roles (q,k,v,o,gate,up,down) or all-linear")
    ft.add_argument("--loss", choices=("lm", "kl"), default="lm",
                    help="lm: next-token loss; kl: toward the unmodified model (recovers what the policy cost)")
    ft.add_argument("--json", action="store_true", help="print one JSON object")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and /metrics")
    _policy_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("WORKBENCH_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $WORKBENCH_API_KEY, or none)")
    srv.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together (cache slots)")
    srv.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    srv.add_argument("--max-model-len", type=int, default=1024, help="prompt + completion tokens per request")
    srv.add_argument("--elastic", action="store_true", help="run the elastic sparsity controller")
    srv.add_argument("--ladder", default="topk30,topk50", help="the controller's policies, calm -> loaded")
    srv.add_argument("--period", type=float, default=5.0, help="controller sampling period (s)")
    srv.add_argument("--slo-ttft", type=float, default=None, help="time-to-first-token SLO (s) for the load signal")

    lt = sub.add_parser("loadtest", help="serving benchmark: one-at-a-time vs continuous batching vs transformers, "
                                          "a Poisson rate sweep, and the elastic controller under overload")
    _policy_options(lt)
    lt.add_argument("--requests", type=int, default=16, help="requests per run")
    lt.add_argument("--rates", default="", help="comma-separated Poisson arrival rates (req/s) for the sweep")
    lt.add_argument("--prompt-tokens", type=int, default=64, help="mean prompt length")
    lt.add_argument("--output-tokens", type=int, default=32, help="mean output length")
    lt.add_argument("--max-num-seqs", type=int, default=8)
    lt.add_argument("--slo-ttft", type=float, default=2.0, help="time-to-first-token SLO (s)")
    lt.add_argument("--slo-tpot", type=float, default=0.2, help="time-per-output-token SLO (s)")
    lt.add_argument("--modes", default="one-at-a-time,continuous,transformers,elastic")
    lt.add_argument("--ladder", default="dense,topk30,topk50", help="the elastic controller's policies")
    lt.add_argument("--overload", type=float, default=2.0, help="overload rate as a multiple of measured capacity")
    lt.add_argument("--control-period", type=float, default=0.5, help="controller period (s) in the benchmark")
    lt.add_argument("--seed", type=int, default=0, help="seed of the workload (arrivals, lengths, prompts)")
    lt.add_argument("--out", metavar="FILE.json", help="also write the results here")
    lt.add_argument("--json", action="store_true", help="print one JSON object")

    prov = sub.add_parser("provision", help="fetch and cache the default model (idempotent)")
    prov.add_argument("--quiet", action="store_true")
    return parser
