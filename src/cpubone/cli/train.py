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
    "--epochs": ("epochs", int, "training epochs (after the warm-up in the release recipe)"),
    "--batch-size": ("batch_size", int, "global batch over all processes and accumulation steps; the lr is "
                                         "scaled linearly from the recipe's"),
    "--batch-per-process": ("batch_per_process", int, "per-process batch (the release recipe's convention: "
                                                      "global = processes x this x accumulation steps)"),
    "--lr": ("lr", float, "peak learning rate (no scaling)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (not on norms and biases)"),
    "--warmup-epochs": ("warmup_epochs", float, "linear warm-up epochs"),
    "--min-lr": ("min_lr", float, "final cosine learning rate"),
    "--img-size": ("img_size", int, "eval input side (and training side without --img-sizes)"),
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
    "--loss": ("loss", str, "ce (softmax cross-entropy) or bce (BCE with logits, the release's)"),
    "--bn-reestimate": ("bn_reestimate", int, "re-estimate BatchNorm statistics on this many training images "
                                              "before each evaluation (0: off)"),
    "--mesa-thresh": ("mesa_thresh", float, "Mesa self-distillation from this training progress (0-1)"),
    "--mesa-ratio": ("mesa_ratio", float, "Mesa loss weight"),
    "--restart-drop": ("restart_drop", float, "reload the best checkpoint when val top-1 falls this many points "
                                              "below the best (negative: off)"),
}
# flags whose value must be a positive integer / at least 0
_POSITIVE = ("--epochs", "--batch-size", "--batch-per-process", "--img-size", "--accum-steps")
_NON_NEGATIVE = ("--checkpoint-every", "--workers", "--log-every", "--bn-reestimate", "--warmup-epochs",
                 "--weight-decay", "--mixup", "--cutmix", "--smoothing", "--drop-path", "--drop", "--ema-decay",
                 "--re-prob", "--mesa-ratio")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``cpubone train`` (also used by ``python -m cpubone.train`` under torchrun)."""
    p.add_argument("--data", help="ImageFolder root with train/ and val/ (class sub-folders)")
    p.add_argument("--model", help="CPUBone variant (cpubone_b0 ...) or timm model name")
    p.add_argument("--recipe", default="release", choices=["release", "paper", "finetune", "digits"],
                   help="hyperparameter preset (default: the authors' released ImageNet recipe for --model; "
                        "paper: the paper's summary)")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved configuration as JSON and exit (reads no data)")
    p.add_argument("--world-size", type=int, metavar="N",
                   help="with --print-config: resolve for N processes (default: $WORLD_SIZE or 1)")
    p.add_argument("--img-sizes", type=int, nargs="+", metavar="S",
                   help="random-resolution training sizes, one per batch ('--img-sizes 0': off)")
    p.add_argument("--output", default="runs/train", help="run folder (default runs/train)")
    p.add_argument("--pretrained", help="checkpoint to fine-tune from (ours, the authors', timm's) or 'hub'")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the classifier")
    p.add_argument("--resume", help="continue from a run folder (its last.pt) or a last.pt / best.pt")
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
        if not key.isidentifier():
            raise ValueError(f"--model-kwargs: {key!r} is not an argument name")
        try:
            out[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key] = val
    return out


def _check_flags(args: argparse.Namespace) -> None:
    for flag in _POSITIVE + _NON_NEGATIVE:
        val = getattr(args, flag[2:].replace("-", "_"), None)
        if val is None:
            continue
        if flag in _POSITIVE and val < 1:
            raise ValueError(f"{flag} must be at least 1, got {val}")
        if flag in _NON_NEGATIVE and val < 0:
            raise ValueError(f"{flag} must not be negative, got {val}")
    if args.lr is not None and args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.mesa_thresh is not None and not 0 <= args.mesa_thresh <= 1:
        raise ValueError(f"--mesa-thresh is a training progress between 0 and 1, got {args.mesa_thresh}")
    if args.img_sizes and args.img_sizes != [0] and min(args.img_sizes) < 1:
        raise ValueError(f"--img-sizes takes positive sizes (or 0 alone: off), got {args.img_sizes}")
    if args.loss is not None and args.loss not in ("ce", "bce"):
        raise ValueError(f"--loss must be ce or bce, got {args.loss!r}")
    if args.world_size is not None and args.world_size < 1:
        raise ValueError(f"--world-size must be at least 1, got {args.world_size}")


def config_from_args(args: argparse.Namespace):
    """Build the ``TrainConfig`` from parsed ``cpubone train`` arguments."""
    from ..train.classification import TrainConfig
    from ..train.recipes import get_recipe

    _check_flags(args)
    if not args.resume and not args.print_config and (not args.data or not args.model):
        raise ValueError("--data and --model are required (unless resuming with --resume)")
    model = args.model or "cpubone_b0"
    recipe = get_recipe(args.recipe, model)
    overrides: Dict[str, Any] = {}
    for flag, (name, _, _) in _RECIPE_FLAGS.items():
        val = getattr(args, flag[2:].replace("-", "_"))
        if val is not None:
            overrides[name] = None if name == "auto_augment" and val.lower() == "none" else val
    if overrides.get("restart_drop") is not None and overrides["restart_drop"] < 0:
        overrides["restart_drop"] = None
    if "batch_size" in overrides and "batch_per_process" not in overrides:
        recipe = recipe.with_global_batch(overrides.pop("batch_size"))
    if "lr" in overrides:  # an explicit lr is the peak lr of this run, not rescaled
        overrides.update(lr_rule="fixed", total_lr=None)
    if args.img_sizes is not None:
        overrides["img_sizes"] = None if args.img_sizes == [0] else tuple(args.img_sizes)
    elif "img_size" in overrides and recipe.img_sizes:
        overrides["img_sizes"] = None  # one size given: train at it
    if args.no_aug:
        overrides["no_aug"] = True
    if args.no_channels_last:
        overrides["channels_last"] = False
    if args.freeze_backbone:
        overrides["freeze_backbone"] = True
    recipe = recipe.replace(**overrides)
    recipe.check()
    return TrainConfig(
        data=args.data or "", model=model, recipe=recipe, recipe_name=args.recipe, output=args.output,
        pretrained=args.pretrained, model_kwargs=_parse_kwargs(args.model_kwargs), resume=args.resume,
        checkpoint_every=args.checkpoint_every, num_workers=args.workers, seed=args.seed, device=args.device,
        deterministic=args.deterministic, sync_bn=args.sync_bn, progress=not args.no_progress,
        tensorboard=not args.no_tensorboard, log_every=args.log_every,
    )


def run_train(args: argparse.Namespace) -> int:
    from ..train import TrainingDiverged, resolved_config, train

    cfg = config_from_args(args)
    if args.print_config:
        world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
        print(json.dumps(resolved_config(cfg, world), indent=2))
        return 0
    try:
        train(cfg)
    except TrainingDiverged as e:
        print(f"cpubone train: stopped: {e} (options: --lr, --clip-grad, --amp none, then --resume)",
              file=sys.stderr)
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
    from ..train.classification import evaluate_checkpoint

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
    from ..outputs import check_new_dataset_dir
    from ..train.data import write_digits_imagefolder

    check_new_dataset_dir(args.output)  # never mix images into (or overwrite) an existing dataset
    root = write_digits_imagefolder(args.output, size=args.size, val_fraction=args.val_fraction, seed=args.seed)
    print(f"wrote scikit-learn digits as an ImageFolder in {root} (train/, val/; {args.size} px PNGs)")
    return 0
