"""Checkpoints: safe loading, the authors' and timm's layouts converted to ours, our safetensors format.

Three layouts are recognised:

* ``official`` - the authors' release (``evalmodel.pt``): keys under ``backbone.input_stem``,
  ``backbone.stages.<s>.op_list.<i>`` and ``head.op_list``. Their models were built with research
  flags; every released checkpoint was trained with ``fastit`` (fused blocks, fused downsampling, MLP
  ratio 4, the attention's output 1x1 folded into its upsampling module), ``grouping=2``,
  ``smallk_only_lasts`` (2x2 kernels in stages 3-4) and ``lose_transpose`` (nearest upsampling);
  ``bigit`` gives the expand-6 downsampling of B1-B3 and ``huge_model`` B3's stem blocks. In our
  modules those are the explicit arguments ``expand_groups=2``, ``small_kernels=True``,
  ``downsample_expand_ratio=6`` and ``depths[0]`` / ``stem_expand_ratio``.
* ``timm`` - ``timm.models.cpubone`` (``stem.0.conv.weight``, ``stages.<s>.<i>.total...``). Its
  ``_bfrobust`` and ``_dwnorm`` variants add BatchNorms after the unfused local block's expand and/or
  depthwise convs; they are folded into those convs here (exact in eval mode).
* ``cpubone`` - ours (``stem.conv.conv.weight``), also saved as safetensors + JSON config.

Nothing here unpickles arbitrary objects: ``.pt``/``.pth``/``.bin`` files go through
``torch.load(weights_only=True)``, which refuses any pickled code.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "detect_layout",
    "convert_state_dict",
    "load_checkpoint",
    "save_pretrained",
    "read_pretrained_config",
    "atomic_torch_save",
]

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_BN_EPS = 1e-5  # nn.BatchNorm2d default, used by both the release and timm


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what and where."""


# --- reading ----------------------------------------------------------------------------------
def read_state_dict(path: PathLike) -> StateDict:
    """Read tensors from a checkpoint file or one of our model directories, without running pickled code.

    Accepts safetensors, and torch pickles (``.pt``/``.pth``/``.bin``/``.ckpt``) that hold nothing but
    tensors and plain containers; a bare state dict or one wrapped under ``state_dict``, ``model``,
    ``state_dict_ema`` or ``model_ema`` (DDP's ``module.`` prefix is stripped).
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    kind = _file_kind(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncation / bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if kind == "empty":
        raise CheckpointError(f"{path}: not a checkpoint: the file is empty")
    if kind == "other":
        with open(path, "rb") as f:
            head = f.read(8)
        raise CheckpointError(f"{path}: not a checkpoint: neither safetensors nor a file written by torch.save "
                              f"(it starts with bytes {head.hex(' ')})")
    if kind == "pickle":
        # torch.load would try it as torch's legacy format; unpickling it ourselves could run its code
        raise CheckpointError(f"{path}: refused to load: a plain Python pickle, not a torch.save file, and "
                              f"unpickling it could execute arbitrary code. Save the state dict with torch.save "
                              f"or safetensors.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _weights_only_reason(e)
        if "Unsupported operand" in reason:  # bytes that are no pickle opcode: damage, not a forbidden object
            raise CheckpointError(f"{path}: cannot read the checkpoint (truncated or corrupt?): {reason}") from e
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled Python objects other than tensors, and "
            f"loading them could execute arbitrary code. Re-save only the state dict (tensors) or use "
            f"safetensors. Details: {reason}"
        ) from e
    except (EOFError, RuntimeError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint (truncated or corrupt?): {_first_line(e)}") from e
    return _unwrap(obj, path)


# torch.save writes a zip archive; before torch 1.6 (and with _use_new_zipfile_serialization=False) a pickle
# stream that starts with a pickled magic number
_TORCH_ZIP_HEAD = b"PK\x03\x04"
_TORCH_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _file_kind(path: Path) -> str:
    """'safetensors', 'torch' (a torch.save file), 'pickle' (some other pickle), 'empty' or 'other'."""
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY_HEAD))
    if path.suffix == ".safetensors" or _is_safetensors(path):
        return "safetensors"
    if not head:
        return "empty"
    if head.startswith(_TORCH_ZIP_HEAD) or head == _TORCH_LEGACY_HEAD:
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode of pickle protocols 2-5
        return "pickle"
    return "other"


def _weights_only_reason(e: BaseException) -> str:
    """The line of torch's weights-only refusal that says what it met (its other lines are boilerplate)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(boilerplate)), _first_line(e))


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _is_safetensors(path: Path) -> bool:
    # safetensors files start with an 8-byte little-endian header length followed by '{'
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _unwrap(obj: Any, path: Union[Path, str] = "<state dict>") -> StateDict:
    if isinstance(obj, Mapping):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                # prefer EMA weights only when they are the sole weights; the authors save 'state_dict'
                if key.endswith("ema") and ("state_dict" in obj or "model" in obj):
                    continue
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: no state dict found (got {type(obj).__name__})")
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue  # metadata entries
        sd[k[len("module."):] if k.startswith("module.") else k] = v
    if not sd:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return sd


