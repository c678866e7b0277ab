"""cpubone bench --engine A,B --precision P,Q: every combination in one run, one table, ratios to the first."""
import json

import pytest

from cpubone.analysis import bench
from cpubone.cli import main
from cpubone.engines import engine_class


def test_engines_x_precisions_in_one_run(tmp_path):
    engines = "onnxruntime,openvino" if engine_class("openvino").available() else "onnxruntime,eager"
    res = bench.run_bench(["cpubone_nano"], engine=engines, precision="fp32,int8", size=64, runs=2, warmup=1,
                          rounds=2, out_dir=tmp_path, progress=False)
    combos = [(r.engine, r.precision) for r in res.rows]
    first, second = engines.split(",")
    expected = [(first, "fp32"), (first, "int8"), (second, "fp32")] + ([(second, "int8")] if second != "eager" else [])
    assert combos == expected  # eager runs no int8: skipped for it, not an error
    assert res.rows[0].ratio == 1.0
    for r in res.rows:
        assert r.ratio == pytest.approx(r.median_ms / res.rows[0].median_ms) and r.latency.runs == 2
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["precisions"] == ["fp32", "int8"] and [row["engine"] for row in data["rows"]] == [c[0] for c in combos]
    md = (tmp_path / "bench.md").read_text()
    assert "| model | engine | precision | ratio |" in md and "int8 calibrated on scikit-image photos" in md


@pytest.mark.parametrize("args, needle", [
    (["--engine", "tensorrt"], "unknown engine 'tensorrt'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--precision", "bf16"], "precision 'bf16': none of the engines onnxruntime runs it"),
])
def test_cli_engine_precision_errors(args, needle, capsys, tmp_path):
    assert main(["bench", "cpubone_nano", "--out", str(tmp_path), "--no-progress"] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpubone bench: error:") and needle in err and err.count("\n") == 1


def test_cli_missing_runtime_names_the_extra(monkeypatch, capsys, tmp_path):
    cls = engine_class("openvino")
    monkeypatch.setattr(cls, "modules", ("cpubone_no_such_module",))
    assert main(["bench", "cpubone_nano", "--engine", "onnxruntime,openvino", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "engine 'openvino' needs cpubone_no_such_module: pip install 'cpubone[openvino]'" in err
