"""How well ``cpubone design`` predicts latency, and whether a designed model meets its budget.

Part A, prediction accuracy: for the 8 released variants and ``--random`` random configs of the default
search space (inside the proxy's range), every unit of every model, every whole model (inference form,
ONNX Runtime, batch 1) and the two calibration references are timed in interleaved rounds, so load
from elsewhere on a shared machine hits table entries and models alike. Entries, fixed overhead and scale
are derived exactly as ``build_lut`` / ``calibrate`` derive them; each model's prediction (fixed overhead
+ scale x sum of its entries) is set against its measured median.

Part B, the real workflow: ``build_lut`` over the whole default space (resumable, in ``--out``), ``search``
for the best proxy under ``--budget-ms`` (default: 75% of B0's predicted latency), then the winner and B0
are measured in interleaved rounds: the winner should come in within 10% of its budget.

At more than one thread, every session of the run shares one ONNX Runtime thread pool (as ``cpubone
design lut`` does; ONNX Runtime allows one pool size per process, so run one thread count > 1 per
process) and every runner's figure is its fastest round's median (``estimate_ms``, as in the table).

Clocks: wall time, and for one thread also CPU time per call (``time.process_time``). On a machine shared
beyond its cores a whole network (milliseconds) is preempted many times per call and a 0.1 ms unit rarely,
so wall-clock medians of whole models grow with the load while the units' do not; CPU time is what one
thread costs on an idle core. One-thread tables in part B use the CPU clock for that reason.

Any engine x precision that ``cpubone design lut`` measures: ``--engine executorch --precision int8`` times the
units, the references and the whole models in that runtime (int8 quantized by the engine's own quantizer,
whole models calibrated on the built-in sample photos, as ``cpubone deploy`` does without ``--calib``).

    PYTHONPATH=src python benchmarks/design_accuracy.py [--engine E] [--precision P] [--threads 1 2] [--random 30]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from cpubone.engines.machine import machine_info  # noqa: E402
from cpubone.design.lut import (REFERENCES, LatencyTable, build_lut, estimate_ms, fit_overhead,  # noqa: E402
                                model_runner, overhead_runner, time_rounds, unit_runner, unit_work)
from cpubone.engines.onnxruntime import share_thread_pool  # noqa: E402
from cpubone.design.predict import predict_latency  # noqa: E402
from cpubone.design.search import SearchSpace, released_units, sample_config, score, search, space_units  # noqa: E402
from cpubone.design.units import model_units  # noqa: E402
from cpubone.models import VARIANTS, load_config, variant_config  # noqa: E402

ENGINE = "onnxruntime"  # set from --engine
PRECISION = "fp32"  # set from --precision


def clocks_for(threads: int):
    return ("wall", "cpu") if threads == 1 else ("wall",)


def random_configs(n: int, size, seed: int) -> dict:
    """``n`` random designs of the default space whose proxy is in range (as the search would keep)."""
    space, rng, out = SearchSpace(), random.Random(seed), {}
    while len(out) < n:
        cfg = sample_config(space, rng, f"random_{len(out):02d}")
        units = dict.fromkeys(u for _, u in model_units(cfg, size))
        work = LatencyTable(ENGINE, 1, {}, 0.0, {u.key: dict(zip(("macs", "params"), unit_work(u)), ms=0.0)
                                                 for u in units})
        if score(cfg, work, size).in_range:
            out[cfg["name"]] = cfg
    return out


def part_a(threads: int, size, n_random: int, rounds: int, runs: int, seed: int) -> dict:
    configs = {n: variant_config(n) for n in VARIANTS}
    configs.update(random_configs(n_random, size, seed))
    refs = [load_config(r) for r in REFERENCES]
    ref_units = [[u for _, u in model_units(cfg, size)] for cfg in refs]
    units = list(dict.fromkeys([u for c in configs.values() for _, u in model_units(c, size)]
                               + [u for us in ref_units for u in us]))
    print(f"[{threads} thread(s)] {len(configs)} models, {len(units)} distinct units", file=sys.stderr)
    result = {}
    runners = {"call": overhead_runner(ENGINE, threads)}
    for cfg in refs:
        runners["ref:" + cfg["name"]] = model_runner(cfg, size, ENGINE, threads, PRECISION)
    for u in units:
        runners[u.key] = unit_runner(u, ENGINE, threads, PRECISION)
    for name, cfg in configs.items():
        runners["model:" + name] = model_runner(cfg, size, ENGINE, threads, PRECISION)
    for clock in clocks_for(threads):
        t0 = time.time()
        med = {k: estimate_ms(v, runs, threads) for k, v in
               time_rounds(runners, threads, rounds, runs, 2, clock).items()}
        print(f"[{threads} thread(s)] {clock} clock: {len(runners)} runners x {rounds} rounds in "
              f"{time.time() - t0:.0f} s", file=sys.stderr)
        call = med["call"]
        sums = [sum(max(med[u.key] - call, 0.0) for u in us) for us in ref_units]
        fixed, scale = fit_overhead([med["ref:" + cfg["name"]] for cfg in refs], sums, call)
        key = f"{size[0]}x{size[1]}"
        table = LatencyTable(ENGINE, threads, {}, call, {u.key: dict(ms=max(med[u.key] - call, 0.0))
                                                         for u in units}, fixed_ms={key: fixed}, scale={key: scale})
        rows = []
        for name, cfg in configs.items():
            pred, _ = predict_latency(cfg, table, size)
            meas = med["model:" + name]
            rows.append(dict(model=name, predicted_ms=round(pred, 3), measured_ms=round(meas, 3),
                             error_pct=round(100 * (pred - meas) / meas, 1)))
        errs = [abs(r["error_pct"]) for r in rows]
        result[clock] = dict(rows=rows, fixed_overhead_ms=round(fixed, 3), scale=round(scale, 3),
                             median_abs_error_pct=statistics.median(errs),
                             within_5_pct=round(100 * sum(e <= 5 for e in errs) / len(errs), 1),
                             within_10_pct=round(100 * sum(e <= 10 for e in errs) / len(errs), 1),
                             worst_abs_error_pct=max(errs),
                             released_median_abs_error_pct=statistics.median(errs[: len(VARIANTS)]),
                             random_median_abs_error_pct=statistics.median(errs[len(VARIANTS):]),
                             # every runner's figure, to trace an error to the entries behind it
                             measured_ms={k: round(v, 5) for k, v in med.items()})
    return result


def part_b(threads: int, size, out: Path, budget_ms, rounds: int, lut_runs: int) -> dict:
    clock = "cpu" if threads == 1 else "wall"
    lut_path = out / f"lut_{ENGINE}_{PRECISION}_{size[0]}x{size[1]}_t{threads}_{clock}.json"
    units = released_units(size) + space_units(SearchSpace(), size)
    t0 = time.time()
    table = build_lut(units, lut_path, engine=ENGINE, precision=PRECISION, threads=threads, runs=lut_runs, warmup=3,
                      progress=False, clock=clock, sizes=[size])
    lut_s = time.time() - t0
    b0 = score(variant_config("cpubone_b0"), table, size)
    budget = budget_ms or round(0.75 * b0.latency_ms, 2)
    res = search(table, budget, size, name="designed")
    if res.best is None:
        return dict(budget_ms=budget, error="no design fits the budget")
    out_b = dict(lut=str(lut_path), lut_clock=clock, lut_entries=len(table.entries), lut_build_s=round(lut_s, 1),
                 budget_ms=budget, predicted_ms=round(res.best.latency_ms, 3), proxy_top1=round(res.best.proxy, 2),
                 b0_predicted_ms=round(b0.latency_ms, 3), config=res.best.config)
    runners = {"designed": model_runner(res.best.config, size, ENGINE, threads, PRECISION),
               "cpubone_b0": model_runner(variant_config("cpubone_b0"), size, ENGINE, threads, PRECISION)}
    for c in clocks_for(threads):
        med = {k: estimate_ms(v, 10, threads) for k, v in
               time_rounds(runners, threads, rounds, 10, 3, c).items()}
        out_b[c] = dict(measured_ms=round(med["designed"], 3), measured_over_budget=round(med["designed"] / budget, 3),
                        b0_measured_ms=round(med["cpubone_b0"], 3),
                        designed_over_b0=round(med["designed"] / med["cpubone_b0"], 3))
    return out_b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="onnxruntime", help="runtime of the table and the models (default onnxruntime)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, nargs=2, default=(224, 224))
    ap.add_argument("--random", type=int, default=30, help="random configs of the space (default 30)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=4, help="calls per runner per round (default 4)")
    ap.add_argument("--lut-runs", type=int, default=10, help="timed calls per unit in part B's table (default 10)")
    ap.add_argument("--budget-ms", type=float, help="part B's budget (default 75%% of B0's predicted latency)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-design", action="store_true", help="part A only")
    ap.add_argument("--out", default="cpubone-design-bench", help="tables and results go here")
    args = ap.parse_args(argv)
    global ENGINE, PRECISION
    ENGINE, PRECISION = args.engine, args.precision
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = tuple(args.size)
    report = dict(machine=machine_info().to_dict(), size=list(size), args=vars(args), results={})
    shared = ENGINE == "onnxruntime" and len(args.threads) == 1 and args.threads[0] > 1 and share_thread_pool(args.threads[0])
    if any(t > 1 for t in args.threads) and not shared:
        print("note: sessions at more than one thread keep a pool each here (one ONNX Runtime pool size per "
              "process): run each thread count > 1 on its own (--threads 2) for the table's timing", file=sys.stderr)
    for threads in args.threads:
        a = part_a(threads, size, args.random, args.rounds, args.runs, args.seed)
        b = None if args.skip_design else part_b(threads, size, out, args.budget_ms, args.rounds, args.lut_runs)
        report["results"][str(threads)] = dict(accuracy=a, design=b)
        (out / "design_accuracy.json").write_text(json.dumps(report, indent=1))
        print(f"\n## {machine_info().header(threads)}")
        how = (f"in {args.rounds} interleaved rounds of {args.runs} calls" if threads == 1 else
               f"in {args.rounds} interleaved rounds of {args.runs} calls, the fastest round's median"
               + (", one shared thread pool" if shared else ", a thread pool per session"))
        print(f"{ENGINE} {PRECISION}, batch 1, {size[0]}x{size[1]}, inference form; entries, references and models "
              f"timed {how}\n")
        stats = list(a)
        print("| model | " + " | ".join(f"predicted ms ({k}) | measured ms ({k}) | error" for k in stats) + " |")
        print("|---|" + "---:|---:|---:|" * len(stats))
        for i, name in enumerate(r["model"] for r in a[stats[0]]["rows"]):
            cells = [a[k]["rows"][i] for k in stats]
            print(f"| {name} | " + " | ".join(f"{c['predicted_ms']:.2f} | {c['measured_ms']:.2f} | {c['error_pct']:+.1f}%"
                                              for c in cells) + " |")
        for k in stats:
            s = a[k]
            print(f"\n{k} clock: {s['within_5_pct']:.0f}% of models within +-5%, {s['within_10_pct']:.0f}% within +-10%; "
                  f"absolute error median {s['median_abs_error_pct']:.1f}% (released "
                  f"{s['released_median_abs_error_pct']:.1f}%, random {s['random_median_abs_error_pct']:.1f}%), "
                  f"worst {s['worst_abs_error_pct']:.1f}%; fixed overhead {s['fixed_overhead_ms']:.2f} ms, "
                  f"scale {s['scale']:.3f}")
        if b is None:
            continue
        if "error" in b:
            print(f"\ndesigned model: {b['error']} ({b['budget_ms']} ms)")
            continue
        print(f"\ndesigned model ({b['lut_clock']}-clock table of {b['lut_entries']} units, built in {b['lut_build_s']} s):"
              f" budget {b['budget_ms']} ms, predicted {b['predicted_ms']:.2f} ms, proxy top-1 {b['proxy_top1']}")
        for k in clocks_for(threads):
            s = b[k]
            print(f"  {k} clock: measured {s['measured_ms']:.2f} ms = {s['measured_over_budget']:.2f}x the budget; "
                  f"B0 {s['b0_measured_ms']:.2f} ms in the same rounds (designed/B0 {s['designed_over_b0']:.2f})")
    print(f"\nwrote {out / 'design_accuracy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
