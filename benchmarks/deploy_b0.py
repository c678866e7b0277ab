"""Inference form vs timm's CPUBone-B0, side by side in one run: eager PyTorch and ONNX Runtime.

Batch 1, one thread, 224x224, identical weights: timm's ``cpubone_b0_bfrobust`` (with non-trivial
BatchNorm statistics, or pretrained weights with --pretrained) is loaded into our ``cpubone_b0`` with
``load_checkpoint`` (which folds timm's extra BatchNorms), then rewritten by ``reparameterize``.

Goals (issue 4): eager, our inference form <= 0.6x timm's latency; ONNX Runtime, our export <= 0.9x
timm's model exported the same way, i.e. >= 90% of this machine's fp32 GEMM MAC/s.

Engines are measured in interleaved rounds (the machine may be shared); each figure is the median of
the per-round medians. ``--profile`` adds ONNX Runtime's per-op-type profile of both exports and the
node types left in the optimized graphs, and torch.profiler's per-aten-op eager profiles.

    python benchmarks/deploy_b0.py [--rounds 3] [--runs 30] [--pretrained] [--profile] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from cpubone import create_model, load_checkpoint  # noqa: E402
from cpubone.engines import get_engine  # noqa: E402
from cpubone.engines.eager import measure_eager  # noqa: E402
from cpubone.engines.onnxruntime import ort_session  # noqa: E402
from cpubone.engines.timing import time_callable  # noqa: E402
from cpubone.models.macs import count_macs  # noqa: E402
from cpubone.engines.onnx_export import export_onnx  # noqa: E402
from cpubone.models.reparam import reparameterize  # noqa: E402

SHAPE = (1, 3, 224, 224)


def machine_and_peak(runs: int):
    """(CPU name, ORT fp32 GEMM GMAC/s at one thread, how it was measured)."""
    from cpubone.engines.machine import gemm_peak, machine_info

    peak = gemm_peak("onnxruntime", threads=1, runs=runs)
    return machine_info().cpu, peak.gmacps, peak.method


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics (fresh ones would make BN folding trivially exact)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return model.eval()


def ort_profile(path: Path, runs: int = 20) -> Dict[str, float]:
    """ms per run by ONNX Runtime op type (its own profiler, through the engine layer)."""
    from cpubone.engines import get_engine, load_artifact

    nodes = get_engine("onnxruntime").profile_nodes(load_artifact(path, threads=1), runs=runs)
    agg: Dict[str, float] = collections.Counter()
    for n in nodes:
        agg[n.op] += n.ms
    return dict(sorted(agg.items(), key=lambda kv: -kv[1]))


def eager_profile(model: nn.Module, channels_last: bool, runs: int = 10) -> Dict[str, float]:
    """ms per run by aten op (self CPU time, torch.profiler), plus the op-call count per run."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(SHAPE)
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    out = {e.key: e.self_cpu_time_total / 1000 / runs for e in rows}
    out["(aten calls per run)"] = sum(e.count for e in rows) / runs
    return out


