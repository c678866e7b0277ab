"""``cpubone export`` and ``cpubone predict``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the inference form to ONNX (or TFLite), verified against PyTorch")
    p.add_argument("model", help="CPUBone variant (e.g. cpubone_b0) or timm model name")
    p.add_argument("--checkpoint", metavar="PATH", help="weights to load (ours, timm's or the authors' layout)")
    p.add_argument("--format", choices=("onnx", "tflite"), default="onnx", help="output format (default onnx)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    p.add_argument("--dynamic", action="store_true", help="symbolic batch/height/width (ONNX only)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="allowed ONNX Runtime vs PyTorch difference, relative to max(1, max |logit|) (default 1e-4)")
    p.add_argument("--int8", action="store_true", help="also write a static-QDQ int8 model (needs --calib)")
    p.add_argument("--calib", metavar="DIR", help="folder of calibration images for --int8")
    p.add_argument("--calib-count", type=int, default=64, help="calibration images to use (default 64)")
    p.add_argument("--int8-exclude", default="first,last",
                   help="comma-separated node names or groups (attention, first, last) kept in float; "
                        "'' quantizes everything (default first,last)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write")
    p.add_argument("--json", action="store_true", help="print the verification report as JSON")
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="classify images with an exported model (no torch needed) or saved weights",
                       usage="cpubone predict MODEL IMAGE_OR_FOLDER... [options]\n"
                             "       cpubone predict IMAGE_OR_FOLDER... --onnx FILE [options]")
    p.add_argument("inputs", nargs="+", metavar="MODEL IMAGE",
                   help="the model (a file written by `cpubone export` or `cpubone deploy`: .onnx, .xml (OpenVINO), "
                        ".tflite, .ncnn.param need no torch, .pte and .pt2 do; or weights: a save_pretrained folder "
                        "such as best_model/, .safetensors, .pt), then image files and folders of images")
    p.add_argument("--onnx", metavar="FILE", help="the model as an option; then every positional is an image")
    p.add_argument("--model", dest="architecture", metavar="NAME",
                   help="architecture of weights saved without a config (e.g. the authors' evalmodel.pt)")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_predict)


def _export(args: argparse.Namespace) -> int:
    from . import UserError

    if args.format == "tflite":
        if args.int8 or args.dynamic:
            raise UserError("--int8 and --dynamic apply to ONNX exports only")
        from ..deploy.export import export_tflite_model

        report = export_tflite_model(args.model, args.output, checkpoint=args.checkpoint,
                                     input_size=tuple(args.size) if args.size else None, tolerance=args.tol)
        _print_report(report, args.json)
        return 0
    if args.int8 and not args.calib:
        raise UserError("--int8 needs --calib DIR (a folder of images to calibrate activation ranges on)")
    from ..deploy.export import ExportVerificationError, export_model

    try:
        report = export_model(
            args.model, args.output, checkpoint=args.checkpoint, input_size=tuple(args.size) if args.size else None,
            dynamic=args.dynamic, opset=args.opset, tolerance=args.tol, int8=args.int8, calib_dir=args.calib,
            int8_exclude=args.int8_exclude, calib_count=args.calib_count,
        )
    except ExportVerificationError as e:
        raise UserError(f"verification FAILED: {e}") from None
    _print_report(report, args.json)
    return 0


def _print_report(report, as_json: bool) -> None:
    if as_json:
        from ._render import print_json

        print_json(report.to_dict())
        return
    print(f"wrote {report.path} ({report.model}, input {report.input_size[0]}x{report.input_size[1]}"
          f"{', dynamic H/W' if getattr(report, 'dynamic', False) else ''})")
    print(f"verification against PyTorch (tolerance {report.tolerance:g} x max(1, max|logit|)):")
    for c in report.checks:
        print(f"  {c.input:24s} max abs diff {c.max_abs_diff:.2e}  (max |logit| {c.max_abs_ref:.2f})  "
              f"top-1 {'same' if c.top1_agree else 'DIFFERENT'}")
    print(f"  OK: max abs difference {report.max_abs_diff:.2e}")
    if getattr(report, "metadata_path", None):
        print(f"wrote {report.metadata_path} (preprocessing and class names, read by `cpubone predict`)")
    if getattr(report, "int8_path", None):
        agree = sum(c.top1_agree for c in report.int8_checks)
        print(f"wrote {report.int8_path} (int8, static QDQ); vs fp32 on {len(report.int8_checks)} photos: "
              f"top-1 agrees on {agree}, max abs logit diff {max(c.max_abs_diff for c in report.int8_checks):.3f}")


def _predict(args: argparse.Namespace) -> int:
    import json
    import sys

    from ..deploy.predictor import (
        predict_files,  # torch-free unless the model is PyTorch weights
    )
    from . import UserError

    if args.onnx:
        model, images = args.onnx, args.inputs
    else:
        model, images = args.inputs[0], args.inputs[1:]
        if not images:
            raise UserError(f"give the model and then at least one image or folder (got only {model})")
    if args.topk < 1:
        raise UserError(f"--topk {args.topk}: must be at least 1")
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    preds = predict_files(images, model, args.topk, args.threads, args.architecture)
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=2))
    else:
        for p in preds:
            if p.error is None:
                print(p.image)
                for i, label, prob in zip(p.indices, p.labels, p.probs):
                    print(f"  {prob:7.2%}  {i:5d}  {label}")
    failed = [p for p in preds if p.error is not None]
    for p in failed:
        print(f"cpubone predict: error: {p.error}", file=sys.stderr)
    return 1 if failed else 0
