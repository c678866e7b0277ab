"""The downstream networks in every engine (``cpubone.downstream.bench.bench_engines``): one row per network x
engine x precision, fp32 verified against eager PyTorch, an engine that fails or disagrees is reported with
its reason and not timed, ratios to the network's first engine x precision."""
import numpy as np
import pytest

from cpubone.downstream.bench import TASKS, EngineRow, bench_engines, build_network, inference_network
from cpubone.engines import ENGINES, EngineError, engine_class, get_engine
from cpubone.engines.base import Engine, Runner

SMALL = dict(size=64, runs=2, warmup=1, rounds=2, fpn_channels=16, channels=8, detect_classes=3, segment_classes=4,
             photos=1)


class _Broken(Engine):
    """A converter that cannot take the network."""

    name = "broken"
    precisions = ("fp32",)

    def _prepare(self, model, input_shape, precision, threads, calib, workdir):
        raise RuntimeError("cannot convert aten::foo\nthe converter's traceback")


class _Wrong(Engine):
    """Runs, but its fp32 outputs are off by 1."""

    name = "wrong"
    precisions = ("fp32",)

    def _prepare(self, model, input_shape, precision, threads, calib, workdir):
        run = get_engine("eager").prepare(model, input_shape, "fp32", threads).run_one
        return Runner(self.name, precision, threads, input_shape, lambda x: run(x) + 1.0)


@pytest.fixture
def fake_engines(monkeypatch):
    monkeypatch.setitem(ENGINES, "broken", _Broken)
    monkeypatch.setitem(ENGINES, "wrong", _Wrong)


def _available(*names):
    return [n for n in names if engine_class(n).available()]


def test_detection_network_in_every_engine(fake_engines):
    engines = _available("onnxruntime", "openvino", "ncnn") + ["eager", "broken", "wrong"]
    res = bench_engines(["cpubone_nano"], ["detect"], engines, "fp32", **SMALL)
    # every engine that took the network, in the order asked; the two fakes not timed
    assert [(r.engine, r.precision) for r in res.rows] == [(e, "fp32") for e in engines if e not in ("broken", "wrong")]
    first = res.rows[0]
    assert (first.engine, first.precision, first.ratio) == (engines[0], "fp32", 1.0)
    for r in res.rows:
        assert r.task == "detect" and r.backbone == "cpubone_nano" and r.gmacs > 0
        assert r.ratio_to == f"{engines[0]} fp32" and r.ratio == pytest.approx(r.median_ms / first.median_ms)
        assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms
        assert r.verified and r.rel_diff <= engine_class(r.engine).tolerance  # fp32 within the engine's tolerance
    skips = {s.engine: s for s in res.skipped if s.engine in ("broken", "wrong")}
    assert skips["broken"].status == "failed"
    assert skips["broken"].reason == "RuntimeError: cannot convert aten::foo"  # one line
    assert skips["wrong"].status == "refused" and skips["wrong"].rel_diff > 0.1
    assert "tolerance" in skips["wrong"].reason and "\n" not in skips["wrong"].reason
    d = res.to_dict()
    assert d["size"] == 64 and d["machine"]["cpu"] and len(d["rows"]) == len(res.rows)
    assert d["skipped"][0]["reason"] and set(d["tasks"]) == {"detect"}


def test_segmentation_rows_ratios_and_low_precision():
    res = bench_engines(["cpubone_nano", "mobilenetv3_large_100"], ["segment"], "onnxruntime,eager", "fp32,bf16",
                        **SMALL)
    assert not res.skipped  # ONNX Runtime runs no bf16: not asked of it, not a failure
    assert [(r.backbone, r.engine, r.precision) for r in res.rows] == [
        (b, e, p) for b in ("cpubone_nano", "mobilenetv3_large_100")
        for e, p in (("onnxruntime", "fp32"), ("eager", "fp32"), ("eager", "bf16"))]
    for backbone in ("cpubone_nano", "mobilenetv3_large_100"):  # each network against its own first engine
        rows = [r for r in res.rows if r.backbone == backbone]
        assert rows[0].ratio == 1.0 and all(r.ratio == pytest.approx(r.median_ms / rows[0].median_ms) for r in rows)
    for r in res.rows:
        assert isinstance(r, EngineRow) and r.task == "segment"
        # fp32 verified; bf16's difference is reported (bf16 keeps 8 bits of mantissa), not judged
        assert r.verified == (r.precision == "fp32")
        assert (r.rel_diff > 1e-4) if r.precision == "bf16" else (r.rel_diff <= 1e-4)


def test_networks_and_their_inference_form():
    import torch

    for task in TASKS:
        net, cfg = build_network(task, "cpubone_nano", 64, num_classes=3, fpn_channels=16, channels=8)
        form = inference_network(net, "cpubone_nano")
        assert form is not net and not any(isinstance(m, torch.nn.BatchNorm2d) for m in form.modules())
        x = torch.rand(1, *cfg.input_size)
        with torch.no_grad():
            np.testing.assert_allclose(form(x).numpy(), net(x).numpy(), atol=1e-4)
    # detection is fed normalised images, segmentation [0, 1] images (it normalises inside)
    assert build_network("detect", "cpubone_nano", 64)[1].mean != (0.0, 0.0, 0.0)
    assert build_network("segment", "cpubone_nano", 64)[1].mean == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=["classify"]), "unknown task 'classify'"),
    (dict(engines="onnxruntime,tensorrt"), "unknown engine 'tensorrt'"),
    (dict(precisions="fp32,fp8"), "unknown precision 'fp8'"),
    (dict(rounds=0), "rounds=0"),
    (dict(backbones=["no_such_net"]), "no_such_net"),
])
def test_bad_arguments_fail_before_any_work(kwargs, match):
    args = dict(backbones=["cpubone_nano"], size=64)
    args.update(kwargs)
    with pytest.raises((ValueError, EngineError), match=match):
        bench_engines(**args)


def test_cli_bench_in_engines(capsys):
    import json

    from cpubone.cli import main

    args = ["segment", "bench", "--backbones", "cpubone_nano", "--size", "64", "--runs", "1", "--warmup", "0",
            "--num-classes", "4"]
    assert main(args + ["--engines", "eager", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["engine"], r["precision"], r["verified"]) for r in out["rows"]] == [("eager", "fp32", True)]
    assert out["tasks"] == {"segment": TASKS["segment"]} and out["machine"]["cpu"]
    assert main(args + ["--engines", "onnxruntime,tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("cpubone segment: error: unknown engine 'tensorrt': expected one of "
                   "onnxruntime, openvino, executorch, litert, ncnn, eager, compile")


def test_backbone_table_eager_and_onnx():
    from cpubone.downstream.bench import bench_detection, bench_segmentation

    seg = bench_segmentation(["cpubone_nano"], size=64, runs=1, warmup=0, num_classes=3, fpn_channels=16, channels=8)
    det = bench_detection(["cpubone_nano"], size=64, runs=1, warmup=0, num_classes=3, fpn_channels=16)
    for res, eager in ((seg, "eager_ms"), (det, "net_eager_ms")):
        (row,) = res["rows"]
        assert row["backbone"] == "cpubone_nano" and row[eager] > 0 and row["ort_ms"] > 0 and row["GMACs"] > 0
        assert row["ort_max_abs_diff"] < 1e-4  # ONNX Runtime against eager on a [0, 1] image
    assert det["rows"][0]["e2e_eager_ms"] > 0
