"""int8 (static QDQ, per-channel weights) vs fp32 in ONNX Runtime: latency on B0 and top-1 agreement.

Two parts, one run:

1. Latency, batch 1, one thread, 224x224, CPUBone-B0 (weights do not matter for speed): fp32 export vs
   int8 exports with different node groups kept in float (``--exclude`` sets). Goal: <= 0.5x fp32.
2. Agreement on held-out images with a model that has learned something. Default: CPUBone-T0
   fine-tuned here for a few epochs on scikit-learn's handwritten digits (1797 real 8x8 scans,
   upsampled to 64x64 RGB; 70% train / 30% held out), no download needed. With ``--checkpoint`` and
   ``--images DIR`` it uses those weights instead (e.g. timm's pretrained B0) and splits DIR in half:
   calibration / held-out. Reported: top-1 agreement int8 vs fp32, and accuracy of each when labels
   are known.

Calibration images go through the shared eval preprocessing (``cpubone.preprocess``), as in
``cpubone export --int8 --calib DIR``.

    python benchmarks/int8.py [--epochs 6] [--runs 30] [--rounds 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cpubone import create_model
from cpubone.engines import get_engine
from cpubone.engines.onnxruntime import ort_session
from cpubone.engines.timing import time_callable
from cpubone.deploy.export import export_model
from cpubone.engines.onnx_export import read_metadata
from cpubone.engines.verify import sample_photos
from cpubone.preprocess import PreprocessConfig, preprocess
from cpubone.engines.onnx_quantize import quantize_onnx
from cpubone.images import decode_image, list_images

EXCLUDE_SETS = ("", "attention", "first,last", "attention,first,last")


def cpu_name() -> str:
    from cpubone.engines.machine import machine_info

    return machine_info().cpu


def trained_like(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return model.eval()


def photo_calib_dir(root: Path, n: int = 32) -> Path:
    """Calibration folder of crops/flips of scikit-image's photos (real image statistics, no download)."""
    out = root / "photos"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photos = [decode_image(img) for _, img in sample_photos()]
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        s = rng.uniform(0.4, 1.0)
        cw, ch = int(w * s), int(h * s)
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(out / f"{i:03d}.png")
    return out


def latency_part(tmp: Path, runs: int, rounds: int, calib_count: int) -> Dict[str, float]:
    fp32 = tmp / "b0.onnx"
    export_model(trained_like(create_model("cpubone_b0")), fp32, input_size=(224, 224), verify=False)
    calib = photo_calib_dir(tmp)
    files = {"fp32": fp32}
    for ex in EXCLUDE_SETS:
        files[f"int8, float: {ex or 'none'}"] = quantize_onnx(fp32, tmp / f"b0_int8_{len(files)}.onnx", calib,
                                                              exclude=ex, max_images=calib_count)
    times: Dict[str, List[float]] = {k: [] for k in files}
    for _ in range(rounds):
        for k, p in files.items():
            runner = get_engine("onnxruntime", for_load=True).load(p, 1)
            times[k].append(time_callable(runner.timer(), runs, 5, 1, "onnxruntime").median_ms)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nB0 latency, ONNX Runtime, batch 1, 1 thread, 224x224 (median of {rounds} round medians, {runs} runs)")
    for k, v in med.items():
        print(f"  {k:40s} {v:7.2f} ms  {v / med['fp32']:5.2f}x fp32")
    return med


def digits_dataset(root: Path, size: int = 64) -> Tuple[List[Path], List[int], List[Path], List[int]]:
    """scikit-learn's digits as PNG files (train 70% / held-out 30%, stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    imgs = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    idx_tr, idx_te = train_test_split(np.arange(len(imgs)), test_size=0.3, random_state=0, stratify=d.target)
    paths: Dict[int, Path] = {}
    for split, idx in (("train", idx_tr), ("test", idx_te)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in idx:
            p = root / split / f"{i:04d}_{d.target[i]}.png"
            Image.fromarray(imgs[i]).resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(p)
            paths[i] = p
    return ([paths[i] for i in idx_tr], [int(d.target[i]) for i in idx_tr],
            [paths[i] for i in idx_te], [int(d.target[i]) for i in idx_te])


def finetune(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, threads: int) -> nn.Module:
    """A short supervised fine-tune (AdamW + cosine, random shifts), enough to learn the digits."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    torch.set_num_threads(threads)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = create_optimizer_v2(model, "adamw", lr=2e-3, weight_decay=0.05)
    steps_per_epoch = (len(xt) + 63) // 64
    sched = CosineLRScheduler(opt, t_initial=epochs * steps_per_epoch, warmup_t=steps_per_epoch, warmup_lr_init=1e-4,
                              t_in_epochs=False)
    g = torch.Generator().manual_seed(0)
    model.train()
    step = 0
    for ep in range(epochs):
        t0, total = time.time(), 0.0
        for b in torch.randperm(len(xt), generator=g).split(64):
            xb = xt[b]
            dx, dy = torch.randint(-4, 5, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), yt[b], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            total += loss.item() * len(b)
        print(f"  epoch {ep + 1}/{epochs}: loss {total / len(xt):.3f} ({time.time() - t0:.0f} s)")
    return model.eval()


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort_session(path, threads=1)
    return np.concatenate([sess.run(None, {"input": xi[None]})[0] for xi in x])


