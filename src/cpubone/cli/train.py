"""``cpubone train``, ``cpubone eval`` and ``cpubone make-digits``."""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Any, Dict, List

# recipe fields that the command line can override: flag -> (field, type, help)
_RECIPE_FLAGS = {
    "--epochs": ("epochs", int, "training epochs"),
    "--batch-size": ("batch_size", int, "global batch over all processes and accumulation steps; the lr is "
                                         "scaled linearly from the recipe's"),
    "--lr": ("lr", float, "peak learning rate at --batch-size (no scaling)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (not on norms and biases)"),
    "--warmup-epochs": ("warmup_epochs", float, "linear warm-up epochs"),
    "--min-lr": ("min_lr", float, "final cosine learning rate"),
    "--img-size": ("img_size", int, "training and eval input side"),
    "--crop-pct": ("crop_pct", float, "eval centre-crop fraction"),
    "--auto-augment": ("auto_augment", str, "timm augmentation policy ('original', 'rand-m9-mstd0.5-inc1', 'none')"),
    "--hflip": ("hflip", float, "horizontal flip probability"),
    "--re-prob": ("re_prob", float, "random erasing probability"),
    "--mixup": ("mixup", float, "Mixup alpha (0: off)"),
    "--cutmix": ("cutmix", float, "CutMix alpha (0: off)"),
    "--smoothing": ("smoothing", float, "label smoothing"),
    "--drop-path": ("drop_path", float, "stochastic depth rate"),
    "--drop": ("drop", float, "dropout before the classifier"),
    "--ema-decay": ("ema_decay", float, "EMA decay (0: no EMA)"),
    "--amp": ("amp", str, "auto (bf16), bf16, fp16 (CUDA) or none"),
    "--accum-steps": ("accum_steps", int, "gradient accumulation steps"),
    "--clip-grad": ("clip_grad", float, "clip the global gradient norm to this value"),
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``cpubone train`` (also used by ``python -m cpubone.train`` under torchrun)."""
    p.add_argument("--data", help="ImageFolder root with train/ and val/ (class sub-folders)")
    p.add_argument("--model", help="CPUBone variant (cpubone_b0 ...) or timm model name")
    p.add_argument("--recipe", default="paper", choices=["paper", "finetune", "digits"],
                   help="hyperparameter preset (default: the paper's ImageNet recipe for --model)")
    p.add_argument("--output", default="runs/train", help="run folder (default runs/train)")
    p.add_argument("--pretrained", help="checkpoint to fine-tune from (ours, the authors', timm's) or 'hub'")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the classifier")
    p.add_argument("--resume", help="continue from this last.pt / best.pt")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also save last.pt every STEPS optimizer steps (default: only at epoch ends)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loader processes per rank (default: min(4, CPU cores); 0 loads in the training process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels where available")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    p.add_argument("--no-aug", action="store_true", help="no augmentation: resize + centre crop")
    p.add_argument("--no-channels-last", action="store_true", help="keep the NCHW memory format")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra model constructor arguments, e.g. head_widths=[64,64] proj_drop_rate=0")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write a TensorBoard log")
    p.add_argument("--log-every", type=int, default=50, metavar="STEPS", help="steps between log points")
    for flag, (_, typ, help_) in _RECIPE_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_)


def _parse_kwargs(items: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-kwargs expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key] = val
    return out


def config_from_args(args: argparse.Namespace):
    """Build the ``TrainConfig`` from parsed ``cpubone train`` arguments."""
    from ..train.engine import TrainConfig
    from ..train.recipes import get_recipe

    if not args.resume and (not args.data or not args.model):
        raise ValueError("--data and --model are required (unless resuming with --resume)")
    model = args.model or "cpubone_b0"
    recipe = get_recipe(args.recipe, model)
    overrides: Dict[str, Any] = {}
    for flag, (name, _, _) in _RECIPE_FLAGS.items():
        val = getattr(args, flag[2:].replace("-", "_"))
        if val is not None:
            overrides[name] = None if name == "auto_augment" and val.lower() == "none" else val
    if "lr" in overrides:  # an explicit lr is meant for the batch given, not rescaled
        overrides["lr_base_batch"] = overrides.get("batch_size", recipe.batch_size)
    elif "batch_size" in overrides:
        pass  # linear scaling from the recipe's (lr, lr_base_batch)
    if args.no_aug:
        overrides["no_aug"] = True
    if args.no_channels_last:
        overrides["channels_last"] = False
    if args.freeze_backbone:
        overrides["freeze_backbone"] = True
    recipe = recipe.replace(**overrides)
    return TrainConfig(
        data=args.data or "", model=model, recipe=recipe, recipe_name=args.recipe, output=args.output,
        pretrained=args.pretrained, model_kwargs=_parse_kwargs(args.model_kwargs), resume=args.resume,
        checkpoint_every=args.checkpoint_every, num_workers=args.workers, seed=args.seed, device=args.device,
        deterministic=args.deterministic, sync_bn=args.sync_bn, progress=not args.no_progress,
        tensorboard=not args.no_tensorboard, log_every=args.log_every,
    )


def run_train(args: argparse.Namespace) -> int:
    from ..train.engine import TrainingDiverged, train

    cfg = config_from_args(args)
    try:
        train(cfg)
    except TrainingDiverged as e:
        print(f"cpubone train: stopped: {e}", file=sys.stderr)
        return 3
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model on an ImageFolder (also under torchrun: "
                                     "python -m cpubone.train)")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval", help="top-1 / top-5 of a model or checkpoint on an ImageFolder split")
    p.add_argument("--data", required=True, help="ImageFolder root (uses its val/ if present) or split folder")
    p.add_argument("--model", required=True, help="CPUBone variant or timm model name")
    p.add_argument("--checkpoint", help="ours (best_model/, last.pt), the authors' evalmodel.pt, timm's, or 'hub'")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--img-size", type=int, help="input side (default: the checkpoint's / model's)")
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction (default: the model's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_eval)

    p = sub.add_parser("make-digits", help="write scikit-learn's handwritten digits as an ImageFolder")
    p.add_argument("output", help="folder to create (train/ and val/ inside)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (upsampled from 8)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_digits)


def _eval(args: argparse.Namespace) -> int:
    from ..train.engine import evaluate_checkpoint

    r = evaluate_checkpoint(args.data, args.model, args.checkpoint, split=args.split, batch_size=args.batch_size,
                            num_workers=args.workers, img_size=args.img_size, crop_pct=args.crop_pct,
                            device=args.device)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['model']} ({r['checkpoint'] or 'random weights'}) on {r['split']} at {r['input_size']} px: "
              f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  "
              f"({r['images']} images, {r['classes']} classes"
              + (f", {r['skipped']} unreadable skipped" if r["skipped"] else "") + ")")
    return 0


def _make_digits(args: argparse.Namespace) -> int:
    from ..train.data import write_digits_imagefolder

    root = write_digits_imagefolder(args.output, size=args.size, val_fraction=args.val_fraction, seed=args.seed)
    print(f"wrote scikit-learn digits as an ImageFolder in {root} (train/, val/; {args.size} px PNGs)")
    return 0
