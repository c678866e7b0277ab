"""cpubone bench: MACpS arithmetic, ONNX export cache, engine agreement, report files, CLI errors."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cpubone import create_model
from cpubone.analysis import bench
from cpubone import engines
from cpubone.engines.onnxruntime import ort_session
from cpubone.engines.timing import LatencyResult, summarize_times, time_callable
from cpubone.engines.machine import isa_features, machine_info
from cpubone.models.macs import count_macs, count_params
from cpubone.results import pareto_front
from cpubone.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPUBONE_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def test_macps_arithmetic():
    lat = LatencyResult(median_ms=10.0, p10_ms=9.0, p90_ms=11.0, mean_ms=10.0, min_ms=9.0, runs=5, warmup=1,
                        threads=1, engine="x")
    assert lat.macps(500_000_000) == pytest.approx(50.0)  # 0.5 GMAC in 10 ms


def test_interleaved_times_are_summarized_like_one_run():
    calls = []
    times = []
    time_callable(lambda: calls.append(1), runs=4, warmup=2, times=times)
    time_callable(lambda: calls.append(1), runs=3, warmup=0, times=times)
    assert len(calls) == 9 and len(times) == 7
    res = summarize_times([1.0, 2.0, 3.0, 4.0, 10.0], warmup=1, threads=2, engine="x")
    assert (res.median_ms, res.min_ms, res.mean_ms, res.runs) == (3.0, 1.0, 4.0, 5)
    assert res.p10_ms == pytest.approx(1.4) and res.p90_ms == pytest.approx(7.6)


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("CPUBONE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engines.cache_dir() == tmp_path / "xdg" / "cpubone"


def test_isa_features_from_cpuinfo():
    x86 = "processor : 0\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni\n"
    assert isa_features(x86, "x86_64") == ["AVX2", "FMA", "AVX-512", "AVX512-VNNI"]
    arm = "processor : 0\nFeatures\t: fp asimd evtstrm asimddp\n"
    assert isa_features(arm, "aarch64") == ["NEON", "DOTPROD"]
    assert isa_features("", "arm64") == ["NEON"]
    info = machine_info()
    assert info.cpu and info.usable_cpus >= 1 and "torch" in info.versions


def test_published_top1_sources():
    assert bench.published_top1("cpubone_b0")[0] == 77.6
    top1, src = bench.published_top1("repvit_m1_1")
    assert top1 == 79.4 and "RepViT" in src
    assert bench.published_top1("resnet18") == (None, "")
    # names mean what create_model builds (one resolver): timm's port is a peer, not the authors' release
    assert bench.published_top1("cpubone_b0.r224_in1k")[0] == 77.6
    assert bench.published_top1("timm/cpubone_nano") == (None, "")
    with pytest.raises(ValueError, match="unknown model 'timm/cpubone_b0': timm has no model 'cpubone_b0'"):
        engines.check_run_args(["cpubone_nano", "timm/cpubone_b0"])
    # every default model has a published figure to plot
    assert all(bench.published_top1(m)[0] is not None for m in bench.DEFAULT_MODELS)


def test_pareto_front():
    pts = [(5.0, 75.0), (3.0, 72.0), (4.0, 71.0), (10.0, 80.0), (12.0, 79.0)]
    assert pareto_front(pts) == [(3.0, 72.0), (5.0, 75.0), (10.0, 80.0)]


def test_reparameterizable_peers_in_deploy_form():
    model, deployed = bench.build_model("repvit_m1_1")
    assert deployed
    # the train-time RepVGG depthwise branches (RepVggDw) are folded into plain convs
    assert "RepVggDw" in {type(m).__name__ for m in create_model("repvit_m1_1").modules()}
    assert "RepVggDw" not in {type(m).__name__ for m in model.modules()}
    _, deployed = bench.build_model("mobilenetv3_large_100")
    assert not deployed
    model, deployed = bench.build_model("cpubone_nano")  # CPUBone: its inference form (cpubone.deploy)
    assert deployed and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_engine_artifact_cached_and_matches_pytorch():
    model, _ = bench.build_model("cpubone_nano")
    runner = bench.prepare_runner("cpubone_nano", model, "onnxruntime", "fp32", 1, 64)
    path = engines.get_engine("onnxruntime").cache_path(bench.cache_key("cpubone_nano"), (1, 3, 64, 64), "fp32")
    assert path.is_file() and path.parent.parent == engines.cache_dir() and not runner.info.get("cached")
    mtime = path.stat().st_mtime_ns
    # a fresh build is the same seeded network, so the cached file stands for it
    again, _ = bench.build_model("cpubone_nano")
    cached = bench.prepare_runner("cpubone_nano", again, "onnxruntime", "fp32", 1, 64)
    assert cached.info.get("cached") and cached.artifact == path and path.stat().st_mtime_ns == mtime
    assert bench.prepare_runner("cpubone_nano", again, "onnxruntime", "fp32", 1, 96).artifact != path
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = again(x).numpy()
    out = ort_session(path).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(cached(x.numpy()), ref, rtol=1e-3, atol=1e-4)


def test_bench_rows_and_reports(tmp_path):
    out = tmp_path / "out"
    res = bench.run_bench(["cpubone_nano", "mobilenetv3_large_100"], size=64, runs=3, warmup=1, out_dir=out,
                          progress=False)
    assert [r.model for r in res.rows] == ["cpubone_nano", "mobilenetv3_large_100"]
    nano = res.rows[0]
    model = create_model("cpubone_nano")  # timed in its inference form, counted as released
    assert nano.macs == count_macs(model, 64).total and nano.params == count_params(model)
    assert nano.deploy_form
    assert nano.p10_ms <= nano.median_ms <= nano.p90_ms
    assert nano.gmacps == pytest.approx(nano.macs / (nano.median_ms * 1e-3) / 1e9)
    assert nano.peak_pct == pytest.approx(100 * nano.gmacps / res.peak.gmacps)
    assert "MatMul 512x512x512" in res.peak.method and res.peak.threads == 1
    assert res.peak.gmacps == pytest.approx(512 ** 3 / (res.peak.latency.median_ms * 1e-3) / 1e9)
    # 3 runs in (at most) 3 interleaved rounds: every timed call is in the statistics
    assert nano.latency.runs == 3 and res.rounds == 3
    assert nano.family == "CPUBone" and res.rows[1].family == "peer" and nano.top1 == 72.67

    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["cpubone_nano", "mobilenetv3_large_100"]
    assert float(rows[0]["median_ms"]) == pytest.approx(nano.median_ms) and int(rows[0]["macs"]) == nano.macs
    data = json.loads((out / "bench.json").read_text())
    assert data["batch_size"] == 1 and data["threads"] == 1 and data["size"] == 64
    assert data["machine"]["cpu"] == res.machine.cpu and data["gemm_peak"]["gmacps"] > 0
    assert len(data["rows"]) == 2 and data["rows"][1]["top1_source"]
    md = (out / "bench.md").read_text()
    assert "| model |" in md and "mobilenetv3_large_100" in md and res.machine.cpu in md
    with Image.open(out / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_eager_engine_channels_last(tmp_path):
    res = bench.run_bench(["cpubone_nano"], engine="eager", channels_last=True, size=64, runs=2, warmup=1,
                          out_dir=None, progress=False)
    assert res.engine == "eager-cl" and res.peak.engine == "eager" and res.rows[0].gmacps > 0
    assert res.files == {}


def test_cli_bench_writes_reports(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["bench", "cpubone_nano", "--size", "64", "--runs", "2", "--warmup", "1", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"bench.csv", "bench.json", "bench.md", "bench.png"}
    assert "cpubone_nano" in capsys.readouterr().out


def test_cli_bench_without_matplotlib_writes_everything_but_the_plot(tmp_path, capsys, monkeypatch):
    """The plot is the only thing matplotlib is needed for: without it the figures are still printed and
    written, and one line says why there is no bench.png (the same for profile's and blocks' reports)."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "cli"
    assert main(["bench", "cpubone_nano", "--size", "64", "--runs", "2", "--warmup", "1", "--out", str(out),
                 "--no-progress"]) == 0
    assert {p.name for p in out.iterdir()} == {"bench.csv", "bench.json", "bench.md"}
    printed = capsys.readouterr().out
    assert "cpubone_nano" in printed and "no plot: matplotlib is not installed (pip install 'cpubone[bench]')" in printed
    assert "matplotlib is not installed" in (out / "bench.md").read_text()
    prof = tmp_path / "prof"
    assert main(["profile", "cpubone_nano", "--size", "64", "--runs", "2", "--warmup", "1", "--out", str(prof)]) == 0
    assert sorted(p.suffix for p in prof.iterdir()) == [".csv", ".json", ".md"]
    assert "no plot: matplotlib" in capsys.readouterr().out
    from cpubone.analysis.report import PlotUnavailable, optional_plot, plot_blocks

    assert optional_plot(plot_blocks, [], tmp_path / "b.png", "t") is None
    with pytest.raises(PlotUnavailable, match="pip install 'cpubone\\[bench\\]'"):
        plot_blocks([], tmp_path / "b.png", "t")


