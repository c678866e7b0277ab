"""``cpubone profile``: where a model's batch-1 time goes, per block, per block kind and per op type.

ONNX Runtime and OpenVINO: the runtime's own per-node profiler, read through the engine
(``cpubone.engines``: ``Engine.profile_nodes``). The TorchScript ONNX exporter names nodes after the module
scope ("/stages/stages.2/blocks/blocks.0/attn/qkv/Conv"), OpenVINO's PyTorch frontend likewise
("__module.stages.2.blocks.0.attn.qkv/aten::_convolution/Convolution"); the name is mapped back to the
module (``stages.2.blocks.0.attn.qkv``) and from there to its block. OpenVINO also says which original
nodes it fused into each executed one, and which kernel it picked (``exec_type``: a JIT kernel for the ISA,
or ``ref`` reference code), summed per op type x kernel. Nodes that the runtime creates itself (layout
reorders, split activations) carry no scope and are charged to the block of the node before them in
execution order. Other runtimes (ExecuTorch, LiteRT, ncnn, torch.compile) have no per-op profiler
reachable from Python here and are refused with one line. Eager: forward pre/post hooks time each block and each
leaf module; time inside a block not spent in a leaf module is functional code (pads, attention matmuls,
residual adds, upsampling) and is reported as such.

MACs come from ``count_macs`` per module. MACpS = MACs / time per row, and
"predicted latency = sum of MACs / MACpS" is shown beside the measured one, both per block and at the
machine's GEMM peak (the floor the model could reach if every MAC ran at GEMM speed).
"""
from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..engines import (
    ENGINES,
    NodeTime,
    check_run_args,
    engine_class,
    get_engine,
    parse_engines,
)
from ..engines.eager import measure_eager, torch_threads
from ..engines.machine import GEMM_ENGINES, gemm_peak, machine_info, usable_threads
from ..engines.timing import time_callable
from ..models.macs import MacReport, count_macs
from ..outputs import (
    OutputPathError,
    ResultsNotWritten,
    atomic_write_text,
    check_output_dir,
)
from .bench import build_model, counted_model, prepare_runner

