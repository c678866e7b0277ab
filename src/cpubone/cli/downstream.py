"""``cpubone detect ...`` (RetinaNet) and ``cpubone segment ...`` (Semantic FPN)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List


def _pretrained(value: str):
    return True if value in ("true", "hub", "1") else value


def _common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--output", required=True, help="folder for last.pt, model.pt and metrics.jsonl")
    p.add_argument("--backbone", default="cpubone_b0", help="CPUBone variant or any timm model (default cpubone_b0)")
    p.add_argument("--pretrained-backbone", type=_pretrained, nargs="?", const=True, default=False, metavar="PATH",
                   help="start the backbone from ImageNet weights: alone for the hub weights, or a checkpoint path")
    p.add_argument("--fpn-channels", type=int, default=256, help="FPN width (default 256, the paper's)")
    p.add_argument("--batch-size", type=int, help="images per step (preset: 16 detect, 32 segment)")
    p.add_argument("--opt", help="optimizer name for timm.optim.create_optimizer_v2 (preset: adamw)")
    p.add_argument("--lr", type=float, help="peak learning rate (preset's otherwise)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-iters", type=int, help="linear warmup iterations")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, help="print the running loss every N iterations")
    p.add_argument("--resume", help="continue from a run folder (its last.pt) or a last.pt")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation steps (--batch-size stays the global batch)")
    p.add_argument("--amp", help="none (default, fp32), auto / bf16 (CPU and GPU), fp16 (GPU)")
    p.add_argument("--checkpoint-every", type=int, metavar="ITERS", help="also save last.pt every ITERS iterations")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--progress", action="store_true", default=None, help="progress bars instead of log lines")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also write a TensorBoard log")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")


def _common_bench(p: argparse.ArgumentParser, classes: int) -> None:
    from ..downstream.presets import DEFAULT_PEERS

    p.add_argument("--backbones", nargs="+", default=list(DEFAULT_PEERS),
                   help=f"backbones to compare with the same head (default: {' '.join(DEFAULT_PEERS)})")
    p.add_argument("--size", type=int, default=512, help="square input side (default 512)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=20, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--num-classes", type=int, default=classes)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime column")
    p.add_argument("--engines", metavar="LIST",
                   help="time the network (up to the head outputs) in these runtimes instead, each checked against "
                        "PyTorch, e.g. onnxruntime,openvino,ncnn,eager or 'all' installed")
    p.add_argument("--precisions", default="fp32", metavar="LIST",
                   help="with --engines: fp32, int8, bf16 where an engine runs it (default fp32)")
    p.add_argument("--rounds", type=int, default=5, help="with --engines: interleaved timing rounds (default 5)")
    p.add_argument("--json", action="store_true")


def _common_synth(p: argparse.ArgumentParser, train: str, val: str) -> None:
    p.add_argument("output", help="dataset root to write")
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--val-images", type=int, default=50)
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--classes", type=int, default=3, help="shape classes, 1-6 (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(train_split=train, val_split=val)


def _one_line_warnings(func):
    """Show library warnings (an empty COCO annotation list, a skipped image) as one line each, like errors."""
    import functools

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        import sys
        import warnings

        def show(message, category, filename, lineno, file=None, line=None):
            print(f"cpubone {args.command} {args.action}: warning: {message}", file=file or sys.stderr)

        with warnings.catch_warnings():
            warnings.showwarning = show
            return func(args)

    return run


def register(sub: argparse._SubParsersAction) -> None:
    from ..downstream.presets import DETECTION_PRESETS, SEGMENTATION_PRESETS

    det = sub.add_parser("detect", help="RetinaNet object detection on a CPUBone (or timm) backbone")
    dsub = det.add_subparsers(dest="action", metavar="ACTION")
    dsub.required = True

    p = dsub.add_parser("train", help="train RetinaNet on COCO-format data")
    _common_train(p)
    p.add_argument("--preset", default="1x", choices=sorted(DETECTION_PRESETS), help="schedule (default 1x: 12 epochs)")
    p.add_argument("--train-split", default="train", help="annotations/instances_<split>.json (default train)")
    p.add_argument("--val-split", default="val", help="evaluation split; 'none' to skip (default val)")
    p.add_argument("--epochs", type=int, help="epochs (preset: 12); the lr steps keep their relative place")
    p.add_argument("--min-size", type=int, help="shorter image side fed to the network (preset 800)")
    p.add_argument("--max-size", type=int, help="longer side limit (preset 1333)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    p.add_argument("--grad-clip", type=float, help="max gradient norm (preset: none for 1x, 35 for 1x-sgd)")
    p.add_argument("--head-norm", action="store_true",
                   help="GroupNorm in the RetinaNet towers (torchvision's v2 head; not the paper's)")
    p.set_defaults(func=_one_line_warnings(_detect_train))

    p = dsub.add_parser("eval", help="COCO AP of a trained detector")
    p.add_argument("checkpoint", help="model.pt or last.pt from detect train")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_one_line_warnings(_detect_eval))

    p = dsub.add_parser("predict", help="detect objects in one image; writes a PNG with the boxes drawn")
    p.add_argument("checkpoint")
    p.add_argument("image")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_one_line_warnings(_detect_predict))

    p = dsub.add_parser("bench", help="batch-1 CPU latency of RetinaNet on CPUBone and peer backbones")
    _common_bench(p, 80)
    p.set_defaults(func=_one_line_warnings(_detect_bench))

    p = dsub.add_parser("make-synthetic", help="write a synthetic COCO-format shapes dataset")
    _common_synth(p, "train", "val")
    p.set_defaults(func=_one_line_warnings(_detect_synth))

    seg = sub.add_parser("segment", help="Semantic FPN segmentation on a CPUBone (or timm) backbone")
    ssub = seg.add_subparsers(dest="action", metavar="ACTION")
    ssub.required = True

    p = ssub.add_parser("train", help="train Semantic FPN on ADE20K-format data")
    _common_train(p)
    p.add_argument("--preset", default="ade20k-40k", choices=sorted(SEGMENTATION_PRESETS))
    p.add_argument("--num-classes", type=int, default=150, help="classes after label reduction (ADE20K: 150)")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=True,
                   help="label 0 is 'other' and ignored (ADE20K; default on)")
    p.add_argument("--train-split", default="training")
    p.add_argument("--val-split", default="validation", help="'none' to skip evaluation")
    p.add_argument("--iters", type=int, help="iterations (preset 40000)")
    p.add_argument("--crop-size", type=int, help="square training crop (preset 512)")
    p.add_argument("--base-size", type=int, help="shorter side before the random rescale / at evaluation (preset 512)")
    p.add_argument("--head-channels", type=int, default=128, help="semantic branch width (default 128)")
    p.add_argument("--dropout", type=float, help="dropout before the classifier (default 0.1)")
    p.add_argument("--eval-every", type=int, default=4000, help="evaluate and checkpoint every N iterations")
    p.set_defaults(func=_one_line_warnings(_segment_train))

    p = ssub.add_parser("eval", help="mIoU, per-class IoU and pixel accuracy of a trained segmenter")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="validation")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_one_line_warnings(_segment_eval))

    p = ssub.add_parser("predict", help="segment one image; writes a PNG with the coloured mask overlaid")
    p.add_argument("checkpoint")
    p.add_argument("image")
    p.add_argument("--output", required=True)
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_one_line_warnings(_segment_predict))

    p = ssub.add_parser("bench", help="batch-1 CPU latency of Semantic FPN on CPUBone and peer backbones")
    _common_bench(p, 150)
    p.set_defaults(func=_one_line_warnings(_segment_bench))

    p = ssub.add_parser("make-synthetic", help="write a synthetic ADE20K-format shapes dataset")
    _common_synth(p, "training", "validation")
    p.set_defaults(func=_one_line_warnings(_segment_synth))


def _none(split: str):
    return None if split.lower() == "none" else split


def _train_kwargs(args: argparse.Namespace, names: List[str]) -> Dict[str, Any]:
    kw = {k: getattr(args, k) for k in names}
    return {k: v for k, v in kw.items() if v is not None}


_COMMON = ["data", "output", "backbone", "pretrained_backbone", "fpn_channels", "batch_size", "opt", "lr",
           "weight_decay", "warmup_iters", "workers", "seed", "log_every", "resume", "preset", "train_split",
           "eval_every", "accum_steps", "amp", "checkpoint_every", "device", "progress", "tensorboard"]
# flags that must be at least 1 / at least 0
_POSITIVE = ("epochs", "iters", "batch_size", "eval_every", "accum_steps", "crop_size", "base_size", "fpn_channels",
             "head_channels", "min_size", "max_size")
_NON_NEGATIVE = ("workers", "log_every", "checkpoint_every", "warmup_iters")


def _check_flags(args: argparse.Namespace) -> None:
    for name in _POSITIVE + _NON_NEGATIVE:
        val = getattr(args, name, None)
        if val is None:
            continue
        if name in _POSITIVE and val < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {val}")
        if name in _NON_NEGATIVE and val < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {val}")
    if getattr(args, "lr", None) is not None and args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")


def _train_and_print(command: str, train_fn, cfg, as_json: bool) -> int:
    from ..train.loop import TrainingDiverged

    try:
        result = train_fn(cfg)
    except TrainingDiverged as e:
        flags = "--lr, --grad-clip" if command == "detect" else "--lr"
        print(f"cpubone {command} train: stopped: {e} (options: {flags}, then --resume)", file=sys.stderr)
        return 3
    if result.pop("main", True):  # under torchrun only the first process prints
        _print_metrics(result, as_json, "final evaluation")
    return 0


def _print_metrics(metrics: Dict[str, Any], as_json: bool, title: str) -> None:
    from ._render import print_json, print_table

    if as_json:
        print_json(metrics)
        return
    flat = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    print_table([flat], title=title)
    # per-class results come keyed by class name from the metric functions (IoU, per_class_AP)
    for key, per_class in metrics.items():
        if isinstance(per_class, dict) and per_class:
            column = key.replace("per_class_", "")
            absent = any(v != v for v in per_class.values())  # NaN: the class is in neither truth nor prediction
            print_table([{"class": n, column: None if v != v else v} for n, v in per_class.items()],
                        title=f"per-class {column}" + (" (-: class not in this data)" if absent else ""))


def _detect_train(args: argparse.Namespace) -> int:
    from ..downstream.api import DetectionTrainConfig, train_detection

    _check_flags(args)
    kw = _train_kwargs(args, _COMMON + ["epochs", "min_size", "max_size", "grad_clip", "head_norm"])
    cfg = DetectionTrainConfig(val_split=_none(args.val_split), **kw)
    return _train_and_print("detect", train_detection, cfg, args.json)


def _detect_eval(args: argparse.Namespace) -> int:
    from ..downstream.api import coco_split, evaluate_detection, load_downstream_model
    from ..downstream.datasets import CocoDetection, detection_transforms

    model, cfg = load_downstream_model(args.checkpoint, task="detect")
    images, ann = coco_split(args.data, args.split)
    ds = CocoDetection(images, ann, transforms=detection_transforms(train=False))
    if ds.cat_ids != cfg["cat_ids"]:
        raise ValueError(f"{ann}: categories {ds.cat_ids} differ from the model's {cfg['cat_ids']}")
    _print_metrics(evaluate_detection(model, ds, batch_size=args.batch_size), args.json,
                   f"{cfg['backbone']} RetinaNet on {ann}")
    return 0


def _detect_predict(args: argparse.Namespace) -> int:
    from ..downstream.api import predict_detection
    from ._render import print_json, print_table

    dets = predict_detection(args.checkpoint, args.image, args.output, args.score_thresh)
    if args.json:
        print_json(dets)
    else:
        print_table(dets, title=f"{len(dets)} detections -> {args.output}")
    return 0


def _print_bench(result: Dict[str, Any], as_json: bool) -> None:
    from ._render import print_json, print_table

    if as_json:
        print_json(result)
        return
    print_table(result["rows"], title=f"{result['task']} at {result['size']}x{result['size']}, batch 1, "
                                      f"{result['threads']} thread(s), median of {result['runs']} runs (ms)")
    print(f"machine: {result['machine']}; torch {result['torch']}")


def _engines_bench(args: argparse.Namespace, task: str) -> int:
    from ..downstream.bench import bench_engines
    from ._render import print_json, print_table

    classes = {"detect_classes" if task == "detect" else "segment_classes": args.num_classes}
    res = bench_engines(args.backbones, [task], args.engines, args.precisions, args.size, args.threads, args.runs,
                        args.warmup, args.rounds, progress=not args.json and sys.stderr.isatty(), **classes)
    if args.json:
        print_json(res.to_dict())
        return 0
    print_table(res.table(task), title=res.title(task))
    for line in res.not_timed(task):
        print(line)
    print("int8 / bf16 differences are from random weights: shown, not judged.")
    print(f"machine: {res.machine.header(res.threads)}")
    return 0


def _detect_bench(args: argparse.Namespace) -> int:
    from ..downstream.bench import bench_detection

    if args.engines:
        return _engines_bench(args, "detect")
    _print_bench(bench_detection(args.backbones, args.size, args.threads, args.runs, args.warmup, args.num_classes,
                                 not args.no_onnx), args.json)
    return 0


def _detect_synth(args: argparse.Namespace) -> int:
    from ..downstream.datasets import write_synthetic_coco

    for split, n, seed in ((args.train_split, args.train_images, args.seed), (args.val_split, args.val_images, args.seed + 1)):
        if n:
            print(write_synthetic_coco(args.output, n, args.size, args.classes, seed=seed, split=split))
    return 0


def _segment_train(args: argparse.Namespace) -> int:
    from ..downstream.api import SegmentationTrainConfig, train_segmentation

    _check_flags(args)
    kw = _train_kwargs(args, _COMMON + ["num_classes", "reduce_zero_label", "iters", "crop_size", "base_size",
                                        "head_channels", "dropout"])
    cfg = SegmentationTrainConfig(val_split=_none(args.val_split), **kw)
    return _train_and_print("segment", train_segmentation, cfg, args.json)


def _segment_eval(args: argparse.Namespace) -> int:
    from ..downstream.api import evaluate_segmentation, load_downstream_model
    from ..downstream.datasets import SegmentationFolder

    model, cfg = load_downstream_model(args.checkpoint, task="segment")
    # the model's own class names, whatever the data folder's classes.json says
    ds = SegmentationFolder(args.data, args.split, cfg["num_classes"], cfg["reduce_zero_label"],
                            classes=cfg.get("classes"))
    metrics = evaluate_segmentation(model, ds, base_size=cfg["base_size"])
    _print_metrics(metrics, args.json, f"{cfg['backbone']} Semantic FPN on {ds.image_dir}")
    return 0


def _segment_predict(args: argparse.Namespace) -> int:
    from ..downstream.api import predict_segmentation
    from ._render import print_json, print_table

    shares = predict_segmentation(args.checkpoint, args.image, args.output, args.alpha)
    if args.json:
        print_json(shares)
    else:
        print_table([{"class": k, "pixel share": v} for k, v in shares.items()], title=f"-> {args.output}")
    return 0


def _segment_bench(args: argparse.Namespace) -> int:
    from ..downstream.bench import bench_segmentation

    if args.engines:
        return _engines_bench(args, "segment")
    _print_bench(bench_segmentation(args.backbones, args.size, args.threads, args.runs, args.warmup,
                                    args.num_classes, not args.no_onnx), args.json)
    return 0


def _segment_synth(args: argparse.Namespace) -> int:
    from ..downstream.datasets import write_synthetic_ade

    for split, n, seed in ((args.train_split, args.train_images, args.seed), (args.val_split, args.val_images, args.seed + 1)):
        if n:
            write_synthetic_ade(args.output, n, args.size, args.classes, seed=seed, split=split)
    print(args.output)
    return 0
