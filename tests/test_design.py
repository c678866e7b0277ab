"""``cpubone design``: the latency table on a tiny space, the predictor on a known table, the search on a
synthetic table, and the commands."""
import json

import pytest

from cpubone.models.macs import count_macs, count_params
from cpubone.cli import main
from cpubone.design import lut as lut_mod
from cpubone.design.lut import LatencyTable, LutError, build_lut, fit_overhead, load_lut, unit_work
from cpubone.design.predict import predict
from cpubone.design.search import (PROXY_COEF, SearchSpace, accuracy_proxy, model_depth, proxy_evidence,
                                   released_units, score, search, space_units)
from cpubone.design.units import Unit, model_units
from cpubone.models import create_model, load_config, variant_config

TINY = SearchSpace(stem_widths=(8,), widths=((16,), (32,), (48,), (64,)), depths=((1,), (2,), (1,), (1,)),
                   kernels=((3,), (3,), (2,), (2,)), groups=(2,), fused_below=(256,),
                   attention=((False, False, True, True),), attn_strides=((1,), (1,), (2,), (1,)),
                   downsample_expand=(4.0,), head_widths=((32, 40),), width_growth=(1.0, 3.0))
# small enough to build a synthetic table quickly, big enough for budgets to matter
SMALL = SearchSpace(stem_widths=(8, 16), widths=((16, 32), (32, 64), (64, 128), (128, 256)),
                    depths=((1, 2), (1, 2), (1, 2, 3), (1, 2, 3)), kernels=((3,), (3,), (2, 3), (2,)),
                    groups=(2, 4), fused_below=(128, 256), attention=((False, False, True, True),),
                    attn_strides=((1,), (1,), (2,), (1,)), downsample_expand=(4.0, 6.0),
                    head_widths=((64, 80), (128, 160)), width_growth=(1.5, 2.5))
SIZE = (64, 64)


def test_space_units_cover_every_sampled_design():
    import random

    units = set(space_units(SMALL, SIZE))
    rng = random.Random(0)
    from cpubone.design.search import sample_config

    for _ in range(200):
        cfg = sample_config(SMALL, rng)
        assert {u for _, u in model_units(cfg, SIZE)} <= units


@pytest.mark.parametrize("source", ["cpubone_b0", dict(base="cpubone_nano", attention=[False, True, True, True],
                                                       attn_strides=[1, 2, 2, 1], fused_below_channels=48,
                                                       expand_groups=[1, 2, 4, 4], depths=[1, 2, 1, 1, 2])])
def test_units_partition_the_model(source):
    """The units' MACs and params add up to the whole model's, at an odd size too."""
    cfg = variant_config(source) if isinstance(source, str) else load_config(source)
    model = create_model(cfg)
    for size in [(64, 64), (45, 71)]:
        work = [unit_work(u) for _, u in model_units(cfg, size)]
        assert sum(m for m, _ in work) == count_macs(model, size).total
        assert sum(p for _, p in work) == count_params(model)


def test_unit_key_round_trip():
    u = Unit("head", 256, 1536, 7, 9, 1, 1, 1.0, 1, 1600)
    assert Unit.from_key(u.key) == u


