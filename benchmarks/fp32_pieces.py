"""Where the fp32 engines differ on B0: grouped vs densified convs per engine, and B0 piece by piece.

    python benchmarks/fp32_pieces.py [--model cpubone_b0] [--size 224] [--engines ...] [--runs 30] [--rounds 5]

1. **Grouped or dense.** The inference form makes thin grouped convs dense (``densify_below=16``: B0's
   first downsample, 8 input channels per group) because ONNX Runtime's blocked kernels need whole SIMD
   blocks per group; the XNNPACK engines (ExecuTorch, LiteRT) turn them back into grouped convs
   (``xnnpack_form.regroup_conv``). Every installed engine runs both forms here -- "dense" with that
   regrouping switched off -- as ratios to ONNX Runtime on the dense form (what it ships).
2. **Piece by piece.** The stem, each downsample, each block and the head of the inference form, each
   prepared alone at its own input shape in ONNX Runtime (``torch.onnx.export``) and ExecuTorch, timed in
   the same interleaved rounds, with MACs (of the grouped form: densified MACs multiply zeros) and GMAC/s;
   then the whole network. Pieces alone keep their weights in cache; the whole network does not when its
   weights exceed the last-level cache.

All timings: batch 1, one thread, the project's interleaved harness, the machine named in the first line.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cpubone.engines.machine import machine_info  # noqa: E402
from cpubone.models.macs import count_macs  # noqa: E402
from cpubone.models.reparam import reparameterize  # noqa: E402
from cpubone.engines import available_engines, get_engine  # noqa: E402
from cpubone.engines.onnxruntime import ort_session  # noqa: E402
from cpubone.engines.timing import time_interleaved  # noqa: E402
from cpubone.models import create_model  # noqa: E402

ENGINES = ("onnxruntime", "openvino", "executorch", "litert", "ncnn")


@contextmanager
def regrouping_off():
    """The XNNPACK engines lower the densified conv as it is (for the "dense" column only)."""
    from cpubone.engines import xnnpack_form

    keep = xnnpack_form.regroup_conv
    xnnpack_form.regroup_conv = lambda conv: conv
    try:
        yield
    finally:
        xnnpack_form.regroup_conv = keep


def pieces(form):
    """(name, module) for the stem, every downsample and block, and the head, in order."""
    out = [("stem", form.stem)]
    for i, stage in enumerate(form.stages):
        out.append((f"stages.{i}.downsample", stage.downsample))
        out += [(f"stages.{i}.blocks.{j}", block) for j, block in enumerate(stage.blocks)]
    return out + [("head", form.head)]


def ort_piece(module, shape, workdir: Path):
    """A piece in ONNX Runtime (its input is a feature map, so the model exporter is not used)."""
    path = workdir / "piece.onnx"
    torch.onnx.export(module, (torch.randn(shape),), str(path), dynamo=False, opset_version=17)
    sess = ort_session(path, 1)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return lambda: sess.run(None, {name: x})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cpubone_b0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated; those not installed are skipped")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    installed = set(available_engines())
    engines = [e for e in args.engines.split(",") if e in installed]
    skipped = [e for e in args.engines.split(",") if e not in installed]
    if "onnxruntime" not in engines:
        sys.exit("fp32_pieces.py: needs onnxruntime (the reference)")
    print(machine_info().header(1))
    if skipped:
        print(f"not installed (skipped): {', '.join(skipped)}")
    model = create_model(args.model).eval()
    shape = (1, 3, args.size, args.size)
    tmp = Path(tempfile.mkdtemp(prefix="fp32_pieces_"))
    atexit.register(shutil.rmtree, tmp, True)

    # 1. grouped vs dense, every engine
    forms = {"dense": reparameterize(model), "grouped": reparameterize(model, densify_below=0)}
    calls = {}
    for engine in engines:
        for form_name, form in forms.items():
            workdir = Path(tempfile.mkdtemp(dir=tmp))
            if form_name == "dense":
                with regrouping_off():
                    runner = get_engine(engine).prepare(form, shape, "fp32", workdir=workdir)
            else:
                runner = get_engine(engine).prepare(form, shape, "fp32", workdir=workdir)
            calls[(engine, form_name)] = runner.timer()
    res = time_interleaved({f"{e}/{f}": c for (e, f), c in calls.items()}, args.runs, 5, args.rounds)
    ref = res["onnxruntime/dense"].median_ms
    print(f"\n## {args.model} at {args.size}: dense (densified thin grouped convs) vs grouped, fp32, "
          f"ratio to ONNX Runtime on the dense form\n")
    print("| engine | dense ms | grouped ms | dense ratio | grouped ratio |\n|---|---|---|---|---|")
    for engine in engines:
        d, g = res[f"{engine}/dense"].median_ms, res[f"{engine}/grouped"].median_ms
        print(f"| {engine} | {d:.2f} | {g:.2f} | {d / ref:.2f} | {g / ref:.2f} |")

    # 2. piece by piece, ONNX Runtime vs ExecuTorch (the shipped form each engine gets)
    if "executorch" not in engines:
        print("\n(piece by piece needs executorch: skipped)")
        return 0
    form = forms["dense"]
    x, shapes = torch.randn(shape), []
    with torch.no_grad():
        for _, module in pieces(form):
            shapes.append(tuple(x.shape))
            x = module(x)
    calls, macs = {}, {}
    # MACs of the grouped form: the densified conv's extra MACs multiply zeros
    real_macs = {name: count_macs(module, torch.randn(s)).total
                 for (name, module), s in zip(pieces(forms["grouped"]), shapes)}
    for (name, module), s in zip(pieces(form), shapes):
        calls[f"onnxruntime/{name}"] = ort_piece(module, s, Path(tempfile.mkdtemp(dir=tmp)))
        calls[f"executorch/{name}"] = get_engine("executorch").prepare(
            module, s, "fp32", workdir=Path(tempfile.mkdtemp(dir=tmp))).timer()
        macs[name] = real_macs[name]
    for engine in ("onnxruntime", "executorch"):
        calls[f"{engine}/whole"] = get_engine(engine).prepare(
            form, shape, "fp32", workdir=Path(tempfile.mkdtemp(dir=tmp))).timer()
    res = time_interleaved(calls, args.runs, 5, args.rounds)
    print(f"\n## {args.model} piece by piece, fp32 (each piece alone at its input shape)\n")
    print("| piece | MMACs | ONNX Runtime ms | GMAC/s | ExecuTorch ms | GMAC/s | ExecuTorch / ONNX Runtime |")
    print("|---|---|---|---|---|---|---|")
    total = {"onnxruntime": 0.0, "executorch": 0.0}
    for name, _ in pieces(form):
        o, e = res[f"onnxruntime/{name}"].median_ms, res[f"executorch/{name}"].median_ms
        total["onnxruntime"] += o
        total["executorch"] += e
        print(f"| {name} | {macs[name] / 1e6:.1f} | {o:.3f} | {macs[name] / o / 1e6:.1f} | {e:.3f} | "
              f"{macs[name] / e / 1e6:.1f} | {e / o:.2f} |")
    o, e = total["onnxruntime"], total["executorch"]
    print(f"| sum of pieces | {sum(macs.values()) / 1e6:.1f} | {o:.2f} | | {e:.2f} | | {e / o:.2f} |")
    o, e = res["onnxruntime/whole"].median_ms, res["executorch/whole"].median_ms
    print(f"| whole network | | {o:.2f} | | {e:.2f} | | {e / o:.2f} |")
    params = sum(p.numel() for p in form.parameters())
    print(f"\nweights: {params / 1e6:.2f} M parameters = {params * 4 / 2 ** 20:.0f} MiB in fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