def shifted_noisy(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """A harder held-out view: random +-6 px shifts and Gaussian noise (smaller top-1 margins)."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(x)
    for i, xi in enumerate(x):
        dy, dx = rng.integers(-6, 7, 2)
        out[i] = np.roll(xi, (dy, dx), axis=(1, 2)) + rng.normal(0, 0.5, xi.shape).astype(np.float32)
    return out


def agreement_part(tmp: Path, args) -> Dict[str, Dict[str, float]]:
    if args.checkpoint:
        if not args.images:
            raise SystemExit("--checkpoint needs --images DIR (held-out and calibration images)")
        files = list_images(args.images)
        calib_files, test_files, test_labels = files[: len(files) // 2], files[len(files) // 2:], None
        model = create_model(args.model, pretrained=args.checkpoint).eval()
        size = tuple(model.pretrained_cfg["input_size"][1:])
        what = f"{args.model} from {args.checkpoint}, {len(test_files)} held-out images from {args.images}"
    else:
        train_files, train_labels, test_files, test_labels = digits_dataset(tmp / "digits")
        size = (64, 64)
        cfg = PreprocessConfig(input_size=(3, *size))
        x_train = np.stack([preprocess(p, cfg) for p in train_files])
        model = create_model(args.model, num_classes=10)
        print(f"\nfine-tuning {args.model} on digits ({len(train_files)} train images, {size[0]}x{size[1]})")
        finetune(model, x_train, np.array(train_labels), args.epochs, args.train_threads)
        torch.set_num_threads(1)
        calib_dir = tmp / "digits" / "train"
        calib_files = None
        what = f"{args.model} fine-tuned on digits, {len(test_files)} held-out digit images"
    fp32 = tmp / "agree.onnx"
    labels = None if args.checkpoint else [str(i) for i in range(10)]
    export_model(model, fp32, input_size=size, labels=labels)  # verified against PyTorch
    cfg = PreprocessConfig.from_metadata(read_metadata(fp32))
    if calib_files is not None:
        calib_dir = tmp / "calib"
        calib_dir.mkdir(exist_ok=True)
        for p in calib_files:
            os.symlink(p.resolve(), calib_dir / p.name)
    x_test = np.stack([preprocess(p, cfg) for p in test_files])
    x_hard = shifted_noisy(x_test)
    ref, ref_hard = logits(fp32, x_test), logits(fp32, x_hard)
    out: Dict[str, Dict[str, float]] = {}
    print(f"\ntop-1 agreement with fp32: {what}; calibration: {args.calib_count} images;\n"
          f"'hard' = the same held-out images shifted +-6 px with N(0, 0.5) noise; logit err = "
          f"||int8 - fp32|| / ||fp32|| over all logits")
    if test_labels is not None:
        y = np.array(test_labels)
        print(f"  {'fp32':34s} accuracy {100 * np.mean(ref.argmax(1) == y):6.2f}% "
              f"(hard {100 * np.mean(ref_hard.argmax(1) == y):6.2f}%)")
    for ex in EXCLUDE_SETS:
        q = quantize_onnx(fp32, tmp / f"agree_int8_{len(out)}.onnx", calib_dir, exclude=ex, max_images=args.calib_count)
        pred, pred_hard = logits(q, x_test), logits(q, x_hard)
        row = dict(agreement=float(np.mean(pred.argmax(1) == ref.argmax(1))),
                   agreement_hard=float(np.mean(pred_hard.argmax(1) == ref_hard.argmax(1))),
                   logit_err=float(np.linalg.norm(pred - ref) / np.linalg.norm(ref)),
                   logit_err_hard=float(np.linalg.norm(pred_hard - ref_hard) / np.linalg.norm(ref_hard)))
        line = (f"  int8, float: {ex or 'none':21s} agreement {100 * row['agreement']:6.2f}% "
                f"(hard {100 * row['agreement_hard']:6.2f}%)  logit err {row['logit_err']:.3f} "
                f"(hard {row['logit_err_hard']:.3f})")
        if test_labels is not None:
            row["accuracy"] = float(np.mean(pred.argmax(1) == y))
            line += f"  accuracy {100 * row['accuracy']:6.2f}%"
        out[ex or "none"] = row
        print(line)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs on digits")
    ap.add_argument("--model", default="cpubone_t0", help="model for the agreement part")
    ap.add_argument("--checkpoint", help="weights for the agreement part instead of fine-tuning on digits")
    ap.add_argument("--images", help="with --checkpoint: folder of images (first half calibrates, second half tests)")
    ap.add_argument("--calib-count", type=int, default=64)
    ap.add_argument("--train-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import onnxruntime

    print(f"machine: {cpu_name()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="int8_bench_") as tmp:
        tmp = Path(tmp)
        if not args.skip_latency:
            results["latency_ms"] = latency_part(tmp, args.runs, args.rounds, args.calib_count)
        results["agreement"] = agreement_part(tmp, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
