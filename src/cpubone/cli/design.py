"""``cpubone design lut|predict|search|config``: a CPUBone-style backbone for your CPU and latency budget."""
from __future__ import annotations

import argparse
import sys
import time


def _count(text: str) -> int:
    """'5M', '500k', '5e6' or '5000000' -> an integer count."""
    t = text.strip().lower()
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count like 5M, 500k or 5000000") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return int(value)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("design", help="latency table, predictor and search for a CPUBone-style backbone on this CPU")
    dsub = p.add_subparsers(dest="design_command", metavar="{lut,predict,search,config}")
    dsub.required = True

    q = dsub.add_parser("lut", help="measure the latency table of the design space on this CPU (resumable)")
    q.add_argument("-o", "--output", required=True, metavar="FILE", help="the table (JSON); an existing one is extended")
    q.add_argument("--engine", default="onnxruntime",
                   help="runtime to measure in, as `cpubone deploy --engine` runs it: onnxruntime (default), "
                        "openvino, executorch, ncnn, litert, eager, compile")
    q.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"),
                   help="precision to measure, as the engine runs it (default fp32)")
    q.add_argument("--calib", metavar="DIR",
                   help="int8: images to calibrate the whole reference networks on (default: built-in sample photos)")
    q.add_argument("--calib-count", type=int, default=16, metavar="N", help="int8: at most N --calib images (default 16)")
    q.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    q.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"), help="input size (default 224 224)")
    q.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: latency (default); cpu: CPU time per call, unaffected by other processes on a "
                        "shared machine (1 thread only)")
    q.add_argument("--runs", type=int, default=20, help="timed calls per unit (default 20)")
    q.add_argument("--warmup", type=int, default=5, help="untimed calls per unit (default 5)")
    q.add_argument("--config", nargs="*", default=(), metavar="CONFIG",
                   help="also cover these designs (config files or variant names)")
    q.add_argument("--no-space", action="store_true", help="cover only the released variants and --config designs")
    q.add_argument("--space", metavar="FILE", help="search space (JSON of SearchSpace fields; default: the built-in one)")
    q.set_defaults(func=_lut)

    q = dsub.add_parser("predict", help="predicted latency, MACs, params and per-stage breakdown of a design")
    q.add_argument("config", help="config file (JSON) or released variant name")
    q.add_argument("--lut", required=True, metavar="FILE", help="latency table from `cpubone design lut`")
    _runtime_args(q)
    q.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the config's, else 224 224)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_predict)

    q = dsub.add_parser("search", help="best accuracy proxy under a latency budget, from a latency table")
    q.add_argument("--budget-ms", type=float, required=True,
                   help="latency budget in ms (batch 1, in the table's engine and precision)")
    q.add_argument("--lut", required=True, metavar="FILE", help="latency table from `cpubone design lut`")
    _runtime_args(q)
    q.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"), help="input size (default 224 224)")
    q.add_argument("--max-params", type=_count, metavar="N", help="parameter limit, e.g. 5M")
    q.add_argument("--samples", type=int, default=4000, help="random candidates (default 4000)")
    q.add_argument("--mutations", type=int, default=2000, help="hill-climbing steps (default 2000)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    q.add_argument("--space", metavar="FILE", help="search space (JSON of SearchSpace fields; default: the built-in one)")
    q.add_argument("--name", default="cpubone_design", help="name of the designed model (default cpubone_design)")
    q.add_argument("--out-dir", default="cpubone-design", metavar="DIR",
                   help="writes design.json, search.json and search.png there (default cpubone-design)")
    q.add_argument("-o", "--output", metavar="FILE", help="the winner's config (default OUT_DIR/design.json)")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=_search)

    q = dsub.add_parser("config", help="write a released variant (or a config) as a complete design config")
    q.add_argument("model", help="released variant name or config file")
    q.add_argument("-o", "--output", metavar="FILE", help="file to write (default: print)")
    q.set_defaults(func=_config)


def _runtime_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--engine", help="the runtime you deploy with: refuse a table measured for another one")
    q.add_argument("--precision", choices=("fp32", "bf16", "int8"),
                   help="the precision you deploy in: refuse a table measured for another one")


def _table(args: argparse.Namespace):
    from ..design.lut import check_table_for, load_lut

    lut = load_lut(args.lut)
    check_table_for(lut, args.engine, args.precision)
    return lut


def _load(source: str):
    from ..models import is_config_source, load_config, variant_config

    return load_config(source) if is_config_source(source) else variant_config(source)


