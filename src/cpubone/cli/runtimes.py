"""``cpubone deploy`` and ``cpubone engines``: the CPU runtimes installed here, and the fastest verified one."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="try every installed runtime x precision, write the fastest verified one")
    p.add_argument("model", help="CPUBone variant (e.g. cpubone_b0) or timm model name")
    p.add_argument("--checkpoint", metavar="PATH", help="weights to load (ours, timm's or the authors' layout)")
    p.add_argument("--calib", metavar="DIR", help="images to calibrate int8 on (without it int8 is skipped)")
    p.add_argument("--val", metavar="DIR", help="images to judge agreement on; class folders give accuracy too")
    p.add_argument("--engine", default=None,
                   help="comma-separated engines to try (default: every installed one that writes a file)")
    p.add_argument("--precision", default="fp32,bf16,int8", help="precisions to try (default fp32,bf16,int8)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads to time and deploy at (default 1)")
    p.add_argument("--min-agreement", type=float, default=99.0,
                   help="keep candidates whose top-1 agreement with the training form is at least this %% (default 99)")
    p.add_argument("--max-drop", type=float, default=0.5,
                   help="... and whose accuracy on a labelled --val drops at most this many points (default 0.5)")
    p.add_argument("--calib-count", type=int, default=64, help="calibration images to use (default 64)")
    p.add_argument("--val-count", type=int, default=500, help="validation images to use (default 500)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per candidate (default 30)")
    p.add_argument("--torch-free", action="store_true",
                   help="choose only among files that run without torch on the device (ONNX Runtime, OpenVINO, "
                        "LiteRT, ncnn)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write the model and report to")
    p.set_defaults(func=_deploy)

    p = sub.add_parser("engines", help="the CPU runtimes, whether they are installed, and their precisions")
    p.set_defaults(func=_engines)


def _deploy(args: argparse.Namespace) -> int:
    from ..deploy.auto import deploy_model
    from ..engines import parse_engines, parse_precisions
    from ..engines.machine import machine_info
    from . import UserError
    from ._render import print_table

    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: need at least 1")
    if not 0 < args.min_agreement <= 100:
        raise UserError(f"--min-agreement {args.min_agreement}: a percentage in (0, 100]")
    engines = parse_engines(args.engine) if args.engine else None
    res = deploy_model(args.model, args.output, checkpoint=args.checkpoint, calib_dir=args.calib, val_dir=args.val,
                       engines=engines, precisions=parse_precisions(args.precision), threads=args.threads,
                       input_size=tuple(args.size) if args.size else None, min_agreement=args.min_agreement / 100,
                       max_drop=args.max_drop, calib_count=args.calib_count, val_count=args.val_count,
                       runs=args.runs, machine=machine_info().header(args.threads), torch_free=args.torch_free)
    print(machine_info().header(args.threads))
    print_table([dict(engine=c.engine, precision=c.precision, status=c.status,
                      median_ms=c.latency.median_ms if c.latency else None, ratio=c.ratio,
                      agreement=f"{c.agreement.top1_agreement:.1%}" if c.agreement else "",
                      torch_free="yes" if c.device.get("torch_free") else "no",
                      device_mb=c.device.get("installed_mb"), reason=c.reason[:70]) for c in res.candidates],
                title=f"{res.model}: agreement on {res.evaluated_on}")
    needs = res.chosen.device
    print(f"chosen: {res.chosen.label} -> {res.artifact}; the device needs: "
          f"pip install {' '.join(map(str, needs.get('packages', [])))}"
          + ("" if needs.get("torch_free") else " (torch: give --torch-free for a file that runs without it)"))
    print(f"run it: {res.command}")
    print("written: " + ", ".join(res.files.values()))
    return 0


def _engines(args: argparse.Namespace) -> int:
    from ..engines import engine_class, engine_names
    from ._render import print_table

    rows = []
    for name in engine_names():
        cls = engine_class(name)
        missing = cls.missing()
        rows.append(dict(engine=name, runtime=cls.title, precisions=",".join(cls.precisions),
                         file=cls.suffix or "-", torch_free="yes" if cls.torch_free else "no",
                         installed="yes" if not missing else f"no: pip install 'cpubone[{cls.extra}]'"))
    print_table(rows, title="CPU runtimes")
    return 0
