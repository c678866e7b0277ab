"""``cpubone design search``: the CPUBone-style backbone with the best accuracy proxy under a latency budget.

The search space (``SearchSpace``) holds the paper's design choices per stage: widths, depths, the
fused/unfused width threshold, expansion groups, kernel sizes, which stages carry attention and at what
stride, the downsample expand ratio and the head widths. Every candidate is scored from the latency table
alone (no model is built): predicted latency = overhead + sum of its units' entries, and its MACs, params
and depth from the same entries, so tens of thousands of candidates take seconds.

Accuracy proxy (``accuracy_proxy``): published ImageNet-1k top-1 of the released variants fitted by least
squares on ln(GMACs at 224x224) and ln(depth), depth = blocks in the network (stem blocks + every stage's
downsample and blocks), GMACs those of the design built with the released block recipe (``recipe_config``):

    top-1 = 65.22 + 1.452 ln(GMACs) + 5.328 ln(depth)

Evidence (``proxy_evidence()``): the 7 variants with a published top-1 (Nano 72.67 ... B3 83.1), residual
RMS 0.35 points, leave-one-out RMS 0.65 and worst 1.09 points; MACs alone leave 0.54 / 0.97 / 1.82. Then
the paper's ablation: expansion groups 4 cost 0.3 points against groups 2 (charged per stage in
proportion to its share of the blocks). Widths, depths, head widths, expand ratios and attention placement
move the proxy; the block choices (groups 1/2, kernels, the fused/unfused threshold) are made for measured
speed alone, since the fit has no evidence that their extra MACs buy accuracy. The proxy is only trusted
inside the range it was fitted on, so candidates outside the released family's MACs and depth are
rejected. A designed model still needs training to know its accuracy.

Search: seeded random sampling of the space plus hill-climbing mutations of the best feasible candidates;
the released variants are scored the same way and placed on the Pareto front of predicted latency vs
proxy.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..results import pareto_front as pareto_points
from ..results import pyplot, save_figure
from .lut import LatencyTable, LutError
from .units import Unit, conv_out, model_units

__all__ = ["SearchSpace", "Candidate", "SearchResult", "space_units", "released_units", "accuracy_proxy",
           "proxy_evidence", "PROXY_COEF", "PAPER_RULES", "score", "search", "sample_config"]

# top-1 = a + b ln(GMACs @224) + c ln(depth); fitted on the released variants (see proxy_evidence)
PROXY_COEF = (65.219, 1.452, 5.328)
# paper's ablation: expansion groups 4 / 8 against 2
GROUPS_PENALTY = {4: 0.3, 8: 0.7}
PAPER_RULES = {"block": "GrFuMBConv below 256 channels, GrMBConv from 256", "groups": 2,
               "kernel": "3x3 in stages 1-2, 2x2 in the attention stages 3-4"}


def model_depth(config: Mapping[str, Any]) -> int:
    """Blocks in the network: stem blocks + per stage its downsample and its blocks (conv or CPUBone)."""
    d = config["depths"]
    return d[0] + sum((d[i + 1] if config["attention"][i] else max(d[i + 1] - 1, 0)) + 1 for i in range(4))


def accuracy_proxy(gmacs_224: float, depth: int, groups: Sequence[int] = (), stage_blocks: Sequence[int] = ()) -> float:
    """The proxy top-1 (%) of a design with ``gmacs_224`` GMACs at 224x224 and ``depth`` blocks."""
    a, b, c = PROXY_COEF
    top1 = a + b * math.log(gmacs_224) + c * math.log(depth)
    total = sum(stage_blocks) or 1
    for g, n in zip(groups, stage_blocks):
        top1 -= GROUPS_PENALTY.get(g, 0.0) * n / total
    return top1


def _released_points() -> List[Tuple[str, float, int, float]]:
    from ..models import VARIANTS, variant_config

    return [(n, c.macs / 1e9, model_depth(variant_config(n)), c.top1) for n, c in VARIANTS.items() if c.top1]


def proxy_evidence() -> Dict[str, Any]:
    """Refit the proxy on the released variants: coefficients, residuals and leave-one-out errors."""
    import numpy as np

    pts = _released_points()
    X = np.array([[1.0, math.log(m), math.log(d)] for _, m, d, _ in pts])
    y = np.array([t for *_, t in pts])
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    loo = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        loo.append(float(y[i] - X[i] @ np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]))
    res = y - X @ coef
    return dict(coef=[float(c) for c in coef], rows=[dict(model=n, gmacs=m, depth=d, top1=t, fit=float(t - r))
                                                     for (n, m, d, t), r in zip(pts, res)],
                rms=float(np.sqrt(np.mean(res ** 2))), loo_rms=float(np.sqrt(np.mean(np.square(loo)))),
                loo_worst=float(np.max(np.abs(loo))),
                gmacs_range=(min(p[1] for p in pts), max(p[1] for p in pts)),
                depth_range=(min(p[2] for p in pts), max(p[2] for p in pts)))


@dataclass
class SearchSpace:
    """The choices of the search, per stage 1-4 where a tuple of tuples is given.

    Consecutive widths must grow by ``width_growth`` (min, max ratio); attention choices are per-stage
    flags; ``attn_strides`` lists the Lowtention strides tried in each attention stage.
    """

    stem_widths: Tuple[int, ...] = (12, 16, 20, 24)
    widths: Tuple[Tuple[int, ...], ...] = ((24, 32, 40, 48), (48, 64, 80, 96), (96, 128, 160, 192),
                                           (192, 256, 320, 384))
    depths: Tuple[Tuple[int, ...], ...] = ((1, 2), (1, 2, 3), (1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5, 6))
    kernels: Tuple[Tuple[int, ...], ...] = ((3,), (3,), (2, 3), (2, 3))
    groups: Tuple[int, ...] = (1, 2, 4)
    fused_below: Tuple[int, ...] = (128, 192, 256, 384)
    # the released placement only: the proxy has no evidence on where attention pays (a --space file can
    # add e.g. (false, false, false, true))
    attention: Tuple[Tuple[bool, ...], ...] = ((False, False, True, True),)
    attn_strides: Tuple[Tuple[int, ...], ...] = ((1,), (1,), (1, 2), (1,))
    downsample_expand: Tuple[float, ...] = (4.0, 6.0)
    head_widths: Tuple[Tuple[int, int], ...] = ((1024, 1280), (1536, 1600), (2304, 2560))
    expand_ratio: float = 4.0
    width_growth: Tuple[float, float] = (1.5, 2.7)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, path) -> "SearchSpace":
        """A space from a JSON file of some of this class's fields (the others keep their defaults)."""
        import json
        from dataclasses import fields
        from pathlib import Path

        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: no such search-space file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known:
            bad = sorted(set(raw) - known)[0] if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{path}: unknown search-space key {bad!r} (known: {', '.join(sorted(known))})")

        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        space = cls(**{k: tup(v) for k, v in raw.items()})
        for key in ("widths", "depths", "kernels", "attn_strides"):
            if len(getattr(space, key)) != 4:
                raise ValueError(f"{path}: key {key!r} needs 4 lists (stages 1-4)")
        return space

    def width_pairs(self, i: int) -> List[Tuple[int, int]]:
        """(previous width, width) pairs allowed into stage ``i`` (0-based)."""
        prevs = self.stem_widths if i == 0 else self.widths[i - 1]
        lo, hi = self.width_growth
        return [(p, w) for p in prevs for w in self.widths[i] if lo <= w / p <= hi]


