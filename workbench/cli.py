"""The `workbench` command: info, generate, eval, lab, provision.

Every error a user can cause prints one line and exits with code 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from workbench.errors import InputError, WorkbenchError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"workbench: error: {message}\n")


def _policy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', a model folder, a hub id, or synthetic:NAME")
    p.add_argument("--policy", metavar="FILE.json", help="policy file (overrides the shorthand flags)")
    p.add_argument("--sparsity", type=float, default=0.0, help="model-wide activation sparsity in [0, 1)")
    p.add_argument("--sparsity-rule", default=None, help="sparsity rule (default: topk)")
    p.add_argument("--precision", default="none", help="weight format, e.g. none")
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

    prov = sub.add_parser("provision", help="fetch and cache the default model (idempotent)")
    prov.add_argument("--quiet", action="store_true")
    return parser


def _policy_from_args(args):
    from workbench.policy import Policy
    if args.policy:
        return Policy.load(args.policy)
    return Policy.uniform(sparsity=args.sparsity, rule=args.sparsity_rule, precision=args.precision,
                          attention=args.attention)


def _engine(args):
    from workbench.engine import Engine
    policy = _policy_from_args(args)  # validate before the (slow) model load
    return Engine.from_pretrained(args.model, policy=policy, device=args.device)


def cmd_info(args) -> int:
    from workbench.models import model_summary
    engine = _engine(args)
    stats = engine.stats()
    if not args.modules:
        stats.pop("modules")
    stats["architecture"] = model_summary(engine.model)
    stats["policy_detail"] = engine.policy.to_dict()
    if args.json:
        print(json.dumps(stats))
        return 0
    arch = stats["architecture"]
    print(f"model    {engine.name} ({arch['model_type']}, {arch['layers']} layers, hidden {arch['hidden_size']}, "
          f"{arch['parameters'] / 1e6:.1f}M parameters, {arch['dtype']} on {arch['device']})")
    print(f"policy   {engine.policy.name}")
    print(f"weights  {stats['weight_bytes'] / 2**20:.1f} MiB on the compute path "
          f"(fp32 {stats['fp32_bytes'] / 2**20:.1f} MiB, bf16 {stats['bf16_bytes'] / 2**20:.1f} MiB)")
    for fmt, n in stats["weight_bytes_by_format"].items():
        print(f"         {fmt:>10}: {n / 2**20:.1f} MiB")
    print(f"reference copy kept for live tuning: {stats['reference_bytes'] / 2**20:.1f} MiB")
    return 0


def cmd_generate(args) -> int:
    engine = _engine(args)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  seed=args.seed, chat=False if args.no_chat else None)
    if args.stream:
        for piece in engine.stream(args.prompt, **kwargs):
            print(piece, end="", flush=True)
        print()
    else:
        print(engine.generate([args.prompt], **kwargs)[0])
    return 0


def cmd_eval(args) -> int:
    from workbench.evaluate import evaluate
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    engine = _engine(args)
    result = evaluate(engine, corpus=args.corpus, seq_len=args.seq_len, max_tokens=args.max_tokens,
                      progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} under {result['policy']}: perplexity {result['perplexity']:.3f} "
              f"(reference {result['reference_perplexity']:.3f}), KLD mean {result['kld_mean']:.5f} "
              f"p99 {result['kld_p99']:.5f}, top-1 {result['top1']:.4f} over {result['tokens']} tokens")
    return 0


def notebooks_dir() -> Path:
    """The repository's notebooks/ (for a source checkout), else the current folder."""
    here = Path(__file__).resolve().parent.parent / "notebooks"
    return here if here.is_dir() else Path.cwd()


def cmd_lab(args) -> int:
    from workbench.models import provision_default
    provision_default()
    cmd = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={notebooks_dir()}", f"--port={args.port}"]
    if args.no_browser:
        cmd.append("--no-browser")
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_provision(args) -> int:
    from workbench.models import provision_default
    folder = provision_default(progress=not args.quiet)
    print(folder)
    return 0


COMMANDS = {"info": cmd_info, "generate": cmd_generate, "eval": cmd_eval, "lab": cmd_lab,
            "provision": cmd_provision}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except WorkbenchError as e:
        print(f"workbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _quiet_libraries() -> None:
    """Library chatter (transformers' load bars and notices) is noise on a command line."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    import transformers
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
