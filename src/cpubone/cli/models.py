"""``cpubone list`` and ``cpubone info``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the CPUBone variants with params and MACs")
    p.add_argument("--size", type=int, default=224, help="input side for the MAC count (default 224)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_list)

    p = sub.add_parser("info", help="params, MACs and a per-stage table of one model")
    p.add_argument("model", help="CPUBone variant or timm model name")
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_info)


def _list(args: argparse.Namespace) -> int:
    from ..analysis.summary import variant_table
    from ._render import print_json, print_table

    rows = variant_table(size=args.size)
    if args.json:
        print_json(rows)
    else:
        print_table(rows, title=f"CPUBone variants (MACs at {args.size}x{args.size})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..analysis.summary import model_summary
    from ._render import print_json, print_table

    summary = model_summary(args.model, tuple(args.size))
    if args.json:
        print_json(summary)
    else:
        print(f"{summary['model']}: {summary['params']:,} params, {summary['macs']:,} MACs at "
              f"{args.size[0]}x{args.size[1]}")
        print_table(summary["stages"], title="per stage")
    return 0
