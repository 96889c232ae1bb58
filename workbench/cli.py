"""The `workbench` command: info, generate, eval, bench, finetune, serve, loadtest, lab, calibrate, sensitivity, provision.

Every error a user can cause prints one line and exits with code 2; no traceback. Each command imports
its machinery (transformers, peft, uvicorn) when it runs, so a bad flag is answered before any of it loads.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from workbench.cli_args import build_parser
from workbench.errors import InputError, WorkbenchError
from workbench.policy import Policy


def _policy_from_args(args):
    if args.policy:
        policy = Policy.load(args.policy)
    else:
        if args.precision == "auto" and args.budget_bits is None:
            raise InputError("--precision auto needs --budget-bits B (bits per weight)")
        if args.budget_bits is not None and args.precision != "auto":
            raise InputError("--budget-bits goes with --precision auto")
        if args.auto_formats is not None and args.precision != "auto":
            raise InputError("--auto-formats goes with --precision auto")
        if getattr(args, "auto_keep_fused", False) and args.precision != "auto":
            raise InputError("--auto-keep-fused goes with --precision auto")
        if args.auto_formats is not None:
            _format_list(args.auto_formats)  # a bad name fails before the model loads
        precision = "none" if args.precision == "auto" else args.precision
        from workbench.policy import QUANT_METHODS
        if args.quant_method is not None and args.quant_method not in QUANT_METHODS:
            raise InputError(f"--quant-method takes one of {', '.join(QUANT_METHODS)}, got {args.quant_method!r}")
        if args.quant_method not in (None, "rtn"):
            if precision == "none":
                raise InputError(f"--quant-method {args.quant_method} needs a --precision to round to")
            precision = f"{precision}-{args.quant_method}"
        if getattr(args, "calibrate_sparse", False):
            if args.quant_method in (None, "rtn"):
                raise InputError("--calibrate-sparse goes with a calibrated --quant-method (gptq, imatrix)")
            precision = f"{precision}-sparsecal"
        policy = Policy.uniform(sparsity=args.sparsity, rule=args.sparsity_rule, precision=precision,
                                attention=args.attention, head=args.head_precision)
    if args.calibration:
        if not Path(args.calibration).is_file():
            raise InputError(f"calibration artifact not found: {args.calibration}")
        policy = dataclasses.replace(policy, calibration=str(Path(args.calibration).resolve()))
    return policy


def _engine(args):
    from workbench.engine import Engine
    policy = _policy_from_args(args)  # validate before the (slow) model load
    engine = Engine.from_pretrained(args.model, policy=policy, device=args.device)
    if getattr(args, "precision", None) == "auto":
        engine.reconfigure(_auto_precision(engine, policy, args.budget_bits, args.auto_formats,
                                           getattr(args, "auto_keep_fused", False)))
    return engine


def _auto_precision(engine, base, budget_bits: float, formats: str | None = None, keep_fused: bool = False):
    """Measured sensitivity (cached; 14+ minutes the first time on the default model) -> formats under
    the budget, composed with the shorthand policy."""
    from workbench.formats.mixed_precision import with_auto_precision
    from workbench.formats.sensitivity import DEFAULT_FORMATS, cached_scan
    chosen = DEFAULT_FORMATS if formats is None else _format_list(formats)
    return with_auto_precision(base, cached_scan(engine, chosen, progress=True), budget_bits=budget_bits,
                               keep_fused=keep_fused)


def _format_list(text: str) -> tuple[str, ...]:
    from workbench.policy import parse_precision
    names = tuple(f.strip() for f in text.split(",") if f.strip())
    if not names:
        raise InputError("--auto-formats needs at least one format")
    for name in names:
        if parse_precision(name).method == "awq":  # one line for a bad name, before any work
            raise InputError(f"--auto-formats chooses per module, and awq scales a norm's whole group: {name} "
                             "cannot be one of them")
    return names


def cmd_info(args) -> int:
    from workbench.models import model_summary
    engine = _engine(args)
    stats = engine.stats()
    if not args.modules:
        stats.pop("modules")
    stats["architecture"] = model_summary(engine.model)
    stats["load_seconds"] = round(engine.loaded.load_seconds, 3)
    stats["policy_detail"] = engine.policy.to_dict()
    if args.json:
        print(json.dumps(stats))
        return 0
    arch = stats["architecture"]
    print(f"model    {engine.name} ({arch['model_type']}, {arch['layers']} layers, hidden {arch['hidden_size']}, "
          f"{arch['parameters'] / 1e6:.1f}M parameters, {arch['dtype']} on {arch['device']})")
    print(f"loaded   in {stats['load_seconds']:.2f} s from {engine.loaded.source}")
    print(f"policy   {engine.policy.name}")
    print(f"weights  {stats['weight_bytes'] / 2**20:.1f} MiB on the compute path "
          f"(fp32 {stats['fp32_bytes'] / 2**20:.1f} MiB, bf16 {stats['bf16_bytes'] / 2**20:.1f} MiB)")
    for fmt, n in stats["weight_bytes_by_format"].items():
        print(f"         {fmt:>10}: {n / 2**20:.1f} MiB")
    print(f"reference copy kept for live tuning: {stats['reference_bytes'] / 2**20:.1f} MiB")
    for fqn, why in stats.get("fallbacks", {}).items():
        print(f"fallback {fqn}: {why}")
    if args.modules:
        print()
        print(format_modules(stats["modules"]))
    return 0


def format_modules(modules: list[dict]) -> str:
    """The per-module table of `info --modules`: name, role, format, parameters, bytes, sparsity."""
    width = max([len(m["fqn"]) for m in modules] + [6])
    lines = [f"{'module':<{width}} {'role':>6} {'format':>12} {'params':>10} {'bytes':>10} {'sparsity':>9}"]
    for m in modules:
        sp = m.get("achieved_sparsity")
        target = m.get("sparsity_target") or 0
        sparsity = f"{sp:.3f}" if sp is not None else (f"({target:.2f})" if target else "")
        lines.append(f"{m['fqn']:<{width}} {m['role'] or '':>6} {m['format']:>12} {m['params']:>10} "
                     f"{m['weight_bytes']:>10} {sparsity:>9}")
    return "\n".join(lines)


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
                      progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        sp = result["achieved_sparsity"]
        if sp:
            print(f"achieved sparsity {sp['overall']:.3f} (target {sp['target']:.3f}); by role: "
                  + ", ".join(f"{r} {v:.3f}" for r, v in sp["by_role"].items()))
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
    cmd += [a for a in args.jupyter_args if a != "--"]
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_calibrate(args) -> int:
    from workbench.sparsity.calibrate import calibrate, calibrate_under, cached_calibration
    from workbench.engine import Engine
    if args.tokens < 2:
        raise InputError(f"--tokens must be at least 2, got {args.tokens}")
    under = None
    if args.under is not None:
        if not args.out:
            raise InputError("--under needs --out FILE (the artifact belongs to that policy, not to the model)")
        if args.greedy:
            raise InputError("--under and --greedy do not combine (the greedy allocation is measured dense)")
        if args.rounds < 1:
            raise InputError(f"--rounds must be at least 1, got {args.rounds}")
        under = Policy.parse(args.under)
        from workbench.sparsity.calibration import needs_calibration
        if not needs_calibration(under)[0]:
            raise InputError(f"--under {args.under}: the policy has no calibrated sparsity rule (threshold or weighted)")
    engine = Engine.from_pretrained(args.model, device=args.device)
    progress = not args.json
    if under is not None:
        cal = calibrate_under(engine, under, rounds=args.rounds, tokens=args.tokens, progress=progress)
        path = cal.save(args.out)
    elif args.out:
        cal = calibrate(engine, tokens=args.tokens, greedy=args.greedy, progress=progress)
        path = cal.save(args.out)
    else:
        cal = cached_calibration(engine, greedy=args.greedy, progress=progress)
        path = cal.path
    summary = {"path": str(path), "modules": len(cal.modules), "greedy": cal.has_greedy, **cal.meta}
    print(json.dumps(summary) if args.json else f"calibration for {len(cal.modules)} modules saved to {path}")
    return 0


def cmd_sensitivity(args) -> int:
    from workbench.engine import Engine
    from workbench.formats.sensitivity import cached_scan
    if args.tokens < 2:
        raise InputError(f"--tokens must be at least 2, got {args.tokens}")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats:
        raise InputError("--formats needs at least one format")
    for f in formats:
        from workbench.policy import parse_precision
        parse_precision(f)
    engine = Engine.from_pretrained(args.model, device=args.device)
    result = cached_scan(engine, formats, args.granularity, args.tokens, progress=not args.json)
    if args.out:
        result.save(args.out)
    if args.json:
        print(result.to_json())
        return 0
    layers, fmts, table = result.layer_table()
    print("layer " + " ".join(f"{f:>12}" for f in fmts) + "   (KLD when only that layer is quantized)")
    for layer, row in zip(layers, table):
        print(f"{layer:>5} " + " ".join(f"{v:12.5f}" for v in row))
    return 0


def cmd_provision(args) -> int:
    from workbench.models import provision_default
    folder = provision_default(progress=not args.quiet)
    print(folder)
    return 0


def cmd_bench(args) -> int:
    import torch

    from workbench.bench import DEFAULT_POLICIES, format_table, parse_contexts, run_bench
    contexts = parse_contexts(args.context) if args.context else None
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise InputError(f"--batch takes comma-separated integers, got {args.batch!r}") from None
    policies = tuple(p.strip() for p in args.policies.split(",")) if args.policies else DEFAULT_POLICIES
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but this machine has no CUDA device")
    if args.kernels == "reference":
        os.environ["WORKBENCH_KERNELS"] = "0"
    model = args.model or ("synthetic:llama-3-8b" if cuda else "default")
    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_bench(model, policies, batches, args.prompt_tokens, args.new_tokens,
                       transformers_baseline=not args.no_transformers, device=args.device, progress=progress,
                       profile=args.profile, pdl=args.pdl, contexts=contexts)
    result["kernels"] = args.kernels
    if args.kernels == "triton" and not cuda:  # said once the run stands, so an error stays one line
        print("workbench: the Triton kernels need a CUDA device; timed the CPU reference paths instead",
              file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def cmd_finetune(args) -> int:
    import signal
    import threading

    from workbench.lora import attach_lora, read_jsonl, save_adapter, train
    if args.steps < 1 or args.batch < 1 or args.grad_accum < 1 or args.max_len < 2:
        raise InputError("--steps, --batch and --grad-accum must be positive and --max-len at least 2")
    if not args.lr > 0:
        raise InputError(f"--lr must be positive, got {args.lr}")
    out = Path(args.out)
    if (out / "adapter.json").exists():
        raise InputError(f"{out} already holds an adapter; choose another --out or remove it")
    rows = read_jsonl(args.data)  # bad data fails before the model loads
    targets = "all-linear" if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
    engine = _engine(args)
    handle = attach_lora(engine, r=args.rank, alpha=args.alpha, targets=targets, dropout=args.dropout)
    stop = threading.Event()  # Ctrl-C ends the run after the current step and saves what it has
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        result = train(engine, rows, steps=args.steps, lr=args.lr, batch=args.batch, grad_accum=args.grad_accum,
                       max_len=args.max_len, loss=args.loss, stop=stop, progress=not args.json)
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.steps:
        save_adapter(engine, out)
    summary = {"out": str(out) if result.steps else None, "steps": result.steps, "stopped": result.stopped,
               "first_loss": result.losses[0] if result.losses else None,
               "last_loss": result.losses[-1] if result.losses else None, "examples": len(rows),
               "trainable_params": handle.trainable, "tokens": result.tokens,
               "tokens_per_s": round(result.tokens_per_s, 1), "seconds": round(result.seconds, 1),
               "model": engine.name, "policy": engine.policy.name, "loss": args.loss}
    if args.json:
        print(json.dumps(summary))
    elif result.steps:
        print(f"{result.steps} steps ({'stopped' if result.stopped else 'done'}): loss {summary['first_loss']:.4f} -> "
              f"{summary['last_loss']:.4f}, {summary['tokens_per_s']} tokens/s; adapter saved to {out}")
    else:
        print("stopped before the first step: nothing saved")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from workbench.controller import ControllerConfig
    from workbench.server import build, close
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    if args.max_num_seqs < 1 or args.max_queue < 0 or args.max_model_len < 2:
        raise InputError("--max-num-seqs must be positive, --max-queue non-negative, --max-model-len at least 2")
    for name in args.ladder.split(","):  # a bad rung fails before the model loads
        Policy.parse(name.strip())
    elastic = ControllerConfig(ladder=tuple(p.strip() for p in args.ladder.split(",") if p.strip()),
                               period_s=args.period, slo_ttft_s=args.slo_ttft) if args.elastic else None
    engine = _engine(args)
    server = build(engine, args.max_num_seqs, args.max_queue, args.max_model_len, args.api_key, elastic)
    print(f"serving {engine.name} ({engine.policy.name}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level="warning")
    finally:
        close(server)
    return 0


def cmd_loadtest(args) -> int:
    import math
    from workbench.loadtest import run_loadtest
    try:
        rates = tuple(float(r) for r in args.rates.split(",") if r.strip())
    except ValueError:
        raise InputError(f"--rates takes comma-separated numbers, got {args.rates!r}") from None
    if any(not r > 0 for r in rates):
        raise InputError("every --rates value must be positive")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    known = {"one-at-a-time", "continuous", "transformers", "elastic"}
    if not modes or set(modes) - known:
        raise InputError(f"--modes takes some of {', '.join(sorted(known))}, got {args.modes!r}")
    if args.requests < 1 or args.prompt_tokens < 1 or args.output_tokens < 1 or args.max_num_seqs < 1:
        raise InputError("--requests, --prompt-tokens, --output-tokens and --max-num-seqs must be positive")
    if not args.overload > 0 or not args.slo_ttft > 0 or not args.slo_tpot > 0 or not args.control_period > 0:
        raise InputError("--overload, --slo-ttft, --slo-tpot and --control-period must be positive")
    ladder = tuple(p.strip() for p in args.ladder.split(",") if p.strip())
    if not ladder:
        raise InputError(f"--ladder needs at least one policy, got {args.ladder!r}")
    for name in ladder:
        Policy.parse(name)
    engine = _engine(args)
    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_loadtest(engine, args.requests, rates or (math.inf,), args.prompt_tokens, args.output_tokens,
                          args.max_num_seqs, args.slo_ttft, args.slo_tpot, modes, ladder, args.overload,
                          args.control_period, seed=args.seed, progress=progress)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for key in ("continuous_vs_one_at_a_time", "continuous_vs_transformers", "elastic_goodput_gain"):
            if result.get(key) is not None:
                print(f"{key.replace('_', ' ')}: {result[key]:.2f}x")
        if result.get("elastic_note"):
            print(f"elastic: {result['elastic_note']}")
        for name, kld in result["ladder_kld"].items():
            print(f"KLD of {name}: {kld:.4f}")
    return 0


def cmd_export(args) -> int:
    from workbench.export import EXPORTERS
    from workbench.export.common import check_target, format_report
    if args.check_tokens < 2:
        raise InputError("--check-tokens must be at least 2")
    check_target(Path(args.out), args.force, folder=args.format == "compressed-tensors")  # before the model load
    engine = _engine(args)
    write, check = EXPORTERS[args.format]
    report = write(engine, args.out, allow_requantize=args.allow_requantize, weights_only=args.weights_only,
                   force=args.force, progress=not args.json)
    if not args.no_check:
        report["check"] = check(engine, args.out, max_tokens=args.check_tokens)
    report_path = Path(str(args.out) + ".report.json")  # beside the export, never inside what it wrote
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report) if args.json else format_report(report))
    return 0


COMMANDS = {"info": cmd_info, "generate": cmd_generate, "eval": cmd_eval, "lab": cmd_lab,
            "calibrate": cmd_calibrate, "sensitivity": cmd_sensitivity, "provision": cmd_provision,
            "bench": cmd_bench, "finetune": cmd_finetune, "serve": cmd_serve,
            "loadtest": cmd_loadtest, "export": cmd_export}


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
    except BrokenPipeError:  # `workbench info --json | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _quiet_libraries() -> None:
    """Library chatter (transformers' load bars and notices) is noise on a command line."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    import transformers
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