def _fused_widths(space: SearchSpace, width: int) -> List[str]:
    return sorted({"fused" if width < t else "unfused" for t in space.fused_below})


def space_units(space: SearchSpace, size: Sequence[int]) -> List[Unit]:
    """Every unit a design of ``space`` can contain at input ``size`` (H, W)."""
    H, W = int(size[0]), int(size[1])
    units: List[Unit] = [Unit("stem", 3, w, H, W, 3, 2, 1.0, 1) for w in space.stem_widths]
    h, w_ = conv_out(H, 3, 2), conv_out(W, 3, 2)
    attn_any = [any(a[i] for a in space.attention) for i in range(4)]
    conv_any = [any(not a[i] for a in space.attention) for i in range(4)]
    for i in range(4):
        for (p, c), g, e in itertools.product(space.width_pairs(i), space.groups, space.downsample_expand):
            if p % g == 0 and round(p * e) % g == 0:
                units.append(Unit("downsample", p, c, h, w_, 3, 2, e, g))
        h, w_ = conv_out(h, 3, 2), conv_out(w_, 3, 2)
        for c in space.widths[i]:
            for kind, k, g in itertools.product(_fused_widths(space, c), space.kernels[i], space.groups):
                if c % g:
                    continue
                if conv_any[i] and max(space.depths[i]) > 1:
                    units.append(Unit(kind, c, c, h, w_, k, 1, space.expand_ratio, g))
                if attn_any[i]:  # a CPUBone block's local branch (fused: with an expansion bias)
                    units.append(Unit(kind, c, c, h, w_, k, 1, space.expand_ratio, g, int(kind == "fused")))
            if attn_any[i]:
                for k, s in itertools.product(space.kernels[i], space.attn_strides[i]):
                    units.append(Unit("attn", c, c, h, w_, k, s, 1.0, 1))
                units.append(Unit("mlp", c, c, h, w_, 1, 1, 4.0, 1))
    for c, hw in itertools.product(space.widths[3], space.head_widths):
        units.append(Unit("head", c, hw[0], h, w_, 1, 1, 1.0, 1, hw[1]))
    return list(dict.fromkeys(units))