# --- layouts ----------------------------------------------------------------------------------
def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'official', 'timm' or 'cpubone'; raises ``CheckpointError`` for anything else."""
    keys = state_dict.keys()
    if any(k.startswith(("backbone.input_stem.", "backbone.stages.", "head.op_list.")) for k in keys):
        return "official"
    if "stem.conv.conv.weight" in keys:
        return "cpubone"
    if "stem.0.conv.weight" in keys:
        return "timm"
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(f"unrecognised checkpoint layout (not CPUBone official, timm or ours); first keys: {sample}")


def _official_to_timm_names(key: str) -> str:
    """The authors' module paths -> timm's (which differ only in container names)."""
    key = key.replace("head.op_list.0.", "head.in_conv.")
    key = key.replace("head.op_list.2.", "head.pre_classifier.")
    key = key.replace("head.op_list.3.", "head.classifier.")
    key = key.replace("backbone.input_stem.", "stem.").replace("backbone.stages.", "stages.")
    key = key.replace(".op_list.", ".")
    key = key.replace(".pwise.0.", ".pwise.")
    key = key.replace(".conv_proj.0.", ".conv_proj.conv.").replace(".conv_proj.1.", ".conv_proj.norm.")
    return key


_BLOCK_PARTS = (
    ("spatial_conv.", "conv_exp."),
    ("point_conv.", "conv_pwl."),
    ("inverted_conv.", "conv_pw."),
    ("depth_conv.", "conv_dw."),
)
_ATTN_PARTS = (
    ("total.0.0.main.0.", "norm1."),
    ("total.0.0.main.1.conv_proj.", "attn.proj."),
    ("total.0.0.main.1.pwise.", "attn.qkv."),
    ("total.0.0.main.1.upsampling.0.", "attn.out."),
    ("total.0.1.main.0.", "norm2."),
    ("total.0.1.main.1.", "mlp.fc1."),
    ("total.0.1.main.3.", "mlp.fc2."),
    ("total.1.main.", "local."),
)
_HEAD = (
    ("head.in_conv.", "head.conv."),
    ("head.pre_classifier.linear.", "head.pre_fc."),
    ("head.pre_classifier.norm.", "head.pre_norm."),
    ("head.classifier.linear.", "head.fc."),
)
_STEM_RE = re.compile(r"^stem\.(\d+)\.(?:main\.)?(.*)$")
_STAGE_RE = re.compile(r"^stages\.(\d+)\.(\d+)\.(.*)$")
_PADDED_CONV_RE = re.compile(r"(^|\.)conv\.1\.")


def _timm_to_ours_name(key: str) -> Optional[str]:
    for old, new in _HEAD:
        if key.startswith(old):
            return new + key[len(old):]
    m = _STEM_RE.match(key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        prefix = "stem.conv." if i == 0 else f"stem.blocks.{i - 1}."
        return prefix + _block_rest(rest)
    m = _STAGE_RE.match(key)
    if m:
        s, i, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        prefix = f"stages.{s}.downsample." if i == 0 else f"stages.{s}.blocks.{i - 1}."
        if rest.startswith("main."):
            return prefix + _block_rest(rest[len("main."):])
        for old, new in _ATTN_PARTS:
            if rest.startswith(old):
                return prefix + new + _block_rest(rest[len(old):])
    return None


def _block_rest(rest: str) -> str:
    for old, new in _BLOCK_PARTS:
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    # the release wraps padded 2x2 convs as Sequential(ZeroPad2d, Conv2d): index 1 is the conv
    return _PADDED_CONV_RE.sub(r"\1conv.", rest, count=1)


def _fold_extra_norms(sd: StateDict, model_keys: Optional[set]) -> StateDict:
    """Fold BatchNorms that our layout does not have (timm's _bfrobust/_dwnorm) into the conv before them."""
    folded = dict(sd)
    prefixes = {k[: -len(".norm.running_var")] for k in sd if k.endswith(".norm.running_var")}
    for p in sorted(prefixes):
        if model_keys is not None and f"{p}.norm.running_var" in model_keys:
            continue
        if model_keys is None and not p.endswith((".conv_pw", ".conv_dw")):
            continue
        w = folded.pop(f"{p}.conv.weight")
        b = folded.pop(f"{p}.conv.bias", None)
        gamma, beta = folded.pop(f"{p}.norm.weight"), folded.pop(f"{p}.norm.bias")
        mean, var = folded.pop(f"{p}.norm.running_mean"), folded.pop(f"{p}.norm.running_var")
        folded.pop(f"{p}.norm.num_batches_tracked", None)
        scale = gamma / torch.sqrt(var + _BN_EPS)
        folded[f"{p}.conv.weight"] = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
        bias = b if b is not None else torch.zeros_like(mean)
        folded[f"{p}.conv.bias"] = (bias - mean) * scale + beta
    return folded


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: Optional[nn.Module] = None) -> StateDict:
    """Any recognised CPUBone layout -> ours. Keys that have no counterpart are kept unchanged (and then
    reported by ``load_checkpoint``)."""
    sd = _unwrap(state_dict)
    layout = detect_layout(sd)
    if layout == "cpubone":
        return sd
    if layout == "official":
        if any(".o_proj." in k for k in sd) or any("upsampling.0.weight" in k and v.ndim == 4 and v.shape[-1] > 1 for k, v in sd.items()):
            raise CheckpointError(
                "official checkpoint trained without `fastit`/`lose_transpose` (separate o_proj or transposed-conv "
                "upsampling): not a released CPUBone layout"
            )
        sd = {_official_to_timm_names(k): v for k, v in sd.items()}
    out: StateDict = {}
    for k, v in sd.items():
        new = _timm_to_ours_name(k)
        out[new if new is not None else k] = v
    model_keys = set(model.state_dict().keys()) if model is not None else None
    return _fold_extra_norms(out, model_keys)


