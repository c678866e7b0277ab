"""One factory for CPUBone and its peers: our variants and design configs are built here, any other
name goes to timm."""
from __future__ import annotations

import fnmatch
import os
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch.nn as nn

from .checkpoints import CheckpointError, load_checkpoint, read_pretrained_config, read_state_dict
from .config import config_input_size, config_model_args, is_config_source, load_config
from .cpubone import VARIANTS, CPUBone, default_cfg

__all__ = ["create_model", "list_models", "is_cpubone", "pretrained_weights_file"]

TIMM_PREFIX = "timm/"


def list_models(pattern: str = "*") -> List[str]:
    """Names of our CPUBone variants matching a shell-style ``pattern``."""
    return [n for n in VARIANTS if fnmatch.fnmatch(n, pattern)]


def is_cpubone(name: Any) -> bool:
    """True for a released variant name or a design config (dict, ``.json`` file, saved design directory)."""
    if is_config_source(name):
        return True
    return isinstance(name, str) and name.split(".")[0] in VARIANTS


def pretrained_weights_file(name: str) -> str:
    """Download (or find in the Hugging Face cache) timm's weights for variant ``name``.

    Honours the usual huggingface_hub settings (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``).
    """
    from huggingface_hub import hf_hub_download

    cfg = VARIANTS[name]
    try:
        return hf_hub_download(cfg.hf_hub_id, "model.safetensors")
    except Exception as e:
        raise CheckpointError(
            f"{name}: could not get pretrained weights {cfg.hf_hub_id}/model.safetensors from the Hugging Face "
            f"Hub or its local cache ({type(e).__name__}: {e}). Pass a local file with pretrained=PATH."
        ) from e


def create_model(
    name: Union[str, os.PathLike, Mapping[str, Any]],
    pretrained: Union[bool, str, os.PathLike] = False,
    num_classes: Optional[int] = None,
    in_chans: Optional[int] = None,
    drop_rate: Optional[float] = None,
    drop_path_rate: Optional[float] = None,
    features_only: bool = False,
    out_indices: Optional[Sequence[int]] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: a CPUBone variant (``list_models()``); a design config (a dict, a ``.json`` file or a
            directory written by ``save_pretrained``, see ``cpubone.models.config``); or any timm model
            name (passed to ``timm.create_model``); prefix ``timm/`` forces timm, e.g.
            ``timm/cpubone_b0_bfrobust``.
        pretrained: False; True for the variant's timm weights from the Hugging Face Hub (for a saved
            design directory: its own weights); or a path to a checkpoint in any recognised layout (ours,
            the authors' ``evalmodel.pt``, timm's).
        num_classes: classifier outputs; with pretrained weights of another class count the classifier
            is newly initialised.
        in_chans: input channels; pretrained stem weights are adapted (timm's ``adapt_input_conv``).
        drop_rate / drop_path_rate: classifier dropout and stochastic depth.
        features_only / out_indices: return a feature extractor giving the stage outputs
            (strides 4, 8, 16, 32 for indices 0-3).
    """
    if is_config_source(name):
        design = load_config(name)
        if pretrained is True:
            if not (isinstance(name, (str, os.PathLike)) and os.path.isdir(name)):
                raise CheckpointError(f"{design['name']}: a design config has no published weights; "
                                      "pass pretrained=PATH to a checkpoint of it")
            pretrained = name  # a saved design directory holds its own weights
        variant, hf_hub_id = design["name"], ""
        model_args = config_model_args(design)
        input_size = config_input_size(design) or (3, 224, 224)
    else:
        name = str(name)
        base = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
        if name.startswith(TIMM_PREFIX) or not is_cpubone(name):
            return _create_timm(base, pretrained, num_classes, in_chans, drop_rate, drop_path_rate,
                                features_only, out_indices, **kwargs)
        variant = base.split(".")[0]
        cfg = VARIANTS[variant]
        model_args, hf_hub_id, input_size = cfg.model_args(), cfg.hf_hub_id, cfg.pretrained_input_size

    saved = read_pretrained_config(pretrained) if isinstance(pretrained, (str, os.PathLike)) else None
    ckpt_classes = (saved or {}).get("num_classes") or 1000
    want_classes = num_classes if num_classes is not None else (ckpt_classes if pretrained else 1000)
    want_chans = in_chans if in_chans is not None else 3
    args = dict(model_args, **kwargs)
    if drop_rate is not None:
        args["drop_rate"] = drop_rate
    if drop_path_rate is not None:
        args["drop_path_rate"] = drop_path_rate
    # build with the checkpoint's head and stem, then adapt: keeps loading strict
    model = CPUBone(num_classes=ckpt_classes if pretrained else want_classes, in_chans=3 if pretrained else want_chans, **args)
    model.pretrained_cfg = default_cfg(architecture=variant, hf_hub_id=hf_hub_id, input_size=tuple(input_size),
                                       pool_size=tuple(s // 32 for s in input_size[1:]))
    if pretrained:
        if pretrained is True:
            source: Union[str, os.PathLike] = pretrained_weights_file(variant)
        else:
            source = pretrained
        sd = read_state_dict(source)
        fc = sd.get("head.fc.weight", sd.get("head.classifier.linear.weight", sd.get("head.op_list.3.linear.weight")))
        if fc is not None and fc.shape[0] != model.num_classes:
            model.reset_classifier(fc.shape[0])
        if num_classes is None and fc is not None:
            want_classes = fc.shape[0]  # no saved config (e.g. a .pt): keep the checkpoint's classifier
        load_checkpoint(model, sd)
        if saved and saved.get("pretrained_cfg"):
            model.pretrained_cfg.update({k: tuple(v) if isinstance(v, list) else v
                                         for k, v in saved["pretrained_cfg"].items()})
        if want_classes != model.num_classes:
            model.reset_classifier(want_classes)
        if want_chans != 3:
            _adapt_stem(model, want_chans)
    model.pretrained_cfg["num_classes"] = model.num_classes
    if features_only:
        from timm.models._features import FeatureGetterNet

        return FeatureGetterNet(model, out_indices=tuple(out_indices) if out_indices is not None else (0, 1, 2, 3))
    return model


def _adapt_stem(model: CPUBone, in_chans: int) -> None:
    from timm.models import adapt_input_conv

    conv = model.stem.conv.conv
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    new.weight.data = adapt_input_conv(in_chans, conv.weight.data)
    model.stem.conv.conv = new
    model.in_chans = in_chans


def _create_timm(name, pretrained, num_classes, in_chans, drop_rate, drop_path_rate, features_only,
                 out_indices, **kwargs) -> nn.Module:
    import timm

    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise ValueError(
            f"unknown model {name!r}: not a CPUBone variant ({', '.join(VARIANTS)}) and not a timm model"
        )
    args = dict(kwargs)
    for key, val in (("num_classes", num_classes), ("in_chans", in_chans), ("drop_rate", drop_rate),
                     ("drop_path_rate", drop_path_rate)):
        if val is not None:
            args[key] = val
    if features_only:
        args["features_only"] = True
        if out_indices is not None:
            args["out_indices"] = tuple(out_indices)
    if isinstance(pretrained, (str, os.PathLike)):
        return timm.create_model(name, pretrained=False, checkpoint_path=str(pretrained), **args)
    return timm.create_model(name, pretrained=bool(pretrained), **args)
