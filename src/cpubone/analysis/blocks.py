"""``cpubone blocks``: the paper's design-rule study, measured on this CPU.

Each block variant (FuMBConv, GrFuMBConv, MBConv, GrMBConv and a plain depthwise conv) is built from
the real layers of :mod:`cpubone.models.layers` at every channel width of the sweep, with kernels 2 and
3 and expansion-conv groups 1 / 2 / 4 / 8, at the spatial size that width has in the network, and
timed alone at batch 1. MACs come from ``count_macs``; MACpS = MACs / median latency.

Spatial rule: width ``w`` runs at ``224 / 2**(2 + i)`` with ``i = clamp(ceil(log2(w / 32)), 0, 3)``,
i.e. 32 -> 56x56, 48/64 -> 28x28, 96/128 -> 14x14, 192 and wider -> 7x7. This is where those widths
sit in CPUBone-B0/B1 (32/64/128/256 in stages 1-4) and Nano/T0 (24/48/96/192), so the MACpS of a
block is the MACpS it would have inside a network.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..engines import engine_class, get_engine
from ..engines.base import Runner
from ..engines.eager import torch_threads
from ..engines.machine import machine_info, usable_threads
from ..engines.timing import check_timing_args, time_interleaved
from ..models.layers import ConvNormAct, FusedMBConv, MBConv
from ..models.macs import count_macs, count_params
from ..outputs import (
    OutputPathError,
    ResultsNotWritten,
    atomic_write_text,
    check_output_dir,
)
from ..progress import StepProgress

__all__ = [
    "DEFAULT_WIDTHS", "QUICK_WIDTHS", "BlockSpec", "BlockSweepResult", "spatial_size", "block_specs", "make_block",
    "prepare_block", "design_rules", "run_block_sweep",
]

DEFAULT_WIDTHS = (32, 48, 64, 96, 128, 192, 256, 384, 512)
QUICK_WIDTHS = (32, 128, 256)
KERNELS = (2, 3)
GROUPS = (1, 2, 4, 8)
EXPAND_RATIO = 4.0
# the paper's rule (ARM CPUs), printed beside what this machine measures
PAPER = {
    "crossover": "256 channels (fused below, unfused from there)",
    "k2_DWConv": "+42%", "k2_FuMBConv": "+5%", "k2_GrFuMBConv": "+12%",
    "groups_fused": "groups 2: 0.55x MACs, ~same MACpS",
    "groups_unfused": "groups 2: ~0.76x MACs, ~5% lower MACpS",
    "groups_more": "groups 4 / 8: little latency gained (and -0.3 / -0.7% top-1)",
}


def spatial_size(width: int, input_size: int = 224) -> int:
    """Side of the feature map a block of ``width`` channels works on in the network (see module doc)."""
    if width < 1:
        raise ValueError(f"width={width}: must be positive")
    stage = min(3, max(0, math.ceil(math.log2(width / 32))))
    return input_size // 2 ** (2 + stage)


@dataclass(frozen=True)
class BlockSpec:
    """One block of the sweep.

    family: 'fused' (FusedMBConv), 'unfused' (MBConv) or 'dw' (depthwise ConvNormAct).
    groups: groups of the expansion conv (1: FuMBConv / MBConv, 2: the paper's Gr blocks).
    """

    family: str
    width: int
    kernel: int
    groups: int = 1

    @property
    def variant(self) -> str:
        if self.family == "dw":
            return "DWConv"
        base = "FuMBConv" if self.family == "fused" else "MBConv"
        if self.groups == 1:
            return base
        return "Gr" + base + ("" if self.groups == 2 else f"-g{self.groups}")

    @property
    def resolution(self) -> int:
        return spatial_size(self.width)


def block_specs(widths: Sequence[int] = DEFAULT_WIDTHS, kernels: Sequence[int] = KERNELS,
                groups: Sequence[int] = GROUPS) -> List[BlockSpec]:
    """The sweep: every width x kernel x groups for fused and unfused blocks, and the depthwise conv."""
    specs = []
    for w in widths:
        for k in kernels:
            for fam in ("fused", "unfused"):
                specs += [BlockSpec(fam, w, k, g) for g in groups if (w * EXPAND_RATIO) % g == 0 and w % g == 0]
            specs.append(BlockSpec("dw", w, k))
    return specs


def make_block(spec: BlockSpec) -> nn.Module:
    """The real layer for ``spec``: stride 1, width in = out, expand ratio 4, residual where the block has one."""
    if spec.family == "fused":
        return FusedMBConv(spec.width, spec.width, spec.kernel, expand_ratio=EXPAND_RATIO, expand_groups=spec.groups)
    if spec.family == "unfused":
        return MBConv(spec.width, spec.width, spec.kernel, expand_ratio=EXPAND_RATIO, expand_groups=spec.groups)
    if spec.family == "dw":
        return ConvNormAct(spec.width, spec.width, spec.kernel, groups=spec.width)
    raise ValueError(f"family={spec.family!r}: expected 'fused', 'unfused' or 'dw'")


def prepare_block(spec: BlockSpec, engine: str = "onnxruntime", threads: int = 1) -> Tuple[int, int, Runner]:
    """MACs, params and a batch-1 runner of one block in ``engine`` (fp32)."""
    torch.manual_seed(0)
    block = make_block(spec).eval()
    block.in_chans = spec.width  # the exporters trace a (1, in_chans, H, W) input
    shape = (1, spec.width, spec.resolution, spec.resolution)
    macs = count_macs(block, shape).total
    return macs, count_params(block), get_engine(engine).prepare(block, shape, "fp32", threads)


def _paper_range(lo: int, hi: int) -> str:
    if hi < 256:
        return "GrFuMBConv (~70% higher MACpS than unfused)"
    if lo >= 256:
        return "GrMBConv (~27% higher MACpS than fused)"
    return "GrFuMBConv below 256, GrMBConv from 256"


def _find(records: Sequence[dict], **kw) -> Optional[dict]:
    for r in records:
        if all(r[k] == v for k, v in kw.items()):
            return r
    return None


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def design_rules(records: Sequence[dict], kernels: Sequence[int] = KERNELS) -> Dict[str, List[dict]]:
    """The paper's rule table from sweep records.

    Returns ``preferred`` (per kernel and width: GrFuMBConv vs GrMBConv MACpS, the higher one preferred,
    the paper's criterion) and ``rules`` (channel ranges per kernel, the fused/unfused crossover, the
    2x2 vs 3x3 MACpS gain, the effect of groups; each with the paper's value beside it).
    """
    widths = sorted({r["width"] for r in records})
    preferred: List[dict] = []
    rules: List[dict] = []
    for kernel in kernels:
        pref = []
        for w in widths:
            f = _find(records, family="fused", groups=2, kernel=kernel, width=w)
            u = _find(records, family="unfused", groups=2, kernel=kernel, width=w)
            if not (f and u):
                continue
            pref.append(dict(
                kernel=kernel, width=w, resolution=f"{f['resolution']}x{f['resolution']}", fused_gmacps=f["gmacps"],
                unfused_gmacps=u["gmacps"], macps_ratio=f["gmacps"] / u["gmacps"],
                latency_ratio=f["median_ms"] / u["median_ms"],
                preferred="GrFuMBConv" if f["gmacps"] >= u["gmacps"] else "GrMBConv"))
        if not pref:
            continue
        preferred += pref
        # channel ranges with one preferred block
        i = 0
        while i < len(pref):
            j = i
            while j + 1 < len(pref) and pref[j + 1]["preferred"] == pref[i]["preferred"]:
                j += 1
            lo, hi = pref[i]["width"], pref[j]["width"]
            gain = statistics.median(p["macps_ratio"] for p in pref[i:j + 1])
            rules.append(dict(rule=f"channels {lo}-{hi} ({kernel}x{kernel})",
                              measured=f"{pref[i]['preferred']} (fused/unfused MACpS x{gain:.2f})",
                              paper=_paper_range(lo, hi)))
            i = j + 1
        cross = next((p["width"] for k, p in enumerate(pref) if all(q["preferred"] == "GrMBConv" for q in pref[k:])),
                     None)
        rules.append(dict(rule=f"fused/unfused crossover ({kernel}x{kernel})", paper=PAPER["crossover"],
                          measured=f"{cross} channels" if cross else
                          f"none up to {pref[-1]['width']} (fused keeps the higher MACpS)"))
    for variant in ("DWConv", "FuMBConv", "GrFuMBConv", "MBConv", "GrMBConv"):
        ratios = []
        for w in widths:
            a = _find(records, variant=variant, kernel=2, width=w)
            b = _find(records, variant=variant, kernel=3, width=w)
            if a and b:
                ratios.append(a["gmacps"] / b["gmacps"] - 1)
        if ratios:
            rules.append(dict(rule=f"MACpS gain of 2x2 over 3x3, {variant}", measured=_pct(statistics.median(ratios)),
                              paper=PAPER.get(f"k2_{variant}", "-")))
    for fam, name in (("fused", "FuMBConv"), ("unfused", "MBConv")):
        for g in sorted({r["groups"] for r in records if r["family"] == fam and r["groups"] > 1}):
            mac_r, macps_r, lat_r = [], [], []
            for w in widths:
                base = _find(records, family=fam, groups=1, kernel=3, width=w)
                r = _find(records, family=fam, groups=g, kernel=3, width=w)
                if base and r:
                    mac_r.append(r["macs"] / base["macs"])
                    macps_r.append(r["gmacps"] / base["gmacps"])
                    lat_r.append(r["median_ms"] / base["median_ms"])
            if mac_r:
                paper = PAPER[f"groups_{fam}"] if g == 2 else PAPER["groups_more"]
                rules.append(dict(rule=f"groups={g} vs 1, {name} k3",
                                  measured=f"{statistics.median(mac_r):.2f}x MACs, MACpS {_pct(statistics.median(macps_r) - 1)}, "
                                           f"{statistics.median(lat_r):.2f}x latency", paper=paper))
    return dict(preferred=preferred, rules=rules)


@dataclass
class BlockSweepResult:
    machine_header: str
    engine: str
    threads: int
    records: List[dict]
    preferred: List[dict]
    rules: List[dict]
    files: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "files"}


def run_block_sweep(
    widths: Optional[Sequence[int]] = None,
    quick: bool = False,
    engine: str = "onnxruntime",
    threads: int = 1,
    runs: int = 20,
    warmup: int = 3,
    kernels: Sequence[int] = KERNELS,
    groups: Optional[Sequence[int]] = None,
    rounds: int = 3,
    out_dir: Optional[os.PathLike] = "cpubone-bench",
    progress: bool = True,
) -> BlockSweepResult:
    """Measure the sweep and derive the design rules; writes blocks.{csv,json,md,png} to ``out_dir``.

    Args:
        widths: channel widths (default 32 ... 512; ``quick``: 32, 128, 256).
        quick: a tiny sweep (3 widths, groups 1 and 2) for a first look or a test.
        engine / threads / runs / warmup: as in ``cpubone bench``.
        kernels / groups: kernel sizes and expansion-conv groups to sweep.
        rounds: all blocks are timed in this many interleaved rounds.
    """
    widths = list(widths or (QUICK_WIDTHS if quick else DEFAULT_WIDTHS))
    groups = list(groups or ((1, 2) if quick else GROUPS))
    engine_class(engine).require()
    check_timing_args(threads, runs, warmup)
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: need at least 1 round")
    bad = [w for w in widths if w < 8 or w % 8]
    if bad:
        raise ValueError(f"widths {bad}: each width must be a positive multiple of 8 (groups up to 8 must divide it)")
    bad = [k for k in kernels if k != 2 and k % 2 == 0 or k < 1]
    if bad:
        raise ValueError(f"kernels {bad}: only 2 and odd kernels are supported")
    threads = usable_threads(threads)
    if out_dir is not None:
        check_output_dir(out_dir, need_bytes=2 ** 20)  # before the measuring, not after it
    specs = block_specs(widths, kernels, groups)
    prepared = []
    with StepProgress(progress, len(specs) + rounds) as step:
        for s in specs:
            step(f"prepare {s.variant} w{s.width} k{s.kernel}")
            prepared.append(prepare_block(s, engine, threads))
        # interleaved rounds: load from elsewhere on the machine hits every block alike
        with torch_threads(threads), torch.inference_mode():
            lats = time_interleaved({str(i): r.timer() for i, (_, _, r) in enumerate(prepared)}, runs, warmup,
                                    min(rounds, runs), threads, step=step)
        step(None)
    records = []
    for i, (s, (macs, params, _)) in enumerate(zip(specs, prepared)):
        lat = lats[str(i)]
        records.append(dict(variant=s.variant, family=s.family, width=s.width, resolution=s.resolution,
                            kernel=s.kernel, groups=s.groups, macs=macs, params=params, median_ms=lat.median_ms,
                            p10_ms=lat.p10_ms, p90_ms=lat.p90_ms, gmacps=lat.macps(macs)))
    rules = design_rules(records)
    res = BlockSweepResult(machine_info().header(threads), engine, threads, records, rules["preferred"],
                           rules["rules"])
    if out_dir is not None:
        try:
            res.files = _write(res, Path(out_dir))
        except OutputPathError as e:
            raise ResultsNotWritten(f"block sweep measured but not written: {e}", res) from None
    return res


def _write(res: BlockSweepResult, out_dir: Path) -> Dict[str, str]:
    from .report import (
        NO_PLOT,
        markdown_table,
        optional_plot,
        plot_blocks,
        write_csv,
        write_json,
    )

    files = {
        "csv": write_csv(res.records, out_dir / "blocks.csv"),
        "json": write_json(res.to_dict(), out_dir / "blocks.json"),
        "png": optional_plot(plot_blocks, res.records, out_dir / "blocks.png",
                             f"{res.machine_header.split(' (')[0]}, {res.engine}, {res.threads} thread(s), batch 1, "
                             "fp32"),
    }
    md = ["# cpubone blocks", "", f"- machine: {res.machine_header}",
          f"- engine {res.engine}, {res.threads} thread(s), batch 1, fp32; width w at the spatial size it has in "
          "the network (32: 56x56, 48-64: 28x28, 96-128: 14x14, 192+: 7x7); expand ratio 4", "",
          "## Design rules on this machine", "", markdown_table(res.rules),
          "## Fused vs unfused (groups 2) per kernel and width", "", markdown_table(res.preferred),
          "## All measurements", "", markdown_table(res.records),
          "![MACpS by block](blocks.png)" if files["png"] else NO_PLOT + ".", ""]
    files["md"] = atomic_write_text(out_dir / "blocks.md", "\n".join(md))
    return {k: str(v) for k, v in files.items() if v is not None}
