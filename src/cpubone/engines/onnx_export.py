"""ONNX export: the one path from a PyTorch module to an ``.onnx`` file, for every engine that reads ONNX.

ONNX Runtime runs the file; OpenVINO and ncnn's converter read the same export where they need one. The
file carries string metadata (the preprocessing, class names), which ``read_metadata`` and
``add_metadata`` read and extend.
"""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import onnx
import torch
import torch.nn as nn

from ..models.reparam import shape_general
from ..outputs import atomic_write
from .base import ExportError

__all__ = ["export_onnx", "read_metadata", "add_metadata", "check_opset", "quiet_exporter", "exporter_reason",
           "DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET"]

DEFAULT_OPSET = 18
# keys of the preprocessing (PreprocessConfig fields) are stored bare; these carry the rest
METADATA_PREFIX = "cpubone."


# The TorchScript exporter writes opsets up to 20; Lowtention's scaled_dot_product_attention and the
# HardSwish activations need 14.
MIN_OPSET, MAX_OPSET = 14, 20


def check_opset(opset: int) -> None:
    """Refuse an opset outside ``MIN_OPSET``..``MAX_OPSET`` before any work, naming the range."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is not supported: choose {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter: Python warnings, and the TorchScript graph dump (thousands of lines) that its
    C++ logger writes straight to file descriptors 1 and 2 when a conversion fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        # sys.stdout too: where it is not file descriptor 1 (a notebook, pytest's capture), Python-level
        # progress printers (litert-torch's) would still reach it
        with open(os.devnull, "w") as null, warnings.catch_warnings(), redirect_stdout(null), redirect_stderr(null):
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def exporter_reason(e: BaseException) -> str:
    """The first line of an exporter exception, shortened: the rest is often a dump of the graph."""
    lines = str(e).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_size: Tuple[int, int] = (224, 224),
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: Optional[Dict[str, str]] = None,
    name: Optional[str] = None,
) -> Path:
    """Export ``model`` (eval mode, batch 1, float32) to ``path`` with input ``input`` and output ``output``.

    Args:
        input_size: (H, W) of the traced input.
        dynamic: make batch, height and width symbolic so any size runs in ONNX Runtime.
        opset: ONNX opset.
        metadata: string key/values stored in the model's ``metadata_props``.
        name: the model's name in error messages (default: its architecture).

    Uses the TorchScript exporter: it traces CPUBone's shape arithmetic into the graph, so a dynamic
    export stays correct at sizes other than the traced one (the inference form's size-dependent pads
    and crops are recorded unconditionally under ``shape_general``). The file is written atomically.
    A model the exporter cannot convert raises ``ExportError`` with the exporter's reason in one line.
    """
    check_opset(opset)
    name = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    was_training = model.training
    model.eval()
    in_chans = getattr(model, "in_chans", 3)
    x = torch.randn(1, in_chans, *input_size)
    dynamic_axes = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}} if dynamic else None

    def write(tmp: Path) -> None:
        try:
            with quiet_exporter(), torch.no_grad(), shape_general(dynamic):
                torch.onnx.export(
                    model, (x,), str(tmp), input_names=["input"], output_names=["output"], opset_version=opset,
                    dynamic_axes=dynamic_axes, dynamo=False, do_constant_folding=True,
                )
        except OSError:
            raise  # the destination, not the model: atomic_write names the file
        except Exception as e:  # the exporter raises many types (TypeError, RuntimeError, its own errors)
            raise ExportError(f"{name}: ONNX export failed ({exporter_reason(e)})") from e
        if metadata:
            proto = onnx.load(str(tmp))
            for k, v in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = str(k), str(v)
            onnx.save(proto, str(tmp))

    try:
        return atomic_write(path, write)
    finally:
        model.train(was_training)


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def add_metadata(path: Union[str, os.PathLike], meta: Mapping[str, str]) -> None:
    """Add string key/values to an ONNX file's ``metadata_props`` (keys already there are kept as they are)."""
    proto = onnx.load(str(path))
    have = {p.key for p in proto.metadata_props}
    for k, v in meta.items():
        if k not in have:
            e = proto.metadata_props.add()
            e.key, e.value = str(k), str(v)
    onnx.save(proto, str(path))
