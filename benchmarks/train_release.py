"""A short run of the authors' release recipe (``--recipe release``) on a small real-image folder, on this CPU.

The folder is built from scikit-image's bundled photographs: six textures and scenes (brick, grass, gravel,
coins, an immunohistochemistry slide, the Hubble deep field), one class each; training crops come from the
left 70% of each photograph and validation crops from the right 30%, so no validation pixel is seen in
training. ``cpubone train --recipe release`` then runs with every component of the recipe on (random
resolution, RandAugment, Mixup/CutMix, BCE on smoothed targets, clipping, scheduled DropPath, EMA,
BatchNorm re-estimation before each evaluation, restart on a drop), scaled to the data: a smaller
per-process batch, sizes {64, 80, 96} with evaluation at 96, 1 warm-up epoch. Prints the loss and accuracy
per epoch, the time per epoch and the machine, and checks that the loss falls and top-1 beats chance.

    python benchmarks/train_release.py            # the docs/training.md run (cpubone_nano, 1 + 8 epochs)
    python benchmarks/train_release.py --epochs 1 --quick
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("brick", "grass", "gravel", "coins", "immunohistochemistry", "hubble_deep_field")


def write_photo_crops(root: Path, train_per_class: int = 40, val_per_class: int = 12, size: int = 112,
                      seed: int = 0) -> Path:
    """Random square crops (side 15-45% of the photograph's height, resized to ``size``) as an ImageFolder."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        h, w = img.shape[:2]
        for split, n, (x0, x1) in (("train", train_per_class, (0, int(0.7 * w))),
                                   ("val", val_per_class, (int(0.7 * w), w))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                side = int(rng.uniform(0.15, 0.45) * h)
                side = min(side, x1 - x0)
                x = int(rng.integers(x0, x1 - side + 1))
                y = int(rng.integers(0, h - side + 1))
                crop = Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
                crop.save(folder / f"{i:03d}.png")
    return root


def main() -> int:
    from cpubone.engines.machine import machine_info

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cpubone_nano")
    p.add_argument("--epochs", type=int, default=8, help="epochs after the warm-up epoch")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--output", default=None, help="run folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="no goal check (smoke test)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cpubone_release_"))
    out = Path(args.output) if args.output else work / "run"
    data = write_photo_crops(work / "photos")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "cpubone", "train", "--data", str(data), "--model", args.model, "--recipe", "release",
           "--batch-per-process", "24", "--epochs", str(args.epochs), "--warmup-epochs", "1",
           "--img-sizes", "64", "80", "96", "--img-size", "96", "--workers", "0", "--no-progress",
           "--log-every", "1000", "--output", str(out)]
    print("$ " + " ".join(cmd[2:]).replace(str(work), "$TMP"), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - t0
    rows = list(csv.DictReader(open(out / "history.csv")))
    chance = 100.0 / len(PHOTOS)
    per_epoch = [float(r["epoch_time_s"]) for r in rows]
    result = dict(
        model=args.model, recipe="release", classes=len(PHOTOS), train_images=40 * len(PHOTOS),
        val_images=12 * len(PHOTOS), epochs=len(rows),
        train_loss=[round(float(r["train_loss"]), 4) for r in rows],
        val_top1=[round(float(r["val_top1"]), 2) for r in rows],
        ema_top1=[round(float(r["ema_top1"]), 2) for r in rows],
        median_epoch_s=round(float(np.median(per_epoch)), 1), wall_s=round(wall, 1), chance_top1=round(chance, 2),
        machine=machine_info().cpu, cores=os.cpu_count(), torch_threads=args.threads)
    print(json.dumps(result, indent=2))
    falls = result["train_loss"][-1] < result["train_loss"][0]
    above = max(result["val_top1"]) > chance
    print(f"{args.model}, release recipe, {len(rows)} epochs on {result['train_images']} photo crops: train loss "
          f"{result['train_loss'][0]:.3f} -> {result['train_loss'][-1]:.3f}, best val top-1 {max(result['val_top1']):.1f}% "
          f"(chance {chance:.1f}%), {result['median_epoch_s']} s of training per epoch (median) on "
          f"{result['machine']} ({args.threads} threads)")
    if args.quick:
        return 0
    print("loss falls:", falls, " top-1 above chance:", above)
    return 0 if falls and above else 1


if __name__ == "__main__":
    sys.exit(main())