def released_units(size: Sequence[int]) -> List[Unit]:
    """The units of the released variants at ``size`` (so the table can place them on the front)."""
    from ..models import VARIANTS, variant_config

    units = [u for n in VARIANTS for _, u in model_units(variant_config(n), tuple(size))]
    return list(dict.fromkeys(units))


def sample_config(space: SearchSpace, rng: random.Random, name: str = "design") -> Dict[str, Any]:
    """One random design of ``space`` as a complete config (see ``cpubone.models.config``)."""
    stem = rng.choice(space.stem_widths)
    widths, prev = [stem], stem
    for i in range(4):
        pairs = [c for p, c in space.width_pairs(i) if p == prev]
        if not pairs:  # no width grows from this one: restart from another stem width
            return sample_config(space, rng, name)
        prev = rng.choice(pairs)
        widths.append(prev)
    attention = list(rng.choice(space.attention))
    groups = []
    for i in range(4):
        ok = [g for g in space.groups if widths[i + 1] % g == 0 and widths[i] % g == 0]
        groups.append(rng.choice(ok))
    return dict(
        format="cpubone-config/1", name=name, widths=widths,
        depths=[0] + [rng.choice(d) for d in space.depths], head_widths=list(rng.choice(space.head_widths)),
        expand_ratio=[space.expand_ratio] * 4, expand_groups=groups,
        downsample_expand_ratio=[rng.choice(space.downsample_expand)] * 4, stem_expand_ratio=4.0,
        kernel_sizes=[rng.choice(k) for k in space.kernels], attention=attention,
        attn_strides=[rng.choice(space.attn_strides[i]) if attention[i] else 1 for i in range(4)],
        fused_below_channels=rng.choice(space.fused_below), mlp_ratio=4.0,
    )