# --- loading into a model -----------------------------------------------------------------------
def _model_name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _guess_variant(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    from .cpubone import VARIANTS, CPUBone

    shapes = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("head.fc.")}
    with torch.device("meta"):
        for name, cfg in VARIANTS.items():
            ref = {k: tuple(v.shape) for k, v in CPUBone(**cfg.model_args()).state_dict().items()
                   if not k.startswith("head.fc.")}
            if ref == shapes:
                return name
    return None


def load_checkpoint(
    model: nn.Module,
    checkpoint: Union[PathLike, Mapping[str, torch.Tensor]],
    strict: bool = True,
    drop_classifier: bool = False,
) -> Dict[str, Any]:
    """Load a checkpoint (file, our directory, or state dict) of any recognised layout into ``model``.

    Args:
        model: a ``CPUBone``.
        checkpoint: path or state dict.
        strict: every model key must be filled and every checkpoint key used, with equal shapes.
        drop_classifier: ignore the checkpoint's final classifier (fine-tuning to other classes).

    Returns a dict with the detected ``layout`` and the ``missing`` / ``unexpected`` keys (non-strict).
    Raises ``CheckpointError`` naming the variant and the offending keys and shapes.
    """
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
    raw = read_state_dict(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else _unwrap(checkpoint)
    try:
        layout = detect_layout(raw)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    sd = convert_state_dict(raw, model)
    own = model.state_dict()
    if drop_classifier:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.fc.")}
        own_keys = {k for k in own if not k.startswith("head.fc.")}
    else:
        own_keys = set(own)
    missing = sorted(own_keys - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own) if sd[k].shape != own[k].shape
    )
    if mismatched or (strict and (missing or unexpected)):
        name = _model_name(model)
        guess = _guess_variant(sd)
        lines = [f"{source} ({layout} layout) does not fit {name}:"]
        if guess and guess != name:
            lines.append(f"  its shapes are those of {guess}")
        for title, items in (("shape mismatches", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)):
            if items:
                shown = "\n    ".join(items[:8]) + (f"\n    ... and {len(items) - 8} more" if len(items) > 8 else "")
                lines.append(f"  {len(items)} {title}:\n    {shown}")
        raise CheckpointError("\n".join(lines))
    sd = {k: v.to(own[k].dtype) for k, v in sd.items() if k in own}
    model.load_state_dict(sd, strict=False)
    return dict(layout=layout, missing=missing, unexpected=unexpected)


