"""Train CPUBone from scratch on real data on this CPU: scikit-learn's handwritten digits (1,797 scans).

Writes the digits as an ImageFolder (32 px PNGs, stratified 80/20 split), runs ``cpubone train`` as a
user would (a subprocess, so the wall time includes start-up), then ``cpubone eval`` on the best
weights, and prints validation accuracy, wall time and the machine. The README's figure is the run's
``curves.png`` (copied to ``--figure``).

    python benchmarks/train_digits.py                       # the README run (cpubone_nano, 10 epochs)
    python benchmarks/train_digits.py --epochs 2 --quick    # a smoke test of the script

Goal (issue 5): >= 95% validation top-1 within 10 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    from cpubone.engines.machine import machine_info

    return machine_info().cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cpubone_nano")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (0: in the training process)")
    p.add_argument("--output", default=None, help="run folder (default: a temporary one)")
    p.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "train_digits_curves.png"))
    p.add_argument("--quick", action="store_true", help="no goal check, no figure (smoke test)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cpubone_digits_"))
    out = Path(args.output) if args.output else work / "run"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    py = [sys.executable, "-m", "cpubone"]
    try:
        subprocess.run(py + ["make-digits", str(work / "digits"), "--size", str(args.img_size)], env=env, check=True)
        cmd = py + ["train", "--data", str(work / "digits"), "--model", args.model, "--recipe", "digits",
                    "--epochs", str(args.epochs), "--img-size", str(args.img_size), "--workers", str(args.workers),
                    "--output", str(out), "--no-progress", "--log-every", "1000"]
        print("$ " + " ".join(cmd[2:]).replace(str(work), "$TMP"), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        wall = time.perf_counter() - t0
        ev = subprocess.run(py + ["eval", "--data", str(work / "digits"), "--model", args.model, "--checkpoint",
                                  str(out / "best_model"), "--workers", "0", "--json"],
                            env=env, check=True, capture_output=True, text=True)
        r = json.loads(ev.stdout)
        summary = json.loads((out / "summary.json").read_text())
        result = dict(model=args.model, epochs=args.epochs, img_size=args.img_size, train_images=1437,
                      val_images=r["images"], val_top1=round(r["top1"], 2), val_top5=round(r["top5"], 2),
                      best_epoch=summary["best_epoch"], train_wall_s=round(wall, 1),
                      cpu=cpu_name(), cores=os.cpu_count(), torch_threads=args.threads)
        print(json.dumps(result, indent=2))
        print(f"{args.model} from scratch on scikit-learn digits: {r['top1']:.2f}% val top-1 "
              f"({r['images']} images) after {args.epochs} epochs, {wall / 60:.1f} min wall "
              f"on {result['cpu']} ({args.threads} threads)")
        if not args.quick:
            fig = Path(args.figure)
            fig.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / "curves.png", fig)
            print(f"figure: {fig}")
            ok = r["top1"] >= 95.0 and wall <= 600
            print("goal (>= 95% top-1 within 10 min):", "met" if ok else "NOT met")
            return 0 if ok else 1
        return 0
    finally:
        shutil.rmtree(work / "digits", ignore_errors=True)
        if not args.output:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