def test_lut_on_a_tiny_space_resumes(tmp_path, monkeypatch):
    units = space_units(TINY, SIZE)
    path = tmp_path / "device.json"
    first = units[: len(units) // 2]
    table = build_lut(first, path, runs=2, warmup=0, progress=False, sizes=[SIZE])
    assert set(table.entries) == {u.key for u in first}
    raw = json.loads(path.read_text())
    assert raw["machine"]["cpu"] and raw["engine"] == "onnxruntime" and raw["threads"] == 1
    assert all(e["ms"] >= 0 and e["macs"] > 0 for e in raw["entries"].values())
    assert raw["overhead_ms"] > 0 and raw["fixed_ms"]["64x64"] >= raw["overhead_ms"]
    assert 0.8 <= raw["scale"]["64x64"] <= 1.5
    # a second call measures only what is missing and keeps the measured entries
    calls = []
    real = lut_mod.unit_runner
    monkeypatch.setattr(lut_mod, "unit_runner", lambda u, *a: calls.append(u) or real(u, *a))
    table2 = build_lut(units, path, runs=2, warmup=0, progress=False)
    assert {u.key for u in calls} == {u.key for u in units} - {u.key for u in first}
    assert all(table2.entries[k] == raw["entries"][k] for k in raw["entries"])
    assert set(load_lut(path).entries) == {u.key for u in units}
    # the table predicts the tiny design it covers
    cfg = dict(widths=[8, 16, 32, 48, 64], depths=[0, 1, 2, 1, 1], head_widths=[32, 40])
    assert predict(cfg, load_lut(path), SIZE).latency_ms > 0


@pytest.mark.parametrize("engine,precision", [("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "int8"),
                                              ("executorch", "fp32"), ("executorch", "int8"), ("ncnn", "fp32")])
def test_lut_in_every_engine_and_precision(tmp_path, engine, precision):
    """A table for a tiny space in each installed engine x precision: the units run through the engine's own
    export (and quantizer), the table records engine and precision, and predict reads them."""
    from cpubone.engines import engine_class

    if not engine_class(engine).available():
        pytest.skip(f"{engine} is not installed")
    units = space_units(TINY, SIZE)[:2]
    path = tmp_path / f"{engine}-{precision}.json"
    table = build_lut(units, path, engine=engine, precision=precision, runs=2, warmup=1, progress=False)
    raw = json.loads(path.read_text())
    assert (raw["engine"], raw["precision"]) == (engine, precision)
    assert set(raw["entries"]) == {u.key for u in units} and all(e["ms"] >= 0 for e in raw["entries"].values())
    assert f"{engine} {precision}" in load_lut(path).describe() == table.describe()
    # a table of one engine x precision is refused for another, in one line naming both
    other = "fp32" if precision == "int8" else "int8"
    with pytest.raises(LutError, match=rf"measured with {engine} {precision}, not {engine} {other}"):
        lut_mod.check_table_for(load_lut(path), engine, other)
    lut_mod.check_table_for(load_lut(path), engine, precision)
    with pytest.raises(LutError, match=f"{engine} {precision} at 1 thread"):  # no mixing into one file
        build_lut(units, path, engine=engine, precision=precision, threads=2, runs=1, warmup=0, progress=False)


def test_lut_refuses_a_mismatched_table(tmp_path):
    path = tmp_path / "device.json"
    build_lut(space_units(TINY, SIZE)[:1], path, runs=1, warmup=0, progress=False)
    with pytest.raises(LutError, match="1 thread"):
        build_lut(space_units(TINY, SIZE)[:1], path, threads=2, runs=1, warmup=0, progress=False)
    with pytest.raises(LutError, match="wall clock"):
        build_lut(space_units(TINY, SIZE)[:1], path, clock="cpu", runs=1, warmup=0, progress=False)
    with pytest.raises(ValueError, match="one thread only"):
        build_lut(space_units(TINY, SIZE)[:1], tmp_path / "cpu.json", clock="cpu", threads=2, progress=False)
    with pytest.raises(ValueError, match="is a folder"):  # refused before anything is measured
        build_lut(space_units(TINY, SIZE)[:1], tmp_path, runs=1, warmup=0, progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(LutError, match="bad.json: not valid JSON"):
        load_lut(bad)
    bad.write_text(json.dumps({"format": "cpubone-lut/1", "engine": "onnxruntime", "threads": 1, "machine": {},
                               "entries": {"stem|oops": {"ms": 1, "macs": 1, "params": 1}}}))
    with pytest.raises(LutError, match="not a unit key"):
        load_lut(bad)


def _synthetic(units, overhead=0.05, rate_gmacps=40.0) -> LatencyTable:
    """A table where every unit costs its MACs at a fixed rate plus a per-kind constant (ms)."""
    fixed = {"attn": 0.03, "mlp": 0.01, "head": 0.02}
    entries = {}
    for u in dict.fromkeys(units):
        macs, params = unit_work(u)
        entries[u.key] = dict(ms=macs / (rate_gmacps * 1e9) * 1e3 + fixed.get(u.kind, 0.005), macs=macs, params=params)
    return LatencyTable("onnxruntime", 1, {"cpu": "synthetic", "arch": "none"}, overhead, entries, path="synthetic")


def test_predictor_adds_up_a_known_table():
    cfg = variant_config("cpubone_nano")
    units = model_units(cfg, (224, 224))
    table = LatencyTable("onnxruntime", 1, {"cpu": "x"}, overhead_ms=0.25,
                         entries={u.key: dict(ms=0.0, macs=1, params=1) for _, u in units})
    # give each distinct unit a known cost; repeated units count once per occurrence
    for i, key in enumerate(sorted(table.entries)):
        table.entries[key]["ms"] = 0.1 * (i + 1)
    pred = predict("cpubone_nano", table)
    expected = 0.25 + sum(table.entries[u.key]["ms"] for _, u in units)
    assert pred.latency_ms == pytest.approx(expected)
    assert sum(s["ms"] for s in pred.stages) == pytest.approx(expected - 0.25)
    assert pred.macs == count_macs(create_model("cpubone_nano"), 224).total and pred.params == 6_519_700
    assert {s["stage"] for s in pred.stages} == {"stem", "stage1", "stage2", "stage3", "stage4", "head"}
    # a measured fixed overhead and scale at the size replace the per-call overhead
    table.fixed_ms["224x224"], table.scale["224x224"] = 1.5, 1.1
    scaled = predict("cpubone_nano", table, count=False)
    assert scaled.latency_ms == pytest.approx(1.5 + 1.1 * (expected - 0.25))
    assert sum(s["ms"] for s in scaled.stages) == pytest.approx(1.1 * (expected - 0.25))
    table.fixed_ms.clear(), table.scale.clear()
    del table.entries[units[-1][1].key]
    with pytest.raises(LutError, match="1 unit"):
        predict("cpubone_nano", table)


@pytest.fixture(scope="module")
def small_table():
    return _synthetic(space_units(SMALL, SIZE) + space_units(SMALL, (224, 224)))


def test_search_meets_the_budget_and_improves_with_it(small_table):
    results = [search(small_table, budget, SIZE, space=SMALL, samples=300, mutations=200) for budget in (0.8, 1.2)]
    for res, budget in zip(results, (0.8, 1.2)):
        assert res.best is not None and res.best.latency_ms <= budget and res.best.in_range
        # the score is the table's: the designed model's real MACs at the size are the summed ones
        model = create_model(res.best.config)
        assert res.best.macs == count_macs(model, SIZE).total and res.best.params == count_params(model)
        assert res.best.config["input_size"] == list(SIZE)
        # the front is monotone: slower only when better
        lat = [c.latency_ms for c in res.front]
        prox = [c.proxy for c in res.front]
        assert lat == sorted(lat) and prox == sorted(prox)
    assert results[1].best.proxy > results[0].best.proxy
    # a parameter limit is respected
    res = search(small_table, 1.2, SIZE, max_params=results[1].best.params - 1, space=SMALL, samples=300,
                 mutations=200)
    assert res.best is None or res.best.params < results[1].best.params


def test_search_reports_an_impossible_budget(small_table):
    res = search(small_table, 0.01, SIZE, space=SMALL, samples=50, mutations=0)
    assert res.best is None


def test_search_needs_the_space_in_the_table():
    with pytest.raises(LutError, match="not measured"):
        search(_synthetic(space_units(TINY, SIZE)), 1.0, SIZE, space=SMALL)


def test_proxy_is_the_documented_fit():
    ev = proxy_evidence()
    assert ev["coef"] == pytest.approx(PROXY_COEF, abs=1e-3)
    assert ev["loo_worst"] < 1.2 and ev["rms"] < 0.4
    b0 = variant_config("cpubone_b0")
    assert accuracy_proxy(0.5197, model_depth(b0)) == pytest.approx(77.04, abs=0.01)
    # the paper's groups ablation: groups 4 everywhere costs 0.3 points
    assert accuracy_proxy(0.5, 11, [4] * 4, [1, 1, 4, 5]) == pytest.approx(accuracy_proxy(0.5, 11) - 0.3)


def test_score_of_released_variants_uses_the_table():
    table = _synthetic(released_units((224, 224)))
    c = score(variant_config("cpubone_b0"), table, (224, 224))
    assert c.macs == 519_710_080 and c.params == 10_357_368 and c.in_range


def test_cli_predict_search_config(tmp_path, capsys, small_table):
    lut_path = small_table.save(tmp_path / "device.json")
    design = tmp_path / "d.json"
    assert main(["design", "config", "cpubone_b0", "-o", str(design)]) == 0
    assert load_config(design) == variant_config("cpubone_b0")
    capsys.readouterr()
    # the search over the default space needs units this small table lacks: one clear line
    assert main(["design", "search", "--budget-ms", "1", "--lut", str(lut_path), "--size", "64", "64",
                 "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not measured" in err and len(err.strip().splitlines()) == 1
    cfg = dict(widths=[8, 16, 32, 64, 128], depths=[0, 1, 2, 1, 2], head_widths=[64, 80])
    design.write_text(json.dumps(cfg))
    assert main(["design", "predict", str(design), "--lut", str(lut_path), "--size", "64", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latency_ms"] == pytest.approx(predict(str(design), small_table, SIZE).latency_ms)
    assert main(["design", "predict", str(design), "--lut", str(tmp_path / "none.json")]) == 2
    assert "no such latency table" in capsys.readouterr().err
    # predict and search read the table's engine and precision: one of another runtime is refused in one line
    assert main(["design", "predict", str(design), "--lut", str(lut_path), "--engine", "onnxruntime",
                 "--precision", "fp32"]) == 0
    assert "onnxruntime fp32" in capsys.readouterr().out
    for flags in (["--precision", "int8"], ["--engine", "executorch"]):
        assert main(["design", "search", "--budget-ms", "1", "--lut", str(lut_path), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "measured with onnxruntime fp32, not " in err[0] and "device.json" in err[0]


def test_cli_search_writes_the_winner(tmp_path, capsys, small_table):
    from dataclasses import asdict

    lut_path = small_table.save(tmp_path / "device.json")
    space = tmp_path / "space.json"
    space.write_text(json.dumps(asdict(SMALL)))
    out = tmp_path / "out"
    assert main(["design", "search", "--budget-ms", "1.0", "--lut", str(lut_path), "--size", "64", "64",
                 "--space", str(space), "--samples", "200", "--mutations", "100", "--out-dir", str(out),
                 "--name", "robot", "--max-params", "20M"]) == 0
    text = capsys.readouterr().out
    assert "winner robot" in text and "paper" in text and "released" in text
    # the budget is said to be for the table's runtime, with the deploy command that runs it
    assert "in onnxruntime fp32 at 1 thread(s)" in text and "--engine onnxruntime --precision fp32" in text
    cfg = load_config(out / "design.json")
    assert cfg["name"] == "robot" and cfg["input_size"] == [64, 64]
    assert predict(str(out / "design.json"), small_table).latency_ms <= 1.0
    assert (out / "search.png").stat().st_size > 0
    report = json.loads((out / "search.json").read_text())
    assert report["best"]["latency_ms"] <= 1.0 and report["front"]
    space.write_text('{"widht": [1]}')
    assert main(["design", "search", "--budget-ms", "1", "--lut", str(lut_path), "--space", str(space)]) == 2
    assert "unknown search-space key 'widht'" in capsys.readouterr().err


def test_fit_overhead_through_two_references():
    assert fit_overhead([0.5 + 1.2 * 4.0, 0.5 + 1.2 * 10.0], [4.0, 10.0], 0.01) == pytest.approx((0.5, 1.2))
    # references that disagree beyond the plausible range: scale 1, overhead from the small one
    assert fit_overhead([5.0, 30.0], [4.0, 10.0], 0.01) == pytest.approx((1.0, 1.0))
    # never less than one call
    fixed, scale = fit_overhead([3.0, 9.9], [4.0, 10.0], 0.01)
    assert fixed == 0.01 and 0.8 <= scale <= 1.5


class _FakeRunner:
    def __init__(self, fn=lambda: None):
        self.fn = fn

    def timer(self):
        return self.fn


def test_time_rounds_interleaves_and_warms_up_every_round_above_one_thread(monkeypatch):
    """Runners alternate round by round (load hits them alike). At one thread later rounds warm up with one
    call; at more, with at least three (a thread pool switched in needs them to reach its steady state), and
    the timing harness pauses before each multi-thread runner so the previous runtime's threads can park."""
    from cpubone.engines import timing

    sleeps = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: sleeps.append(s))
    for threads, expected in ((1, list("ab") + list("aabb")), (2, list("ab") + list("aaaabbbb"))):
        calls, sleeps[:] = [], []
        runners = {k: _FakeRunner(lambda k=k: calls.append(k)) for k in "ab"}
        times = lut_mod.time_rounds(runners, threads, rounds=2, runs=1, warmup=0)
        assert calls == expected and all(len(v) == 2 for v in times.values())
        assert sleeps == ([] if threads == 1 else [timing.SETTLE_S] * 4)


def test_estimate_is_the_median_at_one_thread_and_the_fastest_round_above():
    times = [5.0, 9.0, 7.0, 3.0, 4.0, 30.0, 8.0, 8.0, 8.0]  # three rounds of three calls
    assert lut_mod.estimate_ms(times, runs=3, threads=1) == 8.0
    assert lut_mod.estimate_ms(times, runs=3, threads=2) == 4.0  # rounds' medians 7, 4, 8
    assert lut_mod.estimate_ms(times[:3], runs=3, threads=2) == 7.0


def test_lut_above_one_thread_keeps_each_units_fastest_pass(tmp_path, monkeypatch):
    """Every unit is built once and timed in UNIT_PASSES passes over the whole list; its entry is its
    fastest pass (minus the call overhead)."""
    units = space_units(TINY, SIZE)[:3]
    built, passes = [], {}
    monkeypatch.setattr(lut_mod, "unit_runner", lambda u, *a: built.append(u.key) or _FakeRunner())
    monkeypatch.setattr(lut_mod, "overhead_runner", lambda *a: _FakeRunner())

    def measure(fn, threads, runs, warmup, clock, rounds=1):
        if fn not in passes:
            passes[fn] = []
        passes[fn].append(None)
        return 0.5 if len(passes) == 1 else [3.0, 1.0, 2.0][len(passes[fn]) - 1]  # overhead first, then units

    monkeypatch.setattr(lut_mod, "_measure", measure)
    table = build_lut(units, tmp_path / "t2.json", threads=2, runs=1, warmup=0, progress=False)
    assert sorted(built) == sorted(u.key for u in units)  # each unit's session built once
    assert lut_mod.UNIT_PASSES == 3 and all(e["ms"] == 0.5 for e in table.entries.values())  # min(3,1,2) - 0.5


def test_shared_onnxruntime_pool_serves_every_later_session(tmp_path):
    """``share_thread_pool`` (in a process of its own: one pool per process): later sessions run on it, one at
    another thread count is refused in one line, a session made before keeps working."""
    import subprocess
    import sys

    code = """
import numpy as np, onnx
from onnx import TensorProto, helper
from cpubone.engines.base import EngineError
from cpubone.engines.onnxruntime import ort_session, share_thread_pool
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
onnx.save(m, "relu.onnx")
import sys
if sys.argv[1] == "fresh":
    before = None
else:
    before = ort_session("relu.onnx", 1)
x = -np.ones((1, 4), np.float32)
assert share_thread_pool(2) and share_thread_pool(2) and not share_thread_pool(3)
assert (ort_session("relu.onnx", 2).run(None, {"x": x})[0] == 0).all()
try:
    ort_session("relu.onnx", 1)
    raise SystemExit("a 1-thread session was accepted")
except EngineError as e:
    assert "shared pool of 2 thread(s)" in str(e) and "\\n" not in str(e), e
assert before is None or (before.run(None, {"x": x})[0] == 0).all()
print("ok")
"""
    for mode in ("fresh", "late"):
        out = subprocess.run([sys.executable, "-c", code, mode], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (mode, out.stderr[-2000:])


def test_design_then_deploy_end_to_end_on_a_tiny_budget(tmp_path):
    """A design searched in a table of ONNX Runtime fp32 goes through `cpubone deploy DESIGN.json --engine
    onnxruntime --precision fp32`: the deployed file is that engine's, runs the design at its size, and
    `design predict` reads the same table for it (the latency ratio itself is benchmarks/design_deploy.py's)."""
    units = released_units(SIZE) + space_units(TINY, SIZE)
    path = tmp_path / "ort.json"
    table = build_lut(space_units(TINY, SIZE), path, runs=2, warmup=1, progress=False, sizes=[SIZE])
    assert units
    from cpubone.models import save_config

    # a design of the table's space, as `design search` writes it (the search itself: test_cli_search_*)
    design = save_config(dict(name="tiny_design", widths=[8, 16, 32, 48, 64], depths=[0, 1, 2, 1, 1],
                              head_widths=[32, 40], input_size=[64, 64]), tmp_path / "design.json")
    predicted = predict(str(design), table).latency_ms
    out = tmp_path / "deployed"
    assert main(["deploy", str(design), "--engine", "onnxruntime", "--precision", "fp32", "--runs", "3",
                 "-o", str(out)]) == 0
    meta = json.loads((out / "model.onnx.json").read_text())
    assert json.loads(meta["cpubone.engine"]) == "onnxruntime" and json.loads(meta["cpubone.precision"]) == "fp32"
    assert json.loads(meta["input_size"]) == [3, 64, 64]
    from cpubone.engines import load_artifact

    import numpy as np

    assert load_artifact(out / "model.onnx")(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 1000)
    assert predict(str(design), load_lut(path)).latency_ms == pytest.approx(predicted, rel=1e-6) and predicted > 0
