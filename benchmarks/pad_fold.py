"""How much the separate Pad nodes of 2x2 "same" convs cost in ONNX Runtime, measured side by side.

    PYTHONPATH=src python benchmarks/pad_fold.py [--model cpubone_b0] [--size 224] [--threads 1]

A stride-1 2x2 conv keeps the map size with an asymmetric zero pad (1 left/top, 0 right/bottom). The
TorchScript export writes it as a ``Pad`` node whose pads are computed (Reshape -> Cast), which ONNX
Runtime neither folds into the conv nor keeps in its blocked (NCHWc) layout. ONNX's Conv takes
asymmetric ``pads`` itself, so this script moves each zero Pad that feeds only a Conv into that Conv's
``pads`` attribute, checks the outputs are unchanged, and times both graphs in interleaved rounds.
The folded pads are CPUBone's (1 left/top, 0 right/bottom); the output check would catch any other.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def fold_pads(src: Path, dst: Path) -> int:
    """Write ``src`` with every Pad -> Conv pair (Conv without pads of its own) folded; returns how many."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    graph = model.graph
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Pad" or any(a.name == "mode" and a.s not in (b"", b"constant") for a in node.attribute):
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Conv":
            continue
        conv = users[0]
        own = [a for a in conv.attribute if a.name == "pads"]
        if own and any(own[0].ints):
            continue
        for a in own:
            conv.attribute.remove(a)
        # F.pad(x, (1, 0, 1, 0)) = left 1, right 0, top 1, bottom 0 -> ONNX [top, left, bottom, right]
        conv.attribute.append(helper.make_attribute("pads", [1, 1, 0, 0]))
        conv.input[0] = node.input[0]
        graph.node.remove(node)
        folded += 1
    onnx.save(model, str(dst))
    return folded


def main(argv=None) -> int:
    from cpubone import create_model
    from cpubone.engines.onnx_export import export_onnx
    from cpubone.engines import get_engine
    from cpubone.engines.onnxruntime import ort_session
    from cpubone.engines.timing import summarize_times, time_callable
    from cpubone.engines.machine import machine_info

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cpubone_b0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)

    # the plain (training-form) export: cpubone.deploy's inference form already exports fusable pads
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    shape = (1, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        src = export_onnx(model, Path(tmp) / "plain.onnx", (args.size, args.size))
        dst = Path(tmp) / "folded.onnx"
        n = fold_pads(src, dst)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        a = ort_session(src, args.threads).run(None, {"input": x})[0]
        b = ort_session(dst, args.threads).run(None, {"input": x})[0]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
        ort = get_engine("onnxruntime", for_load=True)
        runners = {"exported": ort.load(src, args.threads).timer(), "pads folded": ort.load(dst, args.threads).timer()}
        times = {k: [] for k in runners}
        per_round = max(1, args.runs // args.rounds)
        for r in range(args.rounds):
            for k, fn in runners.items():
                time_callable(fn, per_round, 5 if r == 0 else 2, args.threads, "onnxruntime", times=times[k])
    res = {k: summarize_times(t, 5, args.threads, "onnxruntime") for k, t in times.items()}
    print(machine_info().header(args.threads))
    print(f"{args.model} at {args.size}x{args.size}: {n} Pad nodes folded into their convs (outputs unchanged)")
    for k, lat in res.items():
        print(f"  {k:12s} median {lat.median_ms:7.2f} ms  p10 {lat.p10_ms:7.2f}  p90 {lat.p90_ms:7.2f}  min {lat.min_ms:7.2f}")
    print(f"  folded / exported latency: {res['pads folded'].median_ms / res['exported'].median_ms:.3f} (median), "
          f"{res['pads folded'].min_ms / res['exported'].min_ms:.3f} (min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
