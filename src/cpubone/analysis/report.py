"""Report files of the measurement tools: CSV, JSON, Markdown and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..outputs import atomic_write_text
from ..results import (
    NO_PLOT,
    PlotUnavailable,
    markdown_table,
    optional_plot,
    pareto_front,
    pyplot,
    save_figure,
    write_csv,
    write_json,
)

__all__ = [
    "write_csv", "write_json", "markdown_table", "pareto_front", "plot_pareto", "unplotted_models", "write_bench_report",
    "plot_profile", "plot_blocks", "optional_plot", "PlotUnavailable", "NO_PLOT",
]


def plot_pareto(rows: Sequence[Dict[str, Any]], path: Path, title: str) -> Path:
    """Top-1 vs measured latency (p10-p90 whiskers), CPUBone and peers, with the Pareto front.

    With several engines x precisions, each gets its own colour (CPUBone joined by a line, peers as
    squares); the front is over all points."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    pts = [r for r in rows if r.get("top1") is not None]
    combos = list(dict.fromkeys((r.get("engine", ""), r.get("precision", "fp32")) for r in pts))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, combo in enumerate(combos):
        for fam, color, marker in (("CPUBone", "tab:red", "o"), ("peer", "tab:blue", "s")):
            sel = sorted((r for r in pts if r["family"] == fam and (r.get("engine", ""), r.get("precision", "fp32"))
                          == combo), key=lambda r: r["median_ms"])
            if not sel:
                continue
            if len(combos) > 1:
                color = colors[i % len(colors)]
                label = f"{fam} {combo[0]} {combo[1]}" if fam == "CPUBone" else None
            else:
                label = "CPUBone" if fam == "CPUBone" else "peers (timm)"
            x = [r["median_ms"] for r in sel]
            y = [r["top1"] for r in sel]
            err = [[r["median_ms"] - r["p10_ms"] for r in sel], [r["p90_ms"] - r["median_ms"] for r in sel]]
            ax.errorbar(x, y, xerr=err, fmt=marker + ("-" if fam == "CPUBone" else ""), color=color, capsize=3,
                        label=label)
            if i == 0:  # names once: the other series are the same models, shifted in latency
                for r in sel:
                    ax.annotate(r["model"], (r["median_ms"], r["top1"]), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
    front = pareto_front((r["median_ms"], r["top1"]) for r in pts)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", ls="--", lw=1,
                label="Pareto front")
    ax.set_xlabel("batch-1 latency, median (ms)")
    ax.set_ylabel("published ImageNet-1k top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8, loc="lower right")
    missing = unplotted_models(rows)
    if missing:  # say who is absent rather than drop them silently
        fig.text(0.01, 0.005, "not plotted, no published top-1: " + ", ".join(missing), fontsize=7, color="gray",
                 va="bottom", wrap=True)
    return save_figure(plt, fig, path, rect=(0, 0.04, 1, 1) if missing else None)


def unplotted_models(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Models of a bench report that ``plot_pareto`` leaves out: those without a published top-1."""
    return [r["model"] for r in rows if r.get("top1") is None]


BENCH_COLUMNS = [
    ("model", "model"), ("engine", "engine"), ("precision", "precision"), ("ratio", "ratio"), ("params", "params"), ("macs", "MACs"), ("median_ms", "median ms"), ("p10_ms", "p10 ms"),
    ("p90_ms", "p90 ms"), ("gmacps", "GMAC/s"), ("peak_pct", "% of GEMM peak"), ("top1", "top-1 %"),
    ("deploy_form", "reparam."),
]


def write_bench_report(result, out_dir: Path) -> Dict[str, str]:
    """bench.csv, bench.json, bench.md and bench.png of a :class:`~cpubone.analysis.bench.BenchResult`."""
    out_dir = Path(out_dir)
    rows = [r.to_dict() for r in result.rows]
    m = result.machine
    precisions = ",".join(getattr(result, "precisions", ["fp32"]))
    title = (f"{m.cpu}, {result.engine}, {result.threads} thread(s), batch 1, "
             f"{result.size}x{result.size}, {precisions}")
    files = {
        "csv": write_csv(rows + [dict(model=name, error=reason) for name, reason in getattr(result, "failed", {}).items()],
                         out_dir / "bench.csv"),
        "json": write_json(result.to_dict(), out_dir / "bench.json"),
    }
    png = optional_plot(plot_pareto, rows, out_dir / "bench.png", title)
    if png is not None:
        files["png"] = png
    sources = sorted({(r["model"], r["top1_source"]) for r in rows if r["top1_source"]})
    missing = unplotted_models(rows)
    failed = [f"- {name}: {reason}" for name, reason in getattr(result, "failed", {}).items()]
    md = [
        "# cpubone bench", "",
        f"- machine: {m.header(result.threads)}",
        f"- engine: {result.engine}; threads: {result.threads}; batch 1; input {result.size}x{result.size}; "
        f"{precisions} (int8 calibrated on scikit-image photos); ratio = median / the model's first engine x "
        "precision in this run; "
        f"median of {result.runs} runs after {result.warmup} warm-up runs, in {result.rounds} interleaved rounds; "
        "random weights",
        *[f"- {p} GEMM peak: {pk.gmacps:.1f} GMAC/s ({pk.method}, {pk.threads} thread(s)); the % of peak of {p} "
          f"rows is against it" for p, pk in (result.peaks or {"fp32": result.peak}).items()],
        "", markdown_table(rows, BENCH_COLUMNS),
        "MACs: `cpubone.models.macs.count_macs` (multiply-adds of convs, linears and attention matmuls). "
        "GMAC/s = MACs / median latency. Reparameterizable models are timed in deploy form "
        "(`timm.utils.reparameterize_model`). Read the latencies as ratios between models of this run.", "",
        "Published top-1 sources:", "",
        *[f"- {name}: {src}" for name, src in sources], "",
        *([f"Not in the plot (no published top-1): {', '.join(missing)}.", ""] if missing else []),
        *(["Not measured (failed):", "", *failed, ""] if failed else []),
        "![top-1 vs latency](bench.png)" if png is not None else NO_PLOT + ".", "",
        *([f"Not run: {s}" for s in getattr(result, "skipped", [])] + [""] if getattr(result, "skipped", []) else []),
    ]
    files["md"] = out_dir / "bench.md"
    atomic_write_text(files["md"], "\n".join(md))
    return {k: str(v) for k, v in files.items()}


def plot_profile(kinds: Sequence[Dict[str, Any]], path: Path, title: str, peak_gmacps: Optional[float] = None) -> Path:
    """Two bar charts per block kind: share of the time, and achieved GMAC/s (with the GEMM peak line)."""
    plt = pyplot()
    labels = [k["kind"] for k in kinds]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(labels) + 1.8))
    a1.barh(labels, [k["share_pct"] for k in kinds], color="tab:orange")
    a1.set_xlabel("share of profiled time (%)")
    a1.invert_yaxis()
    a2.barh(labels, [k["gmacps"] or 0 for k in kinds], color="tab:green")
    for i, k in enumerate(kinds):
        if not k["gmacps"]:
            a2.text(0.5, i, "no MACs", va="center", fontsize=8, color="gray")
    if peak_gmacps:
        a2.axvline(peak_gmacps, color="k", ls="--", lw=1, label=f"GEMM peak {peak_gmacps:.0f}")
        a2.legend(fontsize=8)
    a2.set_xlabel("GMAC/s")
    a2.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    return save_figure(plt, fig, path)


def plot_blocks(records: Sequence[Dict[str, Any]], path: Path, title: str) -> Path:
    """MACpS vs channel width: left, each block variant (2x2 solid, 3x3 dashed); right, groups 1/2/4/8 (3x3)."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"FuMBConv": "tab:blue", "GrFuMBConv": "tab:orange", "MBConv": "tab:green", "GrMBConv": "tab:red",
              "DWConv": "tab:gray"}
    for (variant, k), style in (((v, k), "-" if k == 2 else "--") for v in colors for k in (2, 3)):
        sel = sorted((r for r in records if r["variant"] == variant and r["kernel"] == k), key=lambda r: r["width"])
        if sel:
            a1.plot([r["width"] for r in sel], [r["gmacps"] for r in sel], style, marker="o", ms=3,
                    color=colors[variant], label=f"{variant} k{k}")
    group_colors = dict(zip((1, 2, 4, 8), ("tab:blue", "tab:orange", "tab:purple", "tab:brown")))
    for fam, marker, style in (("fused", "o", "-"), ("unfused", "s", ":")):
        for g in sorted({r["groups"] for r in records if r["family"] == fam}):
            sel = sorted((r for r in records if r["family"] == fam and r["groups"] == g and r["kernel"] == 3),
                         key=lambda r: r["width"])
            if sel:
                a2.plot([r["width"] for r in sel], [r["gmacps"] for r in sel], style, marker=marker, ms=3,
                        color=group_colors.get(g), label=f"{fam} k3 groups={g}")
    for ax, t in ((a1, "MACpS by block (solid: 2x2, dashed: 3x3)"), (a2, "effect of expansion-conv groups (3x3)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("channels (spatial size as in the network)")
        ax.set_ylabel("GMAC/s")
        ax.set_title(t, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    return save_figure(plt, fig, path)