def atomic_torch_save(state: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a kill at any
    moment leaves either the old or the new file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# --- our format -----------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, directory: PathLike, extra_config: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory`` (atomically, file by file).

    The config is also stored in the safetensors metadata, so the weights file alone is self-describing.
    It holds the model's ``pretrained_cfg``, class names (``label_names``, timm's key) included, which
    ``create_model(name, pretrained=directory)`` restores and ``cpubone export`` / ``predict`` show.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    cfg = dict(getattr(model, "pretrained_cfg", {}))
    labels = cfg.get("label_names")
    num_classes = getattr(model, "num_classes", None)
    if labels is not None and num_classes and len(labels) != num_classes:
        raise ValueError(f"pretrained_cfg['label_names'] has {len(labels)} names for a model with {num_classes} classes")
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(
        architecture=cfg.get("architecture"),
        num_classes=getattr(model, "num_classes", None),
        in_chans=getattr(model, "in_chans", 3),
        global_pool=getattr(getattr(model, "head", None), "global_pool", "avg"),
        pretrained_cfg={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
    )
    if getattr(model, "model_config", None):  # the architecture: create_model(directory) rebuilds it
        config["model_config"] = dict(model.model_config)
    if extra_config:
        config.update(extra_config)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    text = json.dumps(config, indent=2, default=str)
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"cpubone_config": text})
    os.replace(tmp, directory / WEIGHTS_NAME)
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, directory / CONFIG_NAME)
    return directory


def read_pretrained_config(path: PathLike) -> Optional[Dict[str, Any]]:
    """The config saved by ``save_pretrained`` (from config.json or the safetensors metadata), or None."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return _parse_config((path / CONFIG_NAME).read_text(), path / CONFIG_NAME)
        path = path / WEIGHTS_NAME
    if path.is_file() and (path.suffix == ".safetensors" or _is_safetensors(path)):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # safetensors' own error types; read_state_dict reports the damaged file
            return None
        if "cpubone_config" in meta:
            return _parse_config(meta["cpubone_config"], path)
    return None


def _parse_config(text: str, source: Path) -> Dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: the saved model config is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: the saved model config is not a JSON object")
    return config
