"""Batch-1 CPU latency of RetinaNet and Semantic FPN at 512x512 on CPUBone and peer backbones, in one run.

    PYTHONPATH=src python benchmarks/downstream_latency.py                      # full (README table)
    PYTHONPATH=src python benchmarks/downstream_latency.py --runs 3 --warmup 1  # quick check

Prints, per task, a table (params, MACs, eager and ONNX Runtime medians) with each model's latency as a
ratio to the first backbone's, naming the machine. Every backbone gets the same head and input size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cpubone.cli._render import print_table
from cpubone.downstream.bench import DEFAULT_PEERS, bench_detection, bench_segmentation


def _with_ratios(result: dict, keys) -> list:
    rows = result["rows"]
    ref = rows[0]
    for r in rows:
        for k in keys:
            if r.get(k) and ref.get(k):
                r[f"{k[:-3]}_x"] = r[k] / ref[k]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["cpubone_b0", "cpubone_b1", *DEFAULT_PEERS[1:]])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tasks", nargs="+", default=["detect", "segment"], choices=["detect", "segment"])
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    out = {}
    if "detect" in a.tasks:
        res = bench_detection(a.backbones, a.size, a.threads, a.runs, a.warmup, num_classes=80)
        rows = _with_ratios(res, ["e2e_eager_ms", "net_eager_ms", "ort_ms"])
        print_table(rows, title=f"RetinaNet (80 classes, FPN P3-P7) {a.size}x{a.size}, batch 1, {a.threads} thread(s), "
                                f"median of {a.runs} runs; *_x = ratio to {rows[0]['backbone']}")
        out["detect"] = res
    if "segment" in a.tasks:
        res = bench_segmentation(a.backbones, a.size, a.threads, a.runs, a.warmup, num_classes=150)
        rows = _with_ratios(res, ["eager_ms", "ort_ms"])
        print_table(rows, title=f"Semantic FPN (150 classes) {a.size}x{a.size}, batch 1, {a.threads} thread(s), "
                                f"median of {a.runs} runs; *_x = ratio to {rows[0]['backbone']}")
        out["segment"] = res
    machine = next(iter(out.values()))["machine"]
    print(f"machine: {machine}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