@pytest.mark.parametrize("args, needle", [
    (["bench", "no_such_model"], "no_such_model"),
    (["bench", "cpubone_nano", "--size", "16"], "size=16"),
    (["bench", "cpubone_nano", "--threads", "0"], "threads=0"),
    (["bench", "cpubone_nano", "--runs", "0"], "runs=0"),
    (["bench", "cpubone_nano", "--channels-last"], "channels-last"),
])
def test_cli_bench_bad_input(args, needle, capsys, tmp_path):
    assert main(args + ["--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpubone bench: error:") and needle in err


def test_bench_goes_on_when_a_model_does_not_export(tmp_path, capfd):
    """eva02's attention cannot be exported by the TorchScript exporter: one line, and the rest is measured."""
    out = tmp_path / "out"
    code = main(["bench", "eva02_tiny_patch14_224", "test_efficientnet", "--runs", "2", "--warmup", "1",
                 "--rounds", "1", "--out", str(out), "--no-progress"])
    captured = capfd.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1, captured.err[:2000]  # no graph dump from the exporter
    assert errors[0].startswith("cpubone bench: not measured: eva02_tiny_patch14_224: ONNX export failed (")
    assert "graph(" not in captured.out and "FAILED" in captured.out
    data = json.loads((out / "bench.json").read_text())
    assert [r["model"] for r in data["rows"]] == ["test_efficientnet"] and data["rows"][0]["median_ms"] > 0
    assert [f["model"] for f in data["failed"]] == ["eva02_tiny_patch14_224"]
    assert "ONNX export failed" in data["failed"][0]["error"]
    with open(out / "bench.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert rows["eva02_tiny_patch14_224"]["error"] and not rows["eva02_tiny_patch14_224"]["median_ms"]
    md = (out / "bench.md").read_text()
    assert "Not measured (failed)" in md and "eva02_tiny_patch14_224" in md
    # a model without a published top-1 is not silently missing from the plot
    assert "not in bench.png (no published top-1): test_efficientnet" in captured.out
    assert "Not in the plot (no published top-1): test_efficientnet" in md
    assert {p.name for p in out.iterdir()} == {"bench.csv", "bench.json", "bench.md", "bench.png"}


def test_unplotted_models_named_on_the_plot(tmp_path, monkeypatch):
    from cpubone.analysis import report

    texts = []
    real_save = report.save_figure

    def spy(plt, fig, path, rect=None):
        texts.extend(t.get_text() for t in fig.texts)
        return real_save(plt, fig, path, rect)

    monkeypatch.setattr(report, "save_figure", spy)
    rows = [dict(model="a", family="peer", median_ms=2.0, p10_ms=1.9, p90_ms=2.1, top1=70.0),
            dict(model="resnet18", family="peer", median_ms=3.0, p10_ms=2.9, p90_ms=3.1, top1=None)]
    report.plot_pareto(rows, tmp_path / "p.png", "t")
    assert report.unplotted_models(rows) == ["resnet18"]
    assert texts == ["not plotted, no published top-1: resnet18"]


def test_bench_threads_beyond_the_usable_cores(capsys):
    usable = machine_info().usable_cpus
    with pytest.warns(RuntimeWarning, match=f"threads=99: only {usable} core"):
        res = bench.run_bench(["cpubone_nano"], threads=99, size=64, runs=2, warmup=1, out_dir=None, progress=False)
    assert res.threads == usable and res.peak.threads == usable and res.rows[0].latency.threads == usable


def test_cli_bench_threads_warning_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "_prepare", _not_reached)  # stop after the argument checks
    (tmp_path / "file").write_text("x")
    assert main(["bench", "cpubone_nano", "--threads", "99", "--out", str(tmp_path / "file" / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    usable = machine_info().usable_cpus
    assert err[0] == f"cpubone bench: warning: threads=99: only {usable} core(s) usable on this machine; timing with {usable}"
    assert len(err) == 2 and err[1].startswith("cpubone bench: error: cannot write")


def _not_reached(*args, **kwargs):
    raise AssertionError("measured before the output folder was checked")


def test_cli_bench_checks_its_output_folder_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "_prepare", _not_reached)
    (tmp_path / "file").write_text("x")
    assert main(["bench", "cpubone_nano", "--out", str(tmp_path / "file" / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err


def test_cli_bench_prints_results_when_writing_fails_late(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = bench._prepare

    def prepare_then_block(*args, **kwargs):  # the folder turns into a file while the models are timed
        out.write_text("x")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "_prepare", prepare_then_block)
    assert main(["bench", "cpubone_nano", "--size", "64", "--runs", "2", "--warmup", "1", "--out", str(out),
                 "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "cpubone_nano" in captured.out and "GEMM peak" in captured.out
    assert captured.err.startswith("cpubone bench: error: benchmark measured but not written")
    assert captured.err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]  # no partial or temporary files