def _lut(args: argparse.Namespace) -> int:
    from ..design.lut import build_lut
    from ..design.search import SearchSpace, released_units, space_units
    from ..design.units import model_units

    size = tuple(args.size)
    if min(size) < 32:
        raise ValueError(f"size {size[0]}x{size[1]}: height and width must be at least 32")
    units = released_units(size)
    if not args.no_space:
        units += space_units(SearchSpace.load(args.space) if args.space else SearchSpace(), size)
    for source in args.config:
        units += [u for _, u in model_units(_load(source), size)]
    calib = None
    if args.precision == "int8" and args.calib:
        from ..preprocess import PreprocessConfig, calibration_samples

        calib = calibration_samples(args.calib, PreprocessConfig(input_size=(3, *size)), args.calib_count)
    if args.threads > 1 and args.engine == "onnxruntime":
        from ..engines.onnxruntime import share_thread_pool

        share_thread_pool(args.threads)  # one pool for all the units' sessions, as inside a network
    started = time.monotonic()
    table = build_lut(units, args.output, engine=args.engine, threads=args.threads, runs=args.runs,
                      warmup=args.warmup, clock=args.clock, sizes=[size], precision=args.precision, calib=calib)
    print(f"wrote {args.output}: {table.describe()}; fixed overhead at {size[0]}x{size[1]} "
          f"{table.fixed_overhead(size):.3f} ms (per call {table.overhead_ms * 1e3:.0f} us); "
          f"built in {time.monotonic() - started:.0f} s")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ..design.predict import predict
    from ._render import print_json, print_table

    pred = predict(args.config, _table(args), size=tuple(args.size) if args.size else None)
    if args.json:
        print_json(pred.to_dict())
        return 0
    print(f"{pred.name} at {pred.size[0]}x{pred.size[1]}: predicted {pred.latency_ms:.2f} ms "
          f"(incl. {pred.overhead_ms:.3f} ms fixed overhead), {pred.macs:,} MACs, {pred.params:,} params")
    print(f"table: {pred.lut}")
    print_table(pred.stages, title="per stage")
    return 0


def _search(args: argparse.Namespace) -> int:

    from ..design.search import SearchSpace, plot_search, search
    from ..models import save_config
    from ..outputs import check_output_dir, check_output_file
    from ..results import NO_PLOT, optional_plot, write_json
    from ._render import print_json, print_table

    out_dir = check_output_dir(args.out_dir, inputs=[args.lut, args.space])
    output = check_output_file(args.output if args.output else out_dir / "design.json", inputs=[args.lut, args.space])
    lut = _table(args)
    space = SearchSpace.load(args.space) if args.space else None
    res = search(lut, args.budget_ms, tuple(args.size), args.max_params, space=space, samples=args.samples,
                 mutations=args.mutations, seed=args.seed, name=args.name)
    files = {}
    if res.best is not None:
        files["config"] = str(save_config(res.best.config, output))
    files["json"] = str(write_json(res.to_dict(), out_dir / "search.json"))
    title = f"cpubone design search: {lut.describe()}"
    png = optional_plot(plot_search, res, out_dir / "search.png", title)
    if png is not None:
        files["png"] = str(png)
    else:
        print(NO_PLOT, file=sys.stderr)
    if args.json:
        print_json(dict(res.to_dict(), files=files))
        return 0 if res.best else 1
    limit = f", at most {args.max_params:,} params" if args.max_params else ""
    print(f"{res.evaluated} candidates at {res.size[0]}x{res.size[1]}, budget {res.budget_ms:g} ms{limit} "
          f"in {lut.engine} {lut.precision} at {lut.threads} thread(s) (deploy with `cpubone deploy DESIGN.json "
          f"--engine {lut.engine} --precision {lut.precision}`); table: {lut.describe()}")
    # the front near the budget (all of it is in search.json and the plot), with every released variant
    shown = [c for c in res.front if c.latency_ms <= 2 * res.budget_ms]
    placed = sorted([dict(c.row(), on="front") for c in shown]
                    + [dict(c.row(), on="released") for c in res.released], key=lambda r: r["latency_ms"])
    more = len(res.front) - len(shown)
    print_table(placed, title="Pareto front (predicted latency vs accuracy proxy) with the released variants"
                + (f"; {more} slower front points in search.json" if more else ""))
    if res.best is None:
        print(f"no design of the space fits {res.budget_ms:g} ms{limit}: the fastest in-range one needs "
              f"{min(c.latency_ms for c in res.front):.2f} ms" if res.front else "no candidate")
        return 1
    b = res.best
    print(f"winner {b.config['name']}: predicted {b.latency_ms:.2f} ms, proxy top-1 {b.proxy:.2f}, {b.macs:,} MACs, "
          f"{b.params:,} params, depth {b.depth}")
    print_table(res.choices, title="choices per width on this machine vs the paper's rules")
    print("wrote " + ", ".join(files.values()))
    return 0


def _config(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from ..models import save_config

    cfg = _load(args.model)
    if args.output:
        print(f"wrote {save_config(cfg, args.output)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:  # the same text the file would hold
        print(save_config(cfg, Path(tmp) / "config.json").read_text(), end="")
    return 0
