"""``cpubone bench``, ``cpubone profile`` and ``cpubone blocks``: latency, MACs and MACpS on this CPU."""
from __future__ import annotations

import argparse
import sys


def _engine_args(p: argparse.ArgumentParser, runs: int, warmup: int, choices=("onnxruntime", "eager"),
                 engine_help: str = "ONNX Runtime (default, the paper's CPU path) or PyTorch eager") -> None:
    p.add_argument("--engine", choices=choices, default="onnxruntime", help=engine_help)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, pinned (default 1)")
    p.add_argument("--runs", type=int, default=runs, help=f"timed runs per measurement (default {runs})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up runs (default {warmup})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="batch-1 latency, MACs and MACpS of CPUBone vs peers on this CPU")
    p.add_argument("models", nargs="*", help="CPUBone variants / timm models (default: CPUBone nano, t0, b0, b1 "
                                             "and seven timm peers)")
    p.add_argument("--engine", default="onnxruntime",
                   help="comma-separated runtimes: onnxruntime (default), openvino, executorch, litert, ncnn, eager, "
                        "compile, or 'all' installed; every model runs in each (see `cpubone engines`)")
    p.add_argument("--precision", default="fp32",
                   help="comma-separated precisions: fp32 (default), bf16, int8; each engine runs those it can")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, pinned (default 1)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per measurement (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs (default 10)")
    p.add_argument("--size", type=int, default=224, help="input side S, S x S (default 224)")
    p.add_argument("--channels-last", action="store_true", help="eager engine: channels_last memory format")
    p.add_argument("--rounds", type=int, default=5,
                   help="time the models in this many interleaved rounds (default 5; 1 = one model after another)")
    p.add_argument("--out", default="cpubone-bench", help="report directory (default ./cpubone-bench)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)

    p = sub.add_parser("profile", help="where a model's time goes: per block, block kind and op type")
    p.add_argument("model", help="CPUBone variant or timm model")
    # no choices: every engine name reaches the library, which says in one line which runtimes can profile
    _engine_args(p, runs=20, warmup=5, choices=None,
                 engine_help="onnxruntime (default: its session profiler), openvino (its per-node counters, with "
                             "the kernel each node runs) or eager (forward hooks)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (default); onnxruntime: int8; openvino: bf16, int8 (as in `cpubone bench`)")
    p.add_argument("--size", type=int, default=224, help="input side S, S x S (default 224)")
    p.add_argument("--out", default="cpubone-bench", help="report directory (default ./cpubone-bench)")
    p.set_defaults(func=_profile)

    p = sub.add_parser("blocks", help="the design-rule sweep: block variants x widths x kernels x groups")
    _engine_args(p, runs=20, warmup=3)
    p.add_argument("--quick", action="store_true", help="a tiny sweep (3 widths, groups 1 and 2)")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="channel widths to sweep")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds over all blocks (default 3)")
    p.add_argument("--out", default="cpubone-bench", help="report directory (default ./cpubone-bench)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_blocks)


def _bench(args: argparse.Namespace) -> int:
    from ..analysis.bench import run_bench
    from ..analysis.report import unplotted_models
    from ..outputs import ResultsNotWritten
    from . import UserError
    from ._render import print_table

    if args.channels_last and "eager" not in args.engine.split(","):
        raise UserError("--channels-last applies to --engine eager only (the other runtimes pick their own layout)")
    try:
        res = run_bench(args.models, engine=args.engine, threads=args.threads, size=args.size, runs=args.runs,
                        warmup=args.warmup, channels_last=args.channels_last, rounds=args.rounds, out_dir=args.out,
                        progress=not args.no_progress, precision=args.precision)
        late_error = None
    except ResultsNotWritten as e:  # measured, not saved: show the figures before the error
        res, late_error = e.result, e
    print(res.machine.header(res.threads))
    for precision, pk in (res.peaks or {"fp32": res.peak}).items():
        print(f"{precision} GEMM peak: {pk.gmacps:.1f} GMAC/s ({pk.method})")
    many = len({(r.engine, r.precision) for r in res.rows}) > 1
    rows = [dict(model=r.model, **(dict(engine=r.engine, precision=r.precision, ratio=r.ratio) if many else {}),
                 params=r.params, MACs=r.macs, median_ms=r.median_ms, p10_ms=r.p10_ms,
                 p90_ms=r.p90_ms, GMACps=r.gmacps, peak_pct=r.peak_pct, top1=r.top1,
                 reparam="yes" if r.deploy_form else "") for r in res.rows]
    if rows:
        rows += [dict({k: None for k in rows[0]}, model=m, reparam="FAILED") for m in res.failed]
    else:
        rows = [dict(model=m, reparam="FAILED") for m in res.failed]
    print_table(rows, title=f"batch 1, {res.size}x{res.size}, {res.engine}, {','.join(res.precisions)}, "
                            f"{res.threads} thread(s)" + ("; ratio = median / the model's first row" if many else ""))
    for reason in res.failed.values():
        print(f"cpubone bench: not measured: {reason}", file=sys.stderr)
    for s in res.skipped:
        print(f"not run: {s}")
    missing = unplotted_models([r.to_dict() for r in res.rows])
    if late_error is not None:
        print(f"cpubone bench: error: {late_error}", file=sys.stderr)
        return 2
    if missing:
        print(f"not in bench.png (no published top-1): {', '.join(missing)}")
    _written(res.files)
    return 1 if res.failed else 0


def _written(files) -> None:
    from ..analysis.report import NO_PLOT

    print("written: " + ", ".join(files.values()))
    if not any(str(f).endswith(".png") for f in files.values()):
        print(NO_PLOT)


def _profile(args: argparse.Namespace) -> int:
    from ..analysis.profile import profile_model
    from ..outputs import ResultsNotWritten
    from ._render import print_table

    try:
        res = profile_model(args.model, engine=args.engine, threads=args.threads, size=args.size, runs=args.runs,
                            warmup=args.warmup, out_dir=args.out, precision=args.precision)
        late_error = None
    except ResultsNotWritten as e:  # measured, not saved: show the figures before the error
        res, late_error = e.result, e
    print(res.machine_header)
    print_table(res.kinds, title=f"{res.model}: {res.engine} {res.precision}, by block kind")
    print_table(res.blocks, title="by block")
    print_table(res.ops, title="by op type")
    if res.kernels:
        print_table(res.kernels, title="by kernel (op type x the kernel the runtime picked)")
    print(f"measured latency (harness, median): {res.measured_ms:.2f} ms; sum of profiled block times: "
          f"{res.profiled_ms:.2f} ms")
    print(f"predicted latency = sum MACs / MACpS: {res.predicted_ms:.2f} ms (blocks that do MACs, own MACpS); "
          f"{res.floor_ms:.2f} ms at the GEMM peak of {res.peak_gmacps:.1f} GMAC/s")
    if late_error is not None:
        print(f"cpubone profile: error: {late_error}", file=sys.stderr)
        return 2
    _written(res.files)
    return 0


def _blocks(args: argparse.Namespace) -> int:
    from ..analysis.blocks import run_block_sweep
    from ..outputs import ResultsNotWritten
    from ._render import print_table

    try:
        res = run_block_sweep(widths=args.widths, quick=args.quick, engine=args.engine, threads=args.threads,
                              runs=args.runs, warmup=args.warmup, rounds=args.rounds, out_dir=args.out,
                              progress=not args.no_progress)
        late_error = None
    except ResultsNotWritten as e:  # measured, not saved: show the figures before the error
        res, late_error = e.result, e
    print(res.machine_header)
    print_table(res.preferred, title="fused vs unfused (groups 2) per kernel and width: the higher MACpS is preferred")
    print_table(res.rules, title="design rules measured on this machine")
    if late_error is not None:
        print(f"cpubone blocks: error: {late_error}", file=sys.stderr)
        return 2
    _written(res.files)
    return 0
