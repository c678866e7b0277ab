"""Result files every measuring tool writes: CSV, JSON, Markdown tables, and the matplotlib helpers
(Agg backend; optional: a missing matplotlib leaves the figures measured and written, without the plot).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .outputs import atomic_write, atomic_write_text

__all__ = ["write_csv", "write_json", "markdown_table", "pareto_front", "optional_plot", "pyplot", "save_figure",
           "PlotUnavailable", "NO_PLOT"]


def write_csv(rows: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Rows (dicts with the same keys) as CSV with a header line."""
    buf = io.StringIO()
    cols: List[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(Path(path), buf.getvalue())
    return Path(path)


def write_json(obj: Any, path: Path) -> Path:
    atomic_write_text(Path(path), json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[Tuple[str, str]]] = None) -> str:
    """A GitHub Markdown table; ``columns`` = (key, header) pairs, default all keys of the first row."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or [(k, k) for k in rows[0]])
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" if isinstance(rows[0].get(k), str) else "---:" for k, _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def pareto_front(points: Iterable[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Points (latency, top-1) not beaten by another that is both faster and at least as accurate."""
    front: List[Tuple[float, float]] = []
    best = float("-inf")
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc))
            best = acc
    return front


class PlotUnavailable(ImportError):
    """matplotlib is not installed: the figures are measured and written, the plot is left out."""


NO_PLOT = "no plot: matplotlib is not installed (pip install 'cpubone[bench]')"


def optional_plot(plot: Any, *args: Any, **kwargs: Any) -> Optional[Path]:
    """``plot(*args, **kwargs)``, or None without matplotlib (a missing plot must not lose the figures)."""
    try:
        return plot(*args, **kwargs)
    except PlotUnavailable:
        return None


def pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable(NO_PLOT) from e

    matplotlib.use("Agg")  # files only, works without a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: Path, rect: Optional[Tuple[float, float, float, float]] = None) -> Path:
    fig.tight_layout(rect=rect)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
