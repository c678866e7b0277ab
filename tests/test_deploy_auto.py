"""``cpubone deploy``: the fastest verified engine x precision is chosen and written with its metadata."""
import json
from pathlib import Path
import subprocess
import sys
import time

import pytest

from cpubone.deploy.auto import Candidate, deploy_model, judge, labelled_images, pick_fastest
from cpubone.engines import ENGINES, Engine, Runner, register_engine
from cpubone.engines.timing import summarize_times
from cpubone.engines.verify import Agreement, torch_reference


def _cand(engine, ms, agree=1.0, drop=None):
    c = Candidate(engine, "fp32")
    c.agreement = Agreement(100, agree, None if drop is None else 90 - drop, None if drop is None else 90.0)
    c.latency = summarize_times([ms], 0, 1, engine)
    return c


def test_judge_and_pick_fastest():
    cands = [_cand("a", 5.0), _cand("b", 2.0, agree=0.95), _cand("c", 3.0), _cand("d", 1.0, agree=1.0, drop=0.8)]
    for c in cands:
        judge(c, min_agreement=0.99, max_drop=0.5)
    assert [c.status for c in cands] == ["kept", "rejected", "kept", "rejected"]
    assert "top-1 agreement 95.0%" in cands[1].reason and "accuracy drop 0.80 points" in cands[3].reason
    assert pick_fastest(cands).engine == "c"
    assert pick_fastest([cands[1]]) is None


class _Fake(Engine):
    """Runs the inference form in PyTorch after a known delay; ``wrong`` ones shuffle the classes."""

    suffix = ".fake"
    torch_free = True
    precisions = ("fp32", "int8")
    delay = 0.0
    wrong = False
    tolerance = 1e-4

    def _prepare(self, model, input_shape, precision, threads, calib, workdir):
        ref = torch_reference(model)
        path = workdir / "model.fake"
        path.write_text(self.name)
        delay, wrong = self.delay, self.wrong

        def run(x):
            time.sleep(delay)
            out = ref(x)
            return out[:, ::-1].copy() if wrong else out

        return Runner(self.name, precision, threads, input_shape, run, artifact=path, files=[path])


def _fake(name, delay, wrong=False, fp32_wrong=False):
    return type(name, (_Fake,), dict(name=name, title=name, delay=delay, wrong=wrong))


@pytest.fixture
def fakes(monkeypatch):
    saved = dict(ENGINES)
    for cls in (_fake("fast_wrong", 0.0, wrong=True), _fake("slow", 0.03), _fake("mid", 0.01)):
        register_engine(cls)
    yield
    ENGINES.clear()
    ENGINES.update(saved)


def test_deploy_picks_the_fastest_that_agrees(trained_nano, digits_folder, fakes, tmp_path):
    model, _, _ = trained_nano
    out = tmp_path / "out"
    res = deploy_model(model, out, calib_dir=digits_folder / "train", val_dir=digits_folder / "val",
                       engines=["fast_wrong", "slow", "mid"], precisions=["fp32", "int8"], calib_count=8,
                       val_count=60, runs=6, warmup=1, rounds=2, machine="test machine", log=lambda s: None)
    by = {c.label: c for c in res.candidates}
    assert by["fast_wrong fp32"].status == "rejected" and "disagrees with PyTorch" in by["fast_wrong fp32"].reason
    assert by["fast_wrong int8"].status == "rejected" and "top-1 agreement" in by["fast_wrong int8"].reason
    assert res.chosen.engine == "mid" and by["slow fp32"].status == "kept"
    assert by["mid fp32"].agreement.accuracy is not None  # the val folder is labelled by class folders
    assert res.artifact.endswith("model.fake") and (out / "model.fake").read_text() == "mid"
    meta = json.loads((out / "model.fake.json").read_text())
    assert json.loads(meta["cpubone.labels"]) == [str(i) for i in range(10)]
    assert json.loads(meta["input_size"]) == [3, 32, 32] and json.loads(meta["cpubone.engine"]) == "mid"
    report = (out / "deploy.md").read_text()
    assert "test machine" in report and "cpubone predict " in report and "model.fake IMAGE..." in report and (out / "deploy.png").is_file()
    assert not (out / ".candidates").exists()


