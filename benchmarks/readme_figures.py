"""Produce the README's benchmark figures and print the latency ratios they support.

    PYTHONPATH=src python benchmarks/readme_figures.py                 # full run (about 5 min on 2 cores)
    PYTHONPATH=src python benchmarks/readme_figures.py --quick         # smoke test of the script
    PYTHONPATH=src python benchmarks/readme_figures.py --threads 4 --out docs/figures

Writes into --out: bench.{csv,json,md,png} (`cpubone bench`), profile_cpubone_b0.* (`cpubone profile
cpubone_b0`), blocks.* (`cpubone blocks`) and ratios.md. Latencies are only comparable within one run on one
machine, so the claims are printed as ratios of models measured side by side, with the machine named.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpubone.analysis.bench import DEFAULT_MODELS, run_bench
from cpubone.analysis.blocks import run_block_sweep
from cpubone.analysis.profile import profile_model
from cpubone.analysis.report import markdown_table


def ratio_rows(rows) -> list:
    """Each CPUBone model against each peer: latency ratio, MACs ratio, MACpS ratio, top-1 difference."""
    ours = [r for r in rows if r.family == "CPUBone"]
    peers = [r for r in rows if r.family == "peer"]
    out = []
    for a in ours:
        for b in peers:
            out.append(dict(
                cpubone=a.model, peer=b.model, latency_ratio=a.median_ms / b.median_ms, macs_ratio=a.macs / b.macs,
                macps_ratio=a.gmacps / b.gmacps,
                top1_diff=(a.top1 - b.top1) if a.top1 is not None and b.top1 is not None else None,
            ))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/figures", help="output directory (default docs/figures)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--engine", default="onnxruntime", choices=("onnxruntime", "eager"))
    p.add_argument("--quick", action="store_true", help="small sizes and few runs: checks the script works")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.quick:
        models, size, runs, warmup = ["cpubone_nano", "mobilenetv3_large_100"], 64, 3, 1
    else:
        models, size, runs, warmup = list(DEFAULT_MODELS), 224, 50, 10

    res = run_bench(models, engine=args.engine, threads=args.threads, size=size, runs=runs, warmup=warmup,
                    out_dir=out)
    prof = profile_model("cpubone_nano" if args.quick else "cpubone_b0", engine=args.engine, threads=args.threads,
                         size=size, runs=max(3, runs // 2), warmup=warmup, out_dir=out)
    sweep = run_block_sweep(quick=args.quick, engine=args.engine, threads=args.threads, runs=3 if args.quick else 20,
                            warmup=1 if args.quick else 3, out_dir=out)

    ratios = ratio_rows(res.rows)
    header = (f"Machine: {res.machine.header(res.threads)}\nfp32 GEMM peak: {res.peak.gmacps:.1f} GMAC/s "
              f"({res.peak.method}); engine {res.engine}, batch 1, {size}x{size}, median of {runs} runs")
    text = "\n".join([
        "# Latency ratios, measured side by side in one run", "", header, "",
        "latency_ratio < 1: the CPUBone model is faster than the peer on this machine.", "",
        markdown_table(ratios),
        f"profile {prof.model}: measured {prof.measured_ms:.2f} ms; predicted (sum MACs / MACpS) "
        f"{prof.predicted_ms:.2f} ms; floor at GEMM peak {prof.floor_ms:.2f} ms", "",
        "Design rules on this machine:", "", markdown_table(sweep.rules),
    ])
    (out / "ratios.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