__all__ = ["ProfileResult", "block_units", "module_of_node", "profile_model", "profiling_engines"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _block_kind(m: nn.Module) -> str:
    from ..models.layers import FusedMBConv, MBConv

    if isinstance(m, FusedMBConv):
        return "GrFuMBConv" if m.conv_exp.conv.groups > 1 else "FuMBConv"
    if isinstance(m, MBConv):
        return "GrMBConv" if m.conv_pw.conv.groups > 1 else "MBConv"
    return type(m).__name__


def block_units(model: nn.Module) -> Dict[str, str]:
    """Module name -> block kind of the units time is charged to.

    CPUBone: ``stem``, each stage's ``downsample`` and stages 1-2 blocks (GrFuMBConv), and inside each
    attention-stage block its ``attn`` (Lowtention), ``mlp`` (MLP), ``norm1/2`` (norm), ``local``
    (GrFuMBConv / GrMBConv) and the block itself for the residual adds; ``head``. Other models: every
    module whose parent is the model or a container (Sequential / ModuleList), kind = its class.
    """
    from ..models.cpubone import CPUBone, CPUBoneBlock

    units: Dict[str, str] = {}
    if isinstance(model, CPUBone):
        units["stem"] = "stem"
        for i, stage in enumerate(model.stages):
            units[f"stages.{i}.downsample"] = _block_kind(stage.downsample)
            for j, blk in enumerate(stage.blocks):
                name = f"stages.{i}.blocks.{j}"
                if isinstance(blk, CPUBoneBlock):
                    units[name] = "residual"
                    units.update({f"{name}.norm1": "norm", f"{name}.norm2": "norm", f"{name}.attn": "Lowtention",
                                  f"{name}.mlp": "MLP", f"{name}.local": _block_kind(blk.local)})
                else:
                    units[name] = _block_kind(blk)
        units["head"] = "head"
        return units

    def visit(prefix: str, mod: nn.Module) -> None:
        for n, child in mod.named_children():
            full = f"{prefix}.{n}" if prefix else n
            if isinstance(child, _CONTAINERS) and len(child) > 0:
                visit(full, child)
            else:
                units[full] = _block_kind(child)

    visit("", model)
    return units


def _has_scope(node_name: str) -> bool:
    """Whether a runtime's node name carries the module scope the exporter wrote (ONNX: "/a/a.1/Conv",
    OpenVINO's PyTorch frontend: "__module.a.1/aten::_convolution/Convolution")."""
    return node_name.startswith("/") or node_name.startswith("__module")


def module_of_node(node_name: str, module_names: Sequence[str]) -> str:
    """The deepest module a runtime's node belongs to, from the scope path in its name ('' if none).

    ONNX: the exporter writes a child of a Sequential as "<attr>.<index>" ("/stages/stages.2/..."), so each
    scope component is tried as-is and by its last dotted part. OpenVINO (PyTorch frontend): the module
    path follows "__module." up to the first "/" ("__module.stages.2.blocks.0.attn.qkv/aten::...").
    """
    names = set(module_names)
    if node_name.startswith("__module"):
        path = node_name.split("/", 1)[0][len("__module."):]
        while path and path not in names:
            path = path.rsplit(".", 1)[0] if "." in path else ""
        return path
    if not node_name.startswith("/"):
        return ""
    current = ""
    for comp in node_name.split("/")[1:-1]:
        for cand in (comp, comp.rsplit(".", 1)[-1]):
            full = f"{current}.{cand}" if current else cand
            if full in names:
                current = full
                break
        else:
            break
    return current


def _unit_of(module: str, units: Dict[str, str]) -> str:
    """The deepest unit that is ``module`` or contains it ('' = the model itself)."""
    while module:
        if module in units:
            return module
        module = module.rsplit(".", 1)[0] if "." in module else ""
    return ""


# runtime op types (ONNX Runtime's, OpenVINO's) that do the counted multiply-adds, and the count_macs
# (aten) ops they correspond to.
_MAC_CLASS_OPS = {"conv": ("convolution",), "matmul": ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear")}


def _mac_class(op_type: str) -> str:
    if "Conv" in op_type and "Transpose" not in op_type:
        return "conv"
    if any(k in op_type for k in ("MatMul", "Gemm", "Attention", "FullyConnected")):
        return "matmul"
    return "other"


@dataclass
class ProfileResult:
    """Per-block / per-kind / per-op tables of one model (times in ms, medians over the profiled runs)."""

    model: str
    engine: str
    precision: str
    threads: int
    size: int
    machine_header: str
    measured_ms: float  # the latency harness's median, profiler off
    profiled_ms: float  # sum of the profiled per-block times
    predicted_ms: float  # sum over MAC-doing blocks of MACs / MACpS
    floor_ms: float  # total MACs / GEMM peak
    peak_gmacps: float
    macs: int
    blocks: List[dict] = field(default_factory=list)
    kinds: List[dict] = field(default_factory=list)
    ops: List[dict] = field(default_factory=list)
    kernels: List[dict] = field(default_factory=list)  # op type x kernel the runtime picked (OpenVINO)
    files: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "files"}


def _charge(nodes: Sequence[NodeTime], modules: Sequence[str], units: Dict[str, str]):
    """Per-unit and per-op-type time (ms), op call counts and per-kernel rows from a runtime's node times.

    A node is charged to the unit of the first of its names that carries a module scope: the names of
    the graph nodes the runtime fused into it first (OpenVINO's decomposed GroupNorm runs as ``MVN_123``,
    whose fused names end with the norm's own), then its own. Nodes the runtime created without any
    scope (layout reorders, split activations) go to the unit of the node before them in execution order.
    """
    unit_ms: Dict[str, float] = defaultdict(float)
    op_ms: Dict[str, float] = defaultdict(float)
    op_calls: Dict[str, int] = defaultdict(int)
    kernel_acc: Dict[Tuple[str, str], List[float]] = defaultdict(lambda: [0, 0.0])
    kernel_units: Dict[Tuple[str, str], Dict[str, None]] = defaultdict(dict)  # ordered sets
    prev_unit = ""
    for n in nodes:
        scoped = [name for name in n.fused + (n.node,) if _has_scope(name)]
        unit = _unit_of(module_of_node(scoped[0], modules), units) if scoped else prev_unit
        unit_ms[unit] += n.ms
        op_ms[n.op] += n.ms
        op_calls[n.op] += 1
        if n.exec_type:
            kernel_acc[(n.op, n.exec_type)][0] += 1
            kernel_acc[(n.op, n.exec_type)][1] += n.ms
            kernel_units[(n.op, n.exec_type)][unit or "(model)"] = None
        prev_unit = unit
    total = sum(op_ms.values()) or float("nan")
    # where a kernel runs, so a rare one (a reference-code fallback) can be found: its first blocks
    def where(key: Tuple[str, str]) -> str:
        names = list(kernel_units[key])
        return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")

    kernels = [dict(op=op, exec_type=ex, calls=c, ms=ms, share_pct=100.0 * ms / total, blocks=where((op, ex)))
               for (op, ex), (c, ms) in sorted(kernel_acc.items(), key=lambda kv: -kv[1][1])]
    return unit_ms, op_ms, op_calls, kernels


def _eager_times(model: nn.Module, shape: Tuple[int, ...], threads: int, runs: int, warmup: int,
                 units: Dict[str, str]) -> Tuple[Dict[str, float], Dict[str, float], Dict[str, int], Dict[str, str]]:
    """Per-unit and per-leaf-type median times (ms) from forward hooks; also leaf name -> type."""
    starts: Dict[str, float] = {}
    rec: Dict[str, List[float]] = defaultdict(list)
    mods = dict(model.named_modules())
    leaves = {n: type(m).__name__ for n, m in mods.items()
              if n and not list(m.children()) and not isinstance(m, _CONTAINERS)}
    hooks = []
    for name in set(units) | set(leaves):
        mod = mods[name]

        def pre(m, inp, name=name):
            starts[name] = time.perf_counter()

        def post(m, inp, out, name=name):
            rec[name].append((time.perf_counter() - starts[name]) * 1e3)

        hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch_threads(threads), torch.inference_mode():
            for i in range(warmup + runs):
                if i == warmup:
                    rec.clear()
                model(x)
    finally:
        for h in hooks:
            h.remove()
    med = {n: statistics.median(v) for n, v in rec.items()}
    unit_ms = {u: med.get(u, 0.0) for u in units}
    # a unit's own time excludes the units nested in it (CPUBone's block-level "residual" unit)
    for u in units:
        for v in units:
            if v != u and v.startswith(u + ".") and _unit_of(v.rsplit(".", 1)[0], units) == u:
                unit_ms[u] -= med.get(v, 0.0)
    op_ms: Dict[str, float] = defaultdict(float)
    op_calls: Dict[str, int] = defaultdict(int)
    for n, typ in leaves.items():
        if n in med:
            op_ms[typ] += med[n]
            op_calls[typ] += len(rec[n]) // runs
    return unit_ms, op_ms, op_calls, leaves


def profiling_engines() -> List[str]:
    """The engines ``profile_model`` can profile: those with a per-node profiler, and eager (forward hooks)."""
    return [e for e in ENGINES if e == "eager" or engine_class(e).node_profiler]


def _check_engine(engine: str, precision: str) -> Tuple[str, str]:
    """One engine that can profile, and a precision it runs; refused in one line before any work."""
    engines = parse_engines(engine)
    if len(engines) != 1:
        raise ValueError(f"engine {engine!r}: profile runs one engine at a time")
    name = engines[0]
    if name not in profiling_engines():
        raise ValueError(f"engine {name!r}: {engine_class(name).title} has no per-op profiler reachable from Python "
                         f"here; profile with {', '.join(profiling_engines())}")
    if name == "eager" and precision != "fp32":
        raise ValueError(f"precision {precision!r}: the eager profile (forward hooks) runs fp32 only")
    engine_class(name).check_precision(precision)
    return name, precision


def profile_model(name: str, engine: str = "onnxruntime", threads: int = 1, size: int = 224, runs: int = 20,
                  warmup: int = 5, out_dir: Optional[os.PathLike] = "cpubone-bench",
                  precision: str = "fp32") -> ProfileResult:
    """Profile ``name`` at batch 1: tables per block, block kind and op type, plus a bar chart.

    Args:
        name: CPUBone variant or timm model (random weights, deploy form as in ``cpubone bench``).
        engine: 'onnxruntime' or 'openvino' (the runtime's own per-node profiler) or 'eager' (forward hooks);
            see ``profiling_engines()``.
        precision: fp32, or what the engine runs besides (onnxruntime: int8; openvino: bf16, int8),
            prepared as ``cpubone bench --precision`` does (int8 calibrated on scikit-image photos).
        threads / size / runs / warmup: as in ``cpubone bench``.
        out_dir: writes ``profile_<model>.{csv,json,md,png}`` there (None: nothing written).
    """
    engine, precision = _check_engine(engine, precision)
    check_run_args([name], engine, threads, size, runs, warmup, precision)
    threads = usable_threads(threads)
    if out_dir is not None:
        check_output_dir(out_dir, need_bytes=2 ** 20)  # before the measuring, not after it
    model, _ = build_model(name)
    counted = counted_model(name, model)
    report: MacReport = count_macs(counted, size)
    units = block_units(counted)
    shape = (1, getattr(model, "in_chans", 3), size, size)
    modules = [n for n, _ in model.named_modules()]
    kernels: List[dict] = []
    if engine != "eager":
        runtime = get_engine(engine)
        runner = prepare_runner(name, model, engine, precision, threads, size)  # what bench times (cached)
        # the one latency harness on the runner as deployed, profiler off; then a profiled copy of it
        lat = time_callable(runner.timer(), runs, warmup, threads, engine)
        nodes = runtime.profile_nodes(runner, runs, warmup)
        unit_ms, op_ms, op_calls, kernels = _charge(nodes, modules, units)
        # every block is listed, also one whose nodes the runtime fused into a neighbour's (0 ms)
        unit_ms = {**{u: 0.0 for u in units}, **unit_ms}
        class_macs = {c: sum(report.by_op.get(o, 0) for o in ops) for c, ops in _MAC_CLASS_OPS.items()}
        class_of = {op: _mac_class(op) for op in op_ms}
    else:
        lat = measure_eager(model, shape, threads=threads, runs=runs, warmup=warmup)
        unit_ms, op_ms, op_calls, leaves = _eager_times(model, shape, threads, runs, warmup, units)
        class_of = {op: ("conv" if "Conv" in op else "matmul" if op == "Linear" else "other") for op in op_ms}
        class_macs = defaultdict(int)
        for n, typ in leaves.items():
            class_macs[class_of.get(typ, "other")] += report.module(n)
        # what hooks cannot see: time inside units but outside leaf modules (pads, sdpa, adds, upsampling)
        functional = sum(unit_ms.values()) - sum(op_ms.values())
        if functional > 0:
            op_ms["functional (no module)"] = functional
            class_of["functional (no module)"] = "other"
            class_macs["other"] = report.total - class_macs["conv"] - class_macs["matmul"]
    # the fp32 GEMM peak in the engine when it has one (ONNX Runtime's MatMul, torch.matmul), as in bench
    peak = gemm_peak(engine if engine in GEMM_ENGINES else "onnxruntime", threads)
    total_ms = sum(unit_ms.values()) or float("nan")

    # MACs per unit exclude the units nested inside it, like its time
    def own_macs(u: str) -> int:
        nested = [v for v in units if v.startswith(u + ".") and _unit_of(v.rsplit(".", 1)[0], units) == u]
        return report.module(u) - sum(report.module(v) for v in nested) if u else 0

    unit_macs = {u: own_macs(u) for u in unit_ms}
    if "" in unit_ms:  # ops outside every unit: what no unit accounts for
        unit_macs[""] = max(0, report.total - sum(own_macs(u) for u in units))

    def row(label: str, key: str, macs: int, ms: float) -> dict:
        return {key: label, "macs": int(macs), "ms": ms, "gmacps": (macs / (ms * 1e-3) / 1e9) if ms > 0 and macs else None,
                "share_pct": 100.0 * ms / total_ms}

    blocks = [dict(row(u or "(model)", "block", unit_macs.get(u, 0), ms), kind=units.get(u, "other"))
              for u, ms in unit_ms.items()]
    blocks = [{k: b[k] for k in ("block", "kind", "macs", "ms", "gmacps", "share_pct")} for b in blocks]
    kind_acc: Dict[str, List[float]] = defaultdict(lambda: [0, 0.0])
    for b in blocks:
        kind_acc[b["kind"]][0] += b["macs"]
        kind_acc[b["kind"]][1] += b["ms"]
    kinds = sorted((row(k, "kind", m, t) for k, (m, t) in kind_acc.items()), key=lambda r: -r["ms"])
    ops = []
    for op, ms in sorted(op_ms.items(), key=lambda kv: -kv[1]):
        ops.append(dict(op=op, calls=op_calls.get(op, 0), mac_class=class_of.get(op, "other"), ms=ms,
                        share_pct=100.0 * ms / (sum(op_ms.values()) or float("nan")), macs=None, gmacps=None))
    for cls in ("conv", "matmul"):
        t = sum(o["ms"] for o in ops if o["mac_class"] == cls)
        m = class_macs.get(cls, 0)
        ops.append(dict(op=f"all {cls} ops", calls=sum(o["calls"] for o in ops if o["mac_class"] == cls),
                        mac_class=cls, ms=t, share_pct=100.0 * t / (sum(op_ms.values()) or float("nan")),
                        macs=m, gmacps=(m / (t * 1e-3) / 1e9) if t > 0 else None))
    # latency ~ MACs / MACpS, summed over the blocks that do MACs; what is left of the measured time is
    # spent in MAC-free work (norms, layout reorders, pads, adds)
    predicted = sum(b["macs"] / (b["gmacps"] * 1e9) * 1e3 for b in blocks if b["gmacps"])
    res = ProfileResult(
        model=name, engine=lat.engine, precision=precision, threads=threads, size=size,
        machine_header=machine_info().header(threads),
        measured_ms=lat.median_ms, profiled_ms=total_ms, predicted_ms=predicted,
        floor_ms=report.total / (peak.gmacps * 1e9) * 1e3, peak_gmacps=peak.gmacps, macs=report.total,
        blocks=blocks, kinds=kinds, ops=ops, kernels=kernels,
    )
    if out_dir is not None:
        try:
            res.files = _write(res, Path(out_dir))
        except OutputPathError as e:
            raise ResultsNotWritten(f"profile measured but not written: {e}", res) from None
    return res


def _write(res: ProfileResult, out_dir: Path) -> Dict[str, str]:
    from .report import (
        NO_PLOT,
        markdown_table,
        optional_plot,
        plot_profile,
        write_csv,
        write_json,
    )

    # ONNX Runtime fp32 (the default) keeps the plain name; other runs are named by engine and precision
    run = "" if (res.engine, res.precision) == ("onnxruntime", "fp32") else f"_{res.engine}" + (
        "" if res.precision == "fp32" else f"_{res.precision}")
    stem = "profile_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in res.model) + run
    files = {
        "csv": write_csv([dict(table="block", **b) for b in res.blocks] + [dict(table="kind", **k) for k in res.kinds]
                         + [dict(table="op", **o) for o in res.ops] + [dict(table="kernel", **k) for k in res.kernels],
                         out_dir / f"{stem}.csv"),
        "json": write_json(res.to_dict(), out_dir / f"{stem}.json"),
        "png": optional_plot(plot_profile, res.kinds, out_dir / f"{stem}.png",
                             f"{res.model}: {res.engine} {res.precision}, {res.threads} thread(s), "
                             f"{res.size}x{res.size}; "
                             f"{res.machine_header.split(' (')[0]}", res.peak_gmacps),
    }
    md = [f"# cpubone profile {res.model}", "", f"- machine: {res.machine_header}",
          f"- engine {res.engine} {res.precision}, {res.threads} thread(s), batch 1, {res.size}x{res.size}",
          f"- measured latency (median, profiler off): {res.measured_ms:.2f} ms",
          f"- predicted latency = sum of MACs / MACpS over the blocks that do MACs: {res.predicted_ms:.2f} ms "
          f"(all profiled block times: {res.profiled_ms:.2f} ms; the rest is MAC-free work)",
          f"- floor at the GEMM peak ({res.peak_gmacps:.1f} GMAC/s): {res.floor_ms:.2f} ms", "",
          "## By block kind", "", markdown_table(res.kinds), "## By op type", "", markdown_table(res.ops),
          *(["## By kernel (op type x the kernel the runtime picked)", "", markdown_table(res.kernels)]
            if res.kernels else []),
          "## By block", "", markdown_table(res.blocks),
          f"![by block kind]({stem}.png)" if files["png"] else NO_PLOT + ".", ""]
    files["md"] = atomic_write_text(out_dir / f"{stem}.md", "\n".join(md))
    return {k: str(v) for k, v in files.items() if v is not None}