def test_deploy_torch_free_chooses_among_files_that_run_without_torch(trained_nano, digits_folder, fakes, tmp_path):
    """Each candidate says what the device installs; --torch-free leaves out a faster file that needs torch."""
    model, _, _ = trained_nano
    register_engine(type("fast_torch", (_Fake,), dict(name="fast_torch", title="fast_torch", delay=0.0,
                                                       torch_free=False, load_packages=("torch",))))
    register_engine(type("slow_free", (_Fake,), dict(name="slow_free", title="slow_free", delay=0.02,
                                                      load_packages=("onnxruntime",))))
    kw = dict(val_dir=digits_folder / "val", engines=["fast_torch", "slow_free"], precisions=["fp32"], val_count=20,
              runs=4, warmup=1, rounds=2, log=lambda s: None)
    res = deploy_model(model, tmp_path / "any", **kw)
    by = {c.engine: c for c in res.candidates}
    assert res.chosen.engine == "fast_torch" and by["fast_torch"].device["torch_free"] is False
    assert by["fast_torch"].device["packages"] == ["numpy", "pillow", "rich", "torch"]
    assert by["slow_free"].device["torch_free"] is True and "onnxruntime" in by["slow_free"].device["packages"]
    assert by["slow_free"].device["installed_mb"] < by["fast_torch"].device["installed_mb"]  # measured here
    res = deploy_model(model, tmp_path / "free", torch_free=True, **kw)
    by = {c.engine: c for c in res.candidates}
    assert res.chosen.engine == "slow_free"
    assert by["fast_torch"].status == "skipped" and "needs torch on the device" in by["fast_torch"].reason
    report = (tmp_path / "free" / "deploy.md").read_text()
    assert "runs without torch" in report and "numpy pillow rich onnxruntime" in report
    assert json.loads((tmp_path / "free" / "deploy.json").read_text())["candidates"][1]["device"]["torch_free"]


def test_deploy_errors(trained_nano, fakes, tmp_path):
    model, _, _ = trained_nano
    with pytest.raises(FileNotFoundError, match="calibration folder not found: nowhere"):
        deploy_model(model, tmp_path / "o", calib_dir="nowhere")
    with pytest.raises(ValueError, match=r"no engine x precision passed verification \(fast_wrong fp32: .*disagrees"):
        deploy_model(model, tmp_path / "o", engines=["fast_wrong"], precisions=["fp32"], log=lambda s: None)


def test_labelled_images(digits_folder, tmp_path):
    files, labels = labelled_images(digits_folder / "val", None, limit=20)
    assert len(files) == 20 and labels == [int(f.parent.name) for f in files] and len(set(labels)) == 10
    files, labels = labelled_images(digits_folder / "val" / "3")
    assert labels is None


def test_deploy_real_engines_then_predict_without_torch(trained_nano, digits_folder, tmp_path):
    """The digits model through the installed runtimes: int8 candidates are judged on the labelled val
    folder, the chosen file runs in ``cpubone predict`` without torch and gives the training form's class."""
    from cpubone.engines import available_engines

    model, vx, vy = trained_nano
    engines = [e for e in ("onnxruntime", "openvino", "ncnn") if e in available_engines()]
    out = tmp_path / "deployed"
    res = deploy_model(model, out, calib_dir=digits_folder / "train", val_dir=digits_folder / "val",
                       engines=engines, precisions=["fp32", "int8"], calib_count=32, val_count=120, runs=4,
                       warmup=1, rounds=2, log=lambda s: None)
    by = {c.label: c for c in res.candidates}
    assert by["onnxruntime fp32"].status == "kept" and by["onnxruntime fp32"].max_abs_diff < 1e-3
    assert by["onnxruntime int8"].status in ("kept", "rejected") and by["onnxruntime int8"].agreement.n == 120
    assert res.chosen.status == "kept" and Path(res.artifact).is_file()
    image = sorted((digits_folder / "val" / "7").iterdir())[0]
    code = ("import sys; sys.modules['torch'] = None\n"
            "from cpubone.cli import main\n"
            f"sys.exit(main(['predict', {res.artifact!r}, {str(image)!r}, '--topk', '1']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    from cpubone.preprocess import preprocess
    from conftest import digits_config

    expected = int(torch_reference(model)(preprocess(image, digits_config())[None]).argmax())
    assert run.stdout.splitlines()[1].split()[-1] == str(expected)  # the class name ('0'..'9')


@pytest.mark.parametrize("args, needle", [
    (["--calib", "nowhere"], "calibration folder not found: nowhere"),
    (["--engine", "tensorrt"], "unknown engine 'tensorrt'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--min-agreement", "0"], "--min-agreement 0.0: a percentage in (0, 100]"),
])
def test_cli_deploy_errors_are_one_line(args, needle, capsys, tmp_path):
    from cpubone.cli import main

    assert main(["deploy", "cpubone_nano", "-o", str(tmp_path / "o")] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpubone deploy: error:") and needle in err and err.count("\n") == 1


def test_cli_engines_lists_every_runtime(capsys):
    from cpubone.cli import main

    assert main(["engines"]) == 0
    out = capsys.readouterr().out
    for name in ENGINES:
        assert name in out
