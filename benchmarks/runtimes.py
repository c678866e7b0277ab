"""Every CPU runtime x precision side by side in one run: B0's inference form, timm's export, the peers.

Batch 1, 224x224, pinned threads (default 1), all candidates timed in the same interleaved rounds so the
ratios hold on a shared machine. Prints (and with --json writes):

1. B0 (our inference form) in every installed engine x precision, as a ratio to ONNX Runtime fp32; the
   int8 engines are calibrated on scikit-image photos (random weights: timing only);
2. low-precision agreement on a *trained* model: cpubone_nano trained here on scikit-learn's digits (32 px),
   each low-precision path vs the fp32 training form on the held-out digits (top-1 agreement, accuracy);
3. our inference form / timm's ``cpubone_b0_bfrobust`` exported the same way, per engine (fp32);
4. the paper's comparison in each engine: CPUBone-B0 vs MobileNetV3-L, FasterNet-T0, MobileNetV4-S (fp32);
5. ExecuTorch's XNNPACK partition count for B0 and MobileNetV3-L (and the ops left to portable kernels).

    python benchmarks/runtimes.py [--runs 20] [--rounds 4] [--engines all] [--no-peers] [--json out.json]

LiteRT's converter does not co-install with the main environment: its run is in ``.venv-mobile``
(``make mobile``), e.g. ``--engines onnxruntime,litert --precisions fp32,int8`` (docs/deployment.md).

Goals (issue 11): fastest verified path <= 0.45x ONNX Runtime fp32 with >= 99% top-1 agreement on a trained
model; best fp32 engine <= 0.9x.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cpubone.engines.machine import machine_info  # noqa: E402
from cpubone.preprocess import PreprocessConfig, preprocess  # noqa: E402
from cpubone.engines import (EngineError, available_engines, engine_class, engine_names, get_engine,  # noqa: E402
                             inference_form, parse_engines, parse_precisions)
from cpubone.engines.timing import time_interleaved  # noqa: E402
from cpubone.engines.verify import agreement, sample_photos, torch_reference  # noqa: E402
from cpubone.models import create_model  # noqa: E402

SHAPE = (1, 3, 224, 224)
PEERS = ("mobilenetv3_large_100", "fasternet_t0", "mobilenetv4_conv_small")
LOW = ("bf16", "int8")


def photo_calibration(size: int = 224, n: int = 16) -> List[np.ndarray]:
    """Calibration samples for the random-weight timing runs: photos, flipped and shifted."""
    cfg = PreprocessConfig(input_size=(3, size, size))
    photos = [preprocess(img, cfg, name)[None] for name, img in sample_photos(
        ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry", "hubble_deep_field"))]
    out = photos + [p[..., ::-1].copy() for p in photos]
    return out[:n]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name).eval()


def timm_b0() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("cpubone_b0_bfrobust").eval()


def prepare_all(jobs: List[Tuple[str, str, str, torch.nn.Module]], calib, threads: int, workdir: Path,
                log) -> Dict[Tuple[str, str, str], object]:
    runners = {}
    for model_name, engine, precision, model in jobs:
        if precision not in engine_class(engine).precisions:
            continue
        t0 = time.perf_counter()
        try:
            runners[(model_name, engine, precision)] = get_engine(engine).prepare(
                model, SHAPE, precision, threads, calib=calib,
                workdir=workdir / f"{model_name}-{engine}-{precision}")
            log(f"  prepared {model_name:24s} {engine:11s} {precision:5s} in {time.perf_counter() - t0:5.1f} s")
        except EngineError as e:
            log(f"  skipped  {model_name:24s} {engine:11s} {precision:5s}: {str(e)[:120]}")
    return runners


def trained_digits_nano(epochs: int = 5):
    """cpubone_nano trained on scikit-learn's digits at 32 px: (model, val x, val y, calibration samples)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from PIL import Image

    d = load_digits()
    imgs = (d.images / 16.0 * 255).round().astype(np.uint8)
    cfg = PreprocessConfig(input_size=(3, 32, 32), crop_pct=1.0)
    x = np.stack([preprocess(Image.fromarray(i, "L").resize((32, 32), Image.BICUBIC), cfg) for i in imgs])
    tr, va = train_test_split(np.arange(len(x)), test_size=0.2, random_state=0, stratify=d.target)
    torch.manual_seed(0)
    model = create_model("cpubone_nano", num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(d.target[tr])
    steps = epochs * -(-len(tr) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    calib = [x[tr][i:i + 1] for i in range(64)]
    return model, x[va], d.target[va], calib


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="all", help="comma-separated engines (default: every installed one)")
    p.add_argument("--precisions", default="fp32,bf16,int8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--no-peers", action="store_true", help="skip the peer comparison and timm's export")
    p.add_argument("--peer-engines", default=None,
                   help="engines for the peers and timm's export (default: all but compile, whose "
                        "AOTInductor build takes minutes per model)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    engines = parse_engines(args.engines)
    precisions = parse_precisions(args.precisions)
    peer_engines = parse_engines(args.peer_engines) if args.peer_engines else [e for e in engines if e != "compile"]
    machine = machine_info()
    log(machine.header(args.threads))
    missing = [e for e in engine_names() if e not in available_engines()]
    if missing:
        log("not installed (skipped): " + ", ".join(missing))
    engines = [e for e in engines if e in available_engines()]
    peer_engines = [e for e in peer_engines if e in engines]

    work = Path(tempfile.mkdtemp(prefix="cpubone-runtimes-"))
    atexit.register(shutil.rmtree, work, True)  # the artifacts of one run take ~0.5 GB
    calib = photo_calibration()
    b0 = inference_form(build("cpubone_b0"))
    jobs = [("cpubone_b0", e, pr, b0) for e in engines for pr in precisions]
    if not args.no_peers:
        tb0 = timm_b0()
        jobs += [("timm cpubone_b0", e, "fp32", tb0) for e in peer_engines]
        for peer in PEERS:
            m = inference_form(build(peer))
            jobs += [(peer, e, "fp32", m) for e in peer_engines]
    log(f"preparing {len(jobs)} candidates")
    runners = prepare_all(jobs, calib, args.threads, work, log)

    log(f"timing {len(runners)} runners: {args.runs} runs in {args.rounds} interleaved rounds")
    calls = {"|".join(k): r.timer() for k, r in runners.items()}
    lat = time_interleaved(calls, args.runs, 3, args.rounds, args.threads)
    ms = {k: lat["|".join(k)].median_ms for k in runners}

    results = dict(machine=machine.to_dict(), threads=args.threads, runs=args.runs, rounds=args.rounds, b0=[],
                   agreement=[], timm=[], peers=[], partitions={})
    ref = ms.get(("cpubone_b0", "onnxruntime", "fp32"))
    log("\n## B0 inference form, every engine x precision (ratio to ONNX Runtime fp32)\n")
    log("| engine | precision | median ms | ratio |\n|---|---|---|---|")
    for (model, e, pr), v in ms.items():
        if model == "cpubone_b0":
            ratio = v / ref if ref else float("nan")
            results["b0"].append(dict(engine=e, precision=pr, median_ms=v, ratio=ratio))
            log(f"| {e} | {pr} | {v:.2f} | {ratio:.2f} |")

    log("\n## Low precision on a trained model (cpubone_nano trained on digits, 32 px; held-out digits)\n")
    model, vx, vy, dcal = trained_digits_nano()
    form = inference_form(model)
    refl = torch_reference(model)(vx)
    log(f"training form: {(refl.argmax(-1) == vy).mean():.1%} top-1 on {len(vy)} held-out digits")
    log("| engine | precision | top-1 agreement with fp32 | accuracy % | drop (points) |\n|---|---|---|---|---|")
    for e in engines:
        for pr in precisions:
            if pr == "fp32" or pr not in engine_class(e).precisions:
                continue
            try:
                r = get_engine(e).prepare(form, (1, *vx.shape[1:]), pr, args.threads, calib=dcal,
                                          workdir=work / f"digits-{e}-{pr}")
            except EngineError as err:
                log(f"| {e} | {pr} | skipped: {str(err)[:80]} | | |")
                continue
            a = agreement(r(vx), refl, vy)
            results["agreement"].append(dict(engine=e, precision=pr, **a.to_dict()))
            log(f"| {e} | {pr} | {a.top1_agreement:.1%} | {a.accuracy:.1f} | {a.accuracy_drop:+.2f} |")

    if not args.no_peers:
        log("\n## Our inference form / timm's export, per engine (fp32)\n")
        log("| engine | ours ms | timm ms | ours / timm |\n|---|---|---|---|")
        for e in peer_engines:
            a, b = ms.get(("cpubone_b0", e, "fp32")), ms.get(("timm cpubone_b0", e, "fp32"))
            if a and b:
                results["timm"].append(dict(engine=e, ours_ms=a, timm_ms=b, ratio=a / b))
                log(f"| {e} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
        log("\n## The paper's comparison in each engine (fp32, median ms; rank by latency)\n")
        names = ["cpubone_b0", *PEERS]
        log("| engine | " + " | ".join(names) + " | ranking |\n|---" * 1 + "|---" * (len(names) + 1) + "|")
        for e in peer_engines:
            row = {n: ms.get((n, e, "fp32")) for n in names}
            order = sorted((v, n) for n, v in row.items() if v)
            results["peers"].append(dict(engine=e, **{n: v for n, v in row.items()}))
            log(f"| {e} | " + " | ".join(f"{row[n]:.2f}" if row[n] else "-" for n in names) + " | "
                + " < ".join(n.replace("_large_100", "").replace("_conv_small", "") for _, n in order) + " |")

    if "executorch" in engines:
        log("\n## ExecuTorch XNNPACK partitions\n")
        for key in (("cpubone_b0", "executorch", "fp32"), ("mobilenetv3_large_100", "executorch", "fp32"),
                    ("cpubone_b0", "executorch", "int8")):
            if key in runners:
                info = runners[key].describe()
                results["partitions"]["|".join(key)] = dict(partitions=info["partitions"],
                                                             portable_ops=info["portable_ops"])
                log(f"- {key[0]} {key[2]}: {info['partitions']} partitions; portable ops: {info['portable_ops']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
