"""Shared terminal rendering for the CLI (rich tables, JSON)."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def print_table(rows: List[Dict[str, Any]], title: Optional[str] = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    if not rows:
        Console().print("(no rows)")
        return
    for col in rows[0]:
        table.add_column(str(col), justify="right" if isinstance(rows[0][col], (int, float)) else "left")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in rows[0]))
    Console(width=200).print(table)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