@dataclass
class Candidate:
    """A scored design: predicted latency (ms) at the search size, MACs at 224 and at the search size,
    params, depth and proxy top-1."""

    config: Dict[str, Any]
    latency_ms: float
    macs: int
    macs_224: int
    params: int
    depth: int
    proxy: float
    in_range: bool

    def row(self) -> Dict[str, Any]:
        c = self.config
        return dict(name=c["name"], latency_ms=self.latency_ms, proxy_top1=self.proxy, macs=self.macs,
                    params=self.params, depth=self.depth, widths="/".join(map(str, c["widths"])),
                    depths="/".join(map(str, c["depths"])))


def _sum_units(config: Mapping[str, Any], lut: LatencyTable, size: Tuple[int, int]) -> Tuple[float, int, int]:
    """(predicted ms, MACs, params) of ``config`` from the table's entries alone."""
    ms, macs, params = 0.0, 0, 0
    for _, u in model_units(config, size):
        e = lut.entries[u.key]
        ms += e["ms"]
        macs += int(e["macs"])
        params += int(e["params"])
    return lut.predict_ms(ms, size), macs, params


def recipe_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` with the released block recipe: expansion groups 2, 3x3 kernels in conv stages and 2x2 in
    attention stages, Lowtention stride 2 (1 in stage 4), fused below 256 channels. Its MACs are the
    capacity the proxy credits."""
    cfg = dict(config)
    w = config["widths"]
    cfg["expand_groups"] = [2 if w[i] % 2 == 0 and w[i + 1] % 2 == 0 else g
                            for i, g in enumerate(config["expand_groups"])]
    cfg["kernel_sizes"] = [2 if a else 3 for a in config["attention"]]
    cfg["attn_strides"] = [(1 if i == 3 else 2) if a else 1 for i, a in enumerate(config["attention"])]
    cfg["fused_below_channels"] = 256
    return cfg


@lru_cache(maxsize=None)
def _unit_macs(unit: Unit) -> int:
    from .lut import unit_work

    return unit_work(unit)[0]


def proxy_macs(config: Mapping[str, Any], lut: Optional[LatencyTable] = None) -> int:
    """MACs at 224x224 of ``recipe_config(config)`` (from the table where it has the units, else counted)."""
    total = 0
    for _, u in model_units(recipe_config(config), (224, 224)):
        e = lut.entries.get(u.key) if lut is not None else None
        total += int(e["macs"]) if e else _unit_macs(u)
    return total


def score(config: Mapping[str, Any], lut: LatencyTable, size: Sequence[int]) -> Candidate:
    """Predicted latency, work and proxy of ``config`` from ``lut`` (raises KeyError for a unit the table
    lacks at ``size``).

    The proxy's capacity term is the MACs at 224x224 of the design with the released block recipe
    (``recipe_config``): the fit only knows that recipe, so the block choices (groups, kernels,
    fused/unfused) are made for speed and earn no accuracy credit from the MACs they add; groups 4 pays
    the paper's measured 0.3 points.
    """
    size = (int(size[0]), int(size[1]))
    ms, macs, params = _sum_units(config, lut, size)
    macs_224 = proxy_macs(config, lut)
    depth = model_depth(config)
    d = config["depths"]
    stage_blocks = [(d[i + 1] if config["attention"][i] else max(d[i + 1] - 1, 0)) + 1 for i in range(4)]
    proxy = accuracy_proxy(macs_224 / 1e9, depth, config["expand_groups"], stage_blocks)
    lo_m, hi_m = _FIT_RANGE[0]
    lo_d, hi_d = _FIT_RANGE[1]
    in_range = lo_m * 0.9 <= macs_224 / 1e9 <= hi_m * 1.1 and lo_d <= depth <= hi_d
    return Candidate(dict(config), ms, macs, macs_224, params, depth, proxy, in_range)


# the released family's GMACs and depth span: the proxy is trusted inside it
_FIT_RANGE = ((0.187, 4.055), (7, 20))


def _mutate(config: Dict[str, Any], space: SearchSpace, rng: random.Random) -> Dict[str, Any]:
    """``config`` with one choice changed (a fresh sample supplies the new value)."""
    other = sample_config(space, rng, config["name"])
    new = dict(config)
    key = rng.choice(["widths", "depths", "head_widths", "expand_groups", "downsample_expand_ratio", "kernel_sizes",
                      "attention", "fused_below_channels"])
    if key in ("depths", "expand_groups", "kernel_sizes"):
        i = rng.randrange(1, 5) if key == "depths" else rng.randrange(4)
        new[key] = list(config[key])
        new[key][i] = other[key][i]
    elif key == "attention":
        new["attention"], new["attn_strides"] = other["attention"], other["attn_strides"]
    else:
        new[key] = other[key]
    # keep groups valid for the (possibly new) widths
    new["expand_groups"] = [g if new["widths"][i + 1] % g == 0 and new["widths"][i] % g == 0 else 2
                            for i, g in enumerate(new["expand_groups"])]
    return new


@dataclass
class SearchResult:
    """The search's winner, its Pareto front and where the released variants sit."""

    size: Tuple[int, int]
    budget_ms: float
    max_params: Optional[int]
    evaluated: int
    best: Optional[Candidate]
    front: List[Candidate]
    released: List[Candidate]
    choices: List[Dict[str, Any]] = field(default_factory=list)
    points: List[Tuple[float, float]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return dict(size=list(self.size), budget_ms=self.budget_ms, max_params=self.max_params,
                    evaluated=self.evaluated, best=self.best.row() if self.best else None,
                    best_config=self.best.config if self.best else None,
                    front=[c.row() for c in self.front], released=[c.row() for c in self.released],
                    choices=self.choices)


def pareto_front(cands: Iterable[Candidate]) -> List[Candidate]:
    """Candidates no other beats on both lower latency and higher proxy, by rising latency."""

    by_point = {}
    for c in cands:
        by_point.setdefault((c.latency_ms, c.proxy), c)
    return [by_point[p] for p in pareto_points(by_point)]


def design_choices(config: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Per stage: the block the design uses at its width (fused or unfused, groups, kernel) beside the
    paper's rule for that width."""
    rows = []
    for i in range(4):
        w = config["widths"][i + 1]
        fused = w < config["fused_below_channels"]
        paper_block = "GrFuMBConv" if w < 256 else "GrMBConv"
        g = config["expand_groups"][i]
        block = ("Gr" if g > 1 else "") + ("FuMBConv" if fused else "MBConv") + (f" (groups {g})" if g > 2 else "")
        k, attn = config["kernel_sizes"][i], config["attention"][i]
        pk = 2 if attn else 3
        rows.append(dict(stage=i + 1, width=w, blocks="CPUBone" if attn else "conv",
                         chosen=f"{block}, {k}x{k}" + (f", attn stride {config['attn_strides'][i]}" if attn else ""),
                         paper=f"{paper_block}, {pk}x{pk}" + (f", attn stride {1 if i == 3 else 2}" if attn else ""),
                         same_as_paper=(block == paper_block and k == pk
                                        and (not attn or config["attn_strides"][i] == (1 if i == 3 else 2)))))
    return rows


def search(
    lut: LatencyTable,
    budget_ms: float,
    size: Sequence[int] = (224, 224),
    max_params: Optional[int] = None,
    space: Optional[SearchSpace] = None,
    samples: int = 4000,
    mutations: int = 2000,
    seed: int = 0,
    name: str = "cpubone_design",
) -> SearchResult:
    """Search ``space`` for the design with the best accuracy proxy whose predicted latency on the table's
    machine is within ``budget_ms`` (and params within ``max_params``).

    Raises ``LutError`` when the table lacks units of the space at ``size``; returns ``best=None`` when no
    candidate fits the budget.
    """
    if budget_ms <= 0:
        raise ValueError(f"budget {budget_ms} ms: must be positive")
    if max_params is not None and max_params <= 0:
        raise ValueError(f"max params {max_params}: must be positive")
    space = space or SearchSpace()
    size = (int(size[0]), int(size[1]))
    missing = lut.missing(u.key for u in space_units(space, size))
    if missing:
        raise LutError(f"{lut.path or 'latency table'}: {len(missing)} unit(s) of the search space at "
                       f"{size[0]}x{size[1]} are not measured (e.g. {missing[0]}); build the table at this size")
    rng = random.Random(seed)

    def feasible(c: Candidate) -> bool:
        return c.in_range and c.latency_ms <= budget_ms and (max_params is None or c.params <= max_params)

    seen: Dict[str, Candidate] = {}

    def evaluate(cfg: Dict[str, Any]) -> Candidate:
        key = repr(sorted((k, v) for k, v in cfg.items() if k != "name"))
        if key not in seen:
            seen[key] = score(cfg, lut, size)
        return seen[key]

    for _ in range(samples):
        evaluate(sample_config(space, rng, name))
    # hill-climb from the best feasible candidates: a mutation is kept when it is feasible and scores higher
    pool = sorted((c for c in seen.values() if feasible(c)), key=lambda c: -c.proxy)[:8]
    for step in range(mutations if pool else 0):
        parent = pool[step % len(pool)]
        child = evaluate(_mutate(parent.config, space, rng))
        if feasible(child) and child.proxy > parent.proxy:
            pool[step % len(pool)] = child
    ok = [c for c in seen.values() if feasible(c)]
    best = max(ok, key=lambda c: (c.proxy, -c.latency_ms)) if ok else None
    released = []
    from ..models import VARIANTS, variant_config

    for n in VARIANTS:
        try:
            released.append(score(variant_config(n), lut, size))
        except KeyError:
            pass  # the table was built without this variant's units at this size
    front = pareto_front(c for c in seen.values() if c.in_range and (max_params is None or c.params <= max_params))
    if best is not None:
        best.config["name"] = name
        best.config["input_size"] = list(size)
    return SearchResult(size=size, budget_ms=budget_ms, max_params=max_params, evaluated=len(seen), best=best,
                        front=front, released=released, choices=design_choices(best.config) if best else [],
                        points=[(c.latency_ms, c.proxy) for c in seen.values() if c.in_range])


def plot_search(result: SearchResult, path, title: str = "") -> Any:
    """Predicted latency vs proxy top-1: every in-range candidate, the Pareto front, the released variants,
    the winner and the budget."""

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if result.points:
        xs, ys = zip(*result.points)
        ax.scatter(xs, ys, s=4, c="0.8", label=f"candidates ({len(xs)})")
    if result.front:
        ax.plot([c.latency_ms for c in result.front], [c.proxy for c in result.front], "-", c="tab:blue",
                label="Pareto front")
    for c in result.released:
        ax.scatter([c.latency_ms], [c.proxy], c="tab:orange", marker="o", zorder=3)
        ax.annotate(c.config["name"].replace("cpubone_", ""), (c.latency_ms, c.proxy), fontsize=8,
                    xytext=(3, -9), textcoords="offset points")
    if result.best:
        ax.scatter([result.best.latency_ms], [result.best.proxy], c="tab:red", marker="*", s=160, zorder=4,
                   label=f"winner ({result.best.latency_ms:.2f} ms, proxy {result.best.proxy:.2f})")
    ax.axvline(result.budget_ms, ls="--", c="tab:red", lw=1, label=f"budget {result.budget_ms:g} ms")
    ax.set_xscale("log")  # the space spans two orders of magnitude of latency
    ax.set_xlabel(f"predicted latency (ms, log scale), batch 1, {result.size[0]}x{result.size[1]}")
    ax.set_ylabel("accuracy proxy: top-1 fitted on released variants (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(plt, fig, path)
