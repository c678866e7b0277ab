"""Batch-1 CPU latency of the RetinaNet and Semantic FPN networks in every CPU runtime, in one run.

    PYTHONPATH=src python benchmarks/downstream_engines.py \
        --engines onnxruntime,openvino,executorch,ncnn,eager --precisions fp32,int8 --runs 5   # docs/downstream.md
    PYTHONPATH=src python benchmarks/downstream_engines.py --backbones cpubone_nano --size 128 --runs 3  # quick check

Per task, a table with one row per backbone x engine x precision: the median (p10-p90) of the runs, the
ratio to the network's first engine x precision (all timed in the same interleaved rounds, so load from
elsewhere on the machine hits them alike) and the largest output difference from eager PyTorch fp32,
relative to max(1, |output|). fp32 out of an engine's tolerance is refused, not timed; int8 and bf16
differences are shown but not judged: the weights are random, so they say nothing about quality.
Engines that cannot take a network are listed below the table with the reason. Names the machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cpubone.cli._render import print_table
from cpubone.downstream.bench import bench_engines


def _markdown(rows: list) -> str:
    if not rows:
        return "(nothing timed)"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["cpubone_b0", "mobilenetv3_large_100"])
    p.add_argument("--tasks", default="detect,segment", help="detect, segment or both (comma-separated)")
    p.add_argument("--engines", default="onnxruntime,openvino,executorch,ncnn,eager",
                   help="comma-separated engines of cpubone.engines ('all': every installed one)")
    p.add_argument("--precisions", default="fp32,int8",
                   help="comma-separated: fp32, int8, bf16 (where an engine runs it)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fpn-channels", type=int, default=256)
    p.add_argument("--markdown", action="store_true", help="print Markdown tables (for the docs)")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    # the int8 quantizers warn once per weight; the rows say what matters
    logging.getLogger().setLevel(logging.ERROR)
    try:
        res = bench_engines(a.backbones, [t.strip() for t in a.tasks.split(",") if t.strip()], a.engines,
                            a.precisions, a.size, a.threads, a.runs, a.warmup, a.rounds,
                            fpn_channels=a.fpn_channels, progress=sys.stderr.isatty())
    except ValueError as e:  # bad arguments (the engines' errors are ValueErrors too): one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task in res.tasks:
        if a.markdown:
            print(f"\n{res.title(task)}\n\n{_markdown(res.table(task))}\n")
        else:
            print_table(res.table(task), title=res.title(task))
        for line in res.not_timed(task):
            print(f"  {line}")
    print("int8 / bf16 differences are from random weights: they are shown, not judged (no quality claim).")
    print(f"machine: {res.machine.header(res.threads)}")
    if a.json:
        a.json.write_text(json.dumps(res.to_dict(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
