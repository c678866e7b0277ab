"""The design tool's promise, end to end: a design searched for budget B in the table of engine E and
precision P, deployed with ``cpubone deploy DESIGN.json --engine E --precision P``, runs in <= 1.05 x B.

For each ``--target ENGINE:PRECISION`` (default ONNX Runtime fp32 and the fastest int8 path that deploy
picks on this machine, ExecuTorch int8, with OpenVINO int8 as the torch-free int8 path), at one thread:

1. ``build_lut`` over the search space (resumable, kept in ``--out``; its wall time is printed);
2. ``search`` for the best accuracy proxy under B (default: ``--budget-frac`` of CPUBone-B0's predicted
   latency in that table), the winner written as ``design.json``;
3. ``deploy_model(design.json, engines=[E], precisions=[P])`` -- what ``cpubone deploy`` runs -- writes the
   artifact (int8 calibrated on the built-in sample photos written as files; random weights, so the
   agreement gate is opened: this measures latency, not quality);
4. the deployed artifact and B0 deployed the same way are loaded from their files and timed side by side in
   interleaved rounds; the figure is measured / B.

    PYTHONPATH=src python benchmarks/design_deploy.py [--target onnxruntime:fp32 executorch:int8]
        [--space FILE] [--budget-frac 0.75] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from PIL import Image  # noqa: E402

from cpubone.deploy.auto import deploy_model  # noqa: E402
from cpubone.design.lut import build_lut  # noqa: E402
from cpubone.design.search import SearchSpace, released_units, score, search, space_units  # noqa: E402
from cpubone.engines import engine_class, load_artifact  # noqa: E402
from cpubone.engines.machine import machine_info  # noqa: E402
from cpubone.engines.timing import time_interleaved  # noqa: E402
from cpubone.engines.verify import sample_photos  # noqa: E402
from cpubone.models import save_config, variant_config  # noqa: E402


def photo_folder(out: Path) -> Path:
    folder = out / "calib_photos"
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in sample_photos():
        Image.fromarray(img).convert("RGB").save(folder / f"{name}.png")
    return folder


def deploy(source, out: Path, engine: str, precision: str, calib: Path) -> Path:
    res = deploy_model(str(source), out, calib_dir=calib if precision == "int8" else None, engines=[engine],
                       precisions=[precision], threads=1, min_agreement=1e-9, max_drop=100.0, runs=5, warmup=1,
                       rounds=1, log=lambda s: None)
    return Path(res.artifact)


def run_target(engine: str, precision: str, space: SearchSpace, size, frac: float, out: Path, runs: int,
               rounds: int, lut_runs: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    lut_path = out / f"lut_{engine}_{precision}.json"
    units = released_units(size) + space_units(space, size)
    t0 = time.time()
    table = build_lut(units, lut_path, engine=engine, precision=precision, threads=1, runs=lut_runs, warmup=3,
                      progress=sys.stderr.isatty(), sizes=[size])
    lut_s = time.time() - t0
    b0_pred = score(variant_config("cpubone_b0"), table, size).latency_ms
    budget = round(frac * b0_pred, 3)
    res = search(table, budget, size, space=space, name=f"designed_{engine}_{precision}")
    if res.best is None:
        return dict(engine=engine, precision=precision, budget_ms=budget, error="no design fits the budget")
    design = save_config(res.best.config, out / "design.json")
    calib = photo_folder(out)
    artifact = deploy(design, out / "deployed", engine, precision, calib)
    b0_artifact = deploy("cpubone_b0", out / "deployed_b0", engine, precision, calib)
    runners = {"designed": load_artifact(artifact), "cpubone_b0": load_artifact(b0_artifact)}
    lat = time_interleaved({k: r.timer() for k, r in runners.items()}, runs, 5, rounds, 1)
    measured = lat["designed"].median_ms
    return dict(engine=engine, precision=precision, lut_entries=len(table.entries), lut_build_s=round(lut_s, 1),
                budget_ms=budget, predicted_ms=round(res.best.latency_ms, 3), measured_ms=round(measured, 3),
                measured_over_budget=round(measured / budget, 3), b0_predicted_ms=round(b0_pred, 3),
                b0_measured_ms=round(lat["cpubone_b0"].median_ms, 3), artifact=str(artifact),
                proxy_top1=round(res.best.proxy, 2), design=str(design))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", nargs="+", default=["onnxruntime:fp32", "executorch:int8", "openvino:int8"],
                    help="ENGINE:PRECISION pairs (default onnxruntime:fp32 executorch:int8 openvino:int8)")
    ap.add_argument("--space", help="search space JSON (default: the built-in one)")
    ap.add_argument("--size", type=int, nargs=2, default=(224, 224))
    ap.add_argument("--budget-frac", type=float, default=0.75, help="B = this x B0's predicted latency (default 0.75)")
    ap.add_argument("--runs", type=int, default=60, help="timed calls of each deployed file (default 60)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--lut-runs", type=int, default=10, help="timed calls per unit in the tables (default 10)")
    ap.add_argument("--out", default="cpubone-design-deploy")
    args = ap.parse_args(argv)
    out, size = Path(args.out), tuple(args.size)
    space = SearchSpace.load(args.space) if args.space else SearchSpace()
    report = dict(machine=machine_info().to_dict(), size=list(size), args=vars(args), results=[])
    print(f"## {machine_info().header(1)}")
    print("| engine | precision | table (units, build s) | budget ms | predicted ms | deployed, measured ms | "
          "measured / budget | B0 predicted / measured ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for target in args.target:
        engine, precision = target.split(":")
        if not engine_class(engine).available():
            print(f"| {engine} | {precision} | not installed | | | | | |")
            continue
        r = run_target(engine, precision, space, size, args.budget_frac, out / f"{engine}_{precision}", args.runs,
                       args.rounds, args.lut_runs)
        report["results"].append(r)
        (out / "design_deploy.json").write_text(json.dumps(report, indent=1))
        if "error" in r:
            print(f"| {engine} | {precision} | | {r['budget_ms']} | {r['error']} | | | |")
            continue
        print(f"| {engine} | {precision} | {r['lut_entries']}, {r['lut_build_s']:.0f} | {r['budget_ms']:.2f} | "
              f"{r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | **{r['measured_over_budget']:.2f}** | "
              f"{r['b0_predicted_ms']:.2f} / {r['b0_measured_ms']:.2f} |", flush=True)
    print(f"\nwrote {out / 'design_deploy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