def optimized_node_types(path: Path, tmp: Path) -> Dict[str, int]:
    out = tmp / (path.stem + ".opt.onnx")
    ort_session(path, threads=1, optimized_model_path=str(out))
    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node).most_common())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per engine per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the HF cache)")
    ap.add_argument("--profile", action="store_true", help="ORT per-op-type profiles and optimized-graph node types")
    ap.add_argument("--json", help="write all figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)

    cpu, peak, peak_method = machine_and_peak(args.runs)
    print(f"machine: {cpu}; torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}; "
          f"batch 1, 1 thread, {SHAPE[2]}x{SHAPE[3]}")
    print(f"fp32 GEMM peak: {peak:.1f} GMAC/s ({peak_method})")

    timm_model = create_model("timm/cpubone_b0_bfrobust", pretrained=args.pretrained).eval()
    if not args.pretrained:
        trained_like(timm_model)
    ours = create_model("cpubone_b0").eval()
    load_checkpoint(ours, timm_model.state_dict())
    macs = count_macs(ours, SHAPE[2:]).total
    variants = {
        "inference form (pad)": reparameterize(ours, pad_mode="pad"),
        "inference form (crop)": reparameterize(ours, pad_mode="crop"),
        "inference form (pad, grouped kept)": reparameterize(ours, pad_mode="pad", densify_below=0),
    }
    x = torch.randn(SHAPE)
    with torch.no_grad():
        ref = timm_model(x)
        diffs = {k: float((m(x) - ref).abs().max()) for k, m in variants.items()}
    print(f"CPUBone-B0: {macs / 1e6:.1f}M MACs (count_macs); max |ours - timm| on one input: "
          + ", ".join(f"{k}: {v:.1e}" for k, v in diffs.items()))

    eager: Dict[str, Callable[[], float]] = {
        "timm cpubone_b0_bfrobust": lambda: measure_eager(timm_model, SHAPE, 1, args.runs, args.warmup).median_ms,
        "timm cpubone_b0_bfrobust, channels_last": lambda: measure_eager(
            copy.deepcopy(timm_model), SHAPE, 1, args.runs, args.warmup, channels_last=True).median_ms,
        "ours, training form": lambda: measure_eager(ours, SHAPE, 1, args.runs, args.warmup).median_ms,
    }
    for k, m in variants.items():
        eager[k] = (lambda m=m: measure_eager(m, SHAPE, 1, args.runs, args.warmup).median_ms)
        eager[k + ", channels_last"] = (lambda m=m: measure_eager(copy.deepcopy(m), SHAPE, 1, args.runs, args.warmup,
                                                                  channels_last=True).median_ms)

    tmp = Path(tempfile.mkdtemp(prefix="deploy_b0_"))
    files = {"timm cpubone_b0_bfrobust": export_onnx(timm_model, tmp / "timm.onnx", SHAPE[2:])}
    for i, (k, m) in enumerate(variants.items()):
        files[k] = export_onnx(m, tmp / f"ours{i}.onnx", SHAPE[2:])
    ort = get_engine("onnxruntime", for_load=True)
    onnx_fns = {k: (lambda r=ort.load(p, 1): time_callable(r.timer(), args.runs, args.warmup, 1, "onnxruntime").median_ms)
                for k, p in files.items()}

    times: Dict[str, Dict[str, List[float]]] = {"eager": collections.defaultdict(list),
                                                 "onnxruntime": collections.defaultdict(list)}
    for r in range(args.rounds):
        for engine, fns in (("eager", eager), ("onnxruntime", onnx_fns)):
            for k, fn in fns.items():
                times[engine][k].append(fn())
        print(f"  round {r + 1}/{args.rounds} done")
    med = {e: {k: statistics.median(v) for k, v in d.items()} for e, d in times.items()}

    results = dict(machine=cpu, gemm_peak_gmacps=peak, gemm_method=peak_method, macs=macs, max_abs_diff=diffs,
                   median_ms=med, rounds=args.rounds, runs=args.runs)
    for engine, base in (("eager", "timm cpubone_b0_bfrobust"), ("onnxruntime", "timm cpubone_b0_bfrobust")):
        print(f"\n{engine} (median of {args.rounds} round medians, {args.runs} runs each)")
        print(f"  {'model':48s} {'ms':>7s} {'vs timm':>8s} {'GMAC/s':>7s} {'% GEMM peak':>12s}")
        for k, v in med[engine].items():
            gmacps = macs / (v * 1e-3) / 1e9
            print(f"  {k:48s} {v:7.2f} {v / med[engine][base]:7.2f}x {gmacps:7.1f} {100 * gmacps / peak:11.0f}%")
    best_eager = min((v, k) for k, v in med["eager"].items() if k.startswith("inference"))
    best_ort = min((v, k) for k, v in med["onnxruntime"].items() if k.startswith("inference"))
    e_ratio = best_eager[0] / med["eager"]["timm cpubone_b0_bfrobust"]
    o_ratio = best_ort[0] / med["onnxruntime"]["timm cpubone_b0_bfrobust"]
    o_peak = macs / (best_ort[0] * 1e-3) / 1e9 / peak
    print(f"\ngoal eager <= 0.60x timm: {e_ratio:.2f}x ({best_eager[1]}) -> {'MET' if e_ratio <= 0.6 else 'not met'}")
    print(f"goal ONNX Runtime <= 0.90x timm: {o_ratio:.2f}x ({best_ort[1]}) -> {'MET' if o_ratio <= 0.9 else 'not met'}")
    print(f"goal ONNX Runtime >= 90% of GEMM peak: {100 * o_peak:.0f}% -> {'MET' if o_peak >= 0.9 else 'not met'}")
    results.update(goal_eager_ratio=e_ratio, goal_ort_ratio=o_ratio, goal_ort_peak_fraction=o_peak)

    if args.profile:
        for k in ("timm cpubone_b0_bfrobust", "inference form (pad)"):
            prof = ort_profile(files[k])
            total = sum(prof.values())
            print(f"\nONNX Runtime profile, {k}: {total:.2f} ms of kernel time per run")
            for op, ms in list(prof.items())[:12]:
                print(f"  {op:24s} {ms:6.3f} ms {100 * ms / total:5.1f}%")
            nodes = optimized_node_types(files[k], tmp)
            # Gelu vs Erf: whether ORT fused the exact-GELU pattern into its Gelu op
            shown = ("Pad", "Transpose", "Reshape", "Slice", "ReorderInput", "ReorderOutput", "Gelu", "Erf")
            left = {t: nodes.get(t, 0) for t in shown}
            print(f"  optimized graph: {sum(nodes.values())} nodes; " + ", ".join(f"{t} {n}" for t, n in left.items()))
            results.setdefault("profiles", {})[k] = dict(ms_by_op=prof, optimized_nodes=nodes)
    if args.profile:
        eager_profiled = [("timm cpubone_b0_bfrobust", timm_model, False),
                          ("inference form (pad), channels_last", variants["inference form (pad)"], True)]
        for k, m, cl in eager_profiled:
            prof = eager_profile(m, cl)
            calls = prof.pop("(aten calls per run)")
            total = sum(prof.values())
            print(f"\neager profile (torch.profiler, self CPU), {k}: {total:.2f} ms per run, {calls:.0f} aten calls")
            for op, ms in list(prof.items())[:10]:
                print(f"  {op:32s} {ms:6.3f} ms {100 * ms / total:5.1f}%")
            results.setdefault("eager_profiles", {})[k] = dict(prof, calls_per_run=calls)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
