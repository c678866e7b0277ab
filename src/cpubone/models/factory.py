"""One factory for CPUBone and its peers: our variants and design configs are built here, any other
name goes to timm."""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn

from .checkpoints import (
    CheckpointError,
    load_checkpoint,
    read_pretrained_config,
    read_state_dict,
)
from .config import config_input_size, config_model_args, is_config_source, load_config
from .cpubone import VARIANTS, CPUBone, default_cfg

__all__ = ["create_model", "list_models", "resolve_model_name", "ResolvedName", "is_cpubone",
           "pretrained_weights_file"]

TIMM_PREFIX = "timm/"


def list_models(pattern: str = "*") -> List[str]:
    """Names of our CPUBone variants matching a shell-style ``pattern``."""
    return [n for n in VARIANTS if fnmatch.fnmatch(n, pattern)]


@dataclass(frozen=True)
class ResolvedName:
    """What a model name means.

    Attributes:
        source: ``"cpubone"`` for our variants, ``"config"`` for a design config, ``"timm"`` for a model
            timm builds.
        name: for ``"cpubone"`` the variant (a key of ``VARIANTS``); for ``"config"`` the design's name;
            for ``"timm"`` the name to give ``timm.create_model`` (``timm/`` prefix removed, pretrained tag
            kept).
        config: for ``"config"`` the loaded design (every architecture key; ``cpubone.models.config``).
    """

    source: Literal["cpubone", "config", "timm"]
    name: str
    config: Optional[Dict[str, Any]] = field(default=None, compare=False, hash=False)


def resolve_model_name(name: Union[str, os.PathLike, Mapping[str, Any]]) -> ResolvedName:
    """The one place that decides which model a name means; every tool taking a model name goes through it.

    In order: a design config (a dict, a ``.json`` file, or a directory written by ``save_pretrained``)
    is ours, built from the config; ``timm/NAME`` is timm's model even where we have a variant of that
    name (e.g. ``timm/cpubone_b0_bfrobust``); a CPUBone variant, optionally with a pretrained tag
    (``cpubone_b0``, ``cpubone_b0.r224_in1k``), is ours; any other name timm registers (``resnet50``,
    ``resnet50.a1_in1k``) is timm's. Anything else raises a one-line ``ValueError`` (a ``ConfigError``
    naming the file and key for a config that cannot build a model).
    """
    if is_config_source(name):
        design = load_config(name)
        return ResolvedName("config", design["name"], design)
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string (a CPUBone variant or a timm model name), "
                         f"or a design config, got {name!r}")
    forced_timm = name.startswith(TIMM_PREFIX)
    base = name[len(TIMM_PREFIX):] if forced_timm else name
    if not forced_timm and base.split(".")[0] in VARIANTS:
        return ResolvedName("cpubone", base.split(".")[0])
    import timm

    if base and timm.is_model(base):
        return ResolvedName("timm", base)
    if forced_timm:
        raise ValueError(f"unknown model {name!r}: timm has no model {base!r} (timm.list_models())")
    raise ValueError(f"unknown model {name!r}: not a CPUBone variant ({', '.join(VARIANTS)}), not a design "
                     f"config (.json) and not a timm model (timm.list_models())")


def is_cpubone(name: Union[str, os.PathLike, Mapping[str, Any]]) -> bool:
    """Whether ``name`` means a CPUBone: one of our variants or a design config (``resolve_model_name``;
    unknown names raise)."""
    return resolve_model_name(name).source in ("cpubone", "config")


def pretrained_weights_file(name: str, cache_dir: Union[None, str, os.PathLike] = None,
                            hf_hub_id: Optional[str] = None, filename: Optional[str] = None) -> str:
    """Download (or find in the Hugging Face cache) timm's weights for variant ``name``.

    Honours the usual huggingface_hub settings (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``);
    ``cache_dir`` overrides the cache directory (timm's ``cache_dir`` argument). ``hf_hub_id`` and
    ``filename`` override the variant's repository and file (a ``pretrained_cfg``'s ``hf_hub_id`` and
    ``hf_hub_filename``).
    """
    from huggingface_hub import hf_hub_download

    repo = hf_hub_id or VARIANTS[name].hf_hub_id
    filename = filename or "model.safetensors"
    try:
        return hf_hub_download(repo, filename, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as e:
        raise CheckpointError(
            f"{name}: could not get pretrained weights {repo}/{filename} from the Hugging Face "
            f"Hub or its local cache ({type(e).__name__}: {e}). Pass a local file with pretrained=PATH."
        ) from e


# feature_cls values timm's builder takes (timm.models.build_model_with_cfg), and the wrapper each means
FEATURE_CLASSES = ("getter", "list", "dict", "hook", "fx")


def _feature_class(feature_cls: Any) -> type:
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureListNet
    from timm.models._features_fx import FeatureGraphNet

    classes = dict(getter=FeatureGetterNet, list=FeatureListNet, dict=FeatureDictNet, hook=FeatureHookNet,
                   fx=FeatureGraphNet)
    if feature_cls is None:
        return FeatureGetterNet
    if isinstance(feature_cls, str) and feature_cls.lower() in classes:
        return classes[feature_cls.lower()]
    if isinstance(feature_cls, type) and issubclass(feature_cls, tuple(classes.values())):
        return feature_cls
    raise ValueError(f"feature_cls={feature_cls!r}: expected one of {', '.join(FEATURE_CLASSES)} "
                     f"(or a subclass of timm's feature wrappers)")


def _user_pretrained_cfg(pretrained_cfg: Any, overlay: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The pretrained-config entries a caller set (timm's ``pretrained_cfg`` / ``pretrained_cfg_overlay``).

    ``pretrained_cfg`` is a pretrained tag (str, recorded as ``tag``), a dict or a timm ``PretrainedCfg``
    (its non-null fields); ``pretrained_cfg_overlay`` entries are applied last. Both update the variant's
    own config rather than replace it, so ``first_conv``/``classifier`` stay valid unless set.
    """
    out: Dict[str, Any] = {}
    if pretrained_cfg is None or pretrained_cfg == "" or pretrained_cfg == {}:
        pass
    elif isinstance(pretrained_cfg, str):
        out["tag"] = pretrained_cfg
    elif isinstance(pretrained_cfg, Mapping):
        out.update(pretrained_cfg)
    elif hasattr(pretrained_cfg, "to_dict"):  # timm.models.PretrainedCfg: its unset (None) fields keep ours
        out.update({k: v for k, v in pretrained_cfg.to_dict().items() if v is not None})
    else:
        raise ValueError(f"pretrained_cfg={pretrained_cfg!r}: expected a tag (str), a dict or a timm PretrainedCfg")
    if overlay is not None:
        if not isinstance(overlay, Mapping):
            raise ValueError(f"pretrained_cfg_overlay={overlay!r}: expected a dict")
        out.update(overlay)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def create_model(
    name: Union[str, os.PathLike, Mapping[str, Any]],
    pretrained: Union[bool, str, os.PathLike] = False,
    num_classes: Optional[int] = None,
    in_chans: Optional[int] = None,
    drop_rate: Optional[float] = None,
    drop_path_rate: Optional[float] = None,
    features_only: bool = False,
    out_indices: Union[None, int, Sequence[int]] = None,
    feature_cls: Any = None,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
    cache_dir: Union[None, str, os.PathLike] = None,
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
            (strides 4, 8, 16, 32 for indices 0-3). ``out_indices`` is a sequence of stage indices
            (negative ones count from the end) or, as in timm, an int ``n`` for the last ``n`` stages.
        feature_cls: the feature wrapper, as timm's builder takes it: ``"getter"`` (the default, timm's
            ``FeatureGetterNet`` over ``forward_intermediates``), ``"list"``, ``"dict"``, ``"hook"``,
            ``"fx"``, or one of timm's feature classes.
        pretrained_cfg / pretrained_cfg_overlay: timm's entry-point arguments: a pretrained tag (str),
            a dict or a timm ``PretrainedCfg``, and entries that override it. They update the model's
            ``pretrained_cfg``; its ``num_classes`` and ``input_size`` channels are the defaults of
            ``num_classes`` / ``in_chans``, and with ``pretrained=True`` its ``file``, ``state_dict`` or
            ``hf_hub_id`` (+ ``hf_hub_filename``) say where the weights come from.
        cache_dir: Hugging Face cache directory for ``pretrained=True`` (timm's ``cache_dir``).
        **kwargs: further ``CPUBone`` arguments (``global_pool``, ``proj_drop_rate``, ...); ``device``
            and ``dtype`` move the built model.

    Raises ``ValueError`` (one line) for an unknown name and for impossible arguments, ``CheckpointError``
    for weights that cannot be read or do not fit.
    """
    resolved = resolve_model_name(name)
    if out_indices is not None and not features_only:
        raise ValueError(f"out_indices={out_indices!r} is only used with features_only=True")
    if feature_cls is not None and not features_only:
        raise ValueError(f"feature_cls={feature_cls!r} is only used with features_only=True")
    if features_only:
        out_indices = _check_out_indices(out_indices)
    if resolved.source == "timm":
        _check_counts(num_classes, in_chans)
        for key, val in (("feature_cls", feature_cls), ("pretrained_cfg", pretrained_cfg),
                         ("pretrained_cfg_overlay", pretrained_cfg_overlay), ("cache_dir", cache_dir)):
            if val is not None:
                kwargs[key] = val
        return _create_timm(resolved.name, pretrained, num_classes, in_chans, drop_rate, drop_path_rate,
                            features_only, out_indices, **kwargs)

    wrapper = _feature_class(feature_cls) if features_only else None
    user_cfg = _user_pretrained_cfg(pretrained_cfg, pretrained_cfg_overlay)
    # as timm's builder: the pretrained config's class count and input channels are the defaults
    if num_classes is None and isinstance(user_cfg.get("num_classes"), int) and user_cfg["num_classes"] >= 0:
        num_classes = user_cfg["num_classes"]
    if in_chans is None and user_cfg.get("input_size") is not None:
        in_chans = user_cfg["input_size"][0]
    _check_counts(num_classes, in_chans)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    weights_cfg = {k: user_cfg[k] for k in ("file", "state_dict", "hf_hub_id", "hf_hub_filename") if user_cfg.get(k)}

    variant = resolved.name
    if resolved.source == "config":
        design = resolved.config
        if pretrained is True and not weights_cfg:
            if not (isinstance(name, (str, os.PathLike)) and os.path.isdir(name)):
                raise CheckpointError(f"{variant}: a design config has no published weights; "
                                      "pass pretrained=PATH to a checkpoint of it")
            pretrained = name  # a saved design directory holds its own weights
        model_args, hf_hub_id = config_model_args(design), ""
        input_size = config_input_size(design) or (3, 224, 224)
    else:
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
        if pretrained is not True:
            sd = read_state_dict(pretrained)
        elif "state_dict" in weights_cfg:
            sd = dict(weights_cfg["state_dict"])
        elif "file" in weights_cfg:
            sd = read_state_dict(weights_cfg["file"])
        else:
            sd = read_state_dict(pretrained_weights_file(
                variant, cache_dir, weights_cfg.get("hf_hub_id"), weights_cfg.get("hf_hub_filename")))
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
            model.pretrained_cfg.pop("label_names", None)  # a new classifier: the saved names no longer apply
        if want_chans != 3:
            _adapt_stem(model, want_chans)
    # the caller's entries last (timm applies them over the registry's config); the weights are not kept
    model.pretrained_cfg.update({k: v for k, v in user_cfg.items() if k != "state_dict"})
    model.pretrained_cfg["num_classes"] = model.num_classes
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    if features_only:
        return _features(model, wrapper, out_indices, variant)
    return model


def _features(model: CPUBone, wrapper: type, out_indices: Union[None, int, Tuple[int, ...]], name: str) -> nn.Module:
    """``model`` in one of timm's feature wrappers, with the attributes timm's builder gives it."""
    from timm.models._builder import pretrained_cfg_for_features
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, feature_take_indices

    stages = len(model.feature_info)
    indices = stages if out_indices is None else out_indices
    _check_stage_range(indices, stages, name)
    cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    in_chans = model.in_chans
    if issubclass(wrapper, FeatureGetterNet):
        net = wrapper(model, out_indices=indices)
    else:
        # the wrappers that rebuild the model from its children find the stages one Sequential deep
        take = tuple(feature_take_indices(stages, list(indices) if isinstance(indices, tuple) else indices)[0])
        extra = dict(flatten_sequential=True) if issubclass(wrapper, (FeatureDictNet, FeatureHookNet)) else {}
        net = wrapper(model, out_indices=take, **extra)
    net.pretrained_cfg = cfg
    net.default_cfg = cfg  # timm's older name, set by its builder too
    net.in_chans = in_chans
    return net


def _check_counts(num_classes: Optional[int], in_chans: Optional[int]) -> None:
    # checked up front: torch builds layers with zero channels without complaint and fails only on the first input
    if in_chans is not None and (not isinstance(in_chans, int) or in_chans < 1):
        raise ValueError(f"in_chans={in_chans!r}: the number of input channels must be a positive integer")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
        raise ValueError(f"num_classes={num_classes!r}: must be a positive integer, or 0 for no classifier")


def _check_out_indices(out_indices: Any) -> Union[None, int, Tuple[int, ...]]:
    """None (all stages), an int n (the last n stages, as timm reads it), or a non-empty tuple of stage indices."""
    if out_indices is None:
        return None
    if isinstance(out_indices, int) and not isinstance(out_indices, bool):
        if out_indices < 1:
            raise ValueError(f"out_indices={out_indices}: an int n takes the last n stages, so it must be at least 1")
        return out_indices
    try:
        indices = tuple(out_indices)
    except TypeError:
        raise ValueError(f"out_indices={out_indices!r}: expected stage indices such as (1, 2, 3), or an int n "
                         f"for the last n stages") from None
    if not indices:
        raise ValueError("out_indices=(): name at least one stage, e.g. (1, 2, 3), or pass an int n for the "
                         "last n stages")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"out_indices={out_indices!r}: stage indices must be integers")
    if len(set(indices)) != len(indices):
        raise ValueError(f"out_indices={indices}: a stage is named twice")
    return indices


def _adapt_stem(model: CPUBone, in_chans: int) -> None:
    from timm.models import adapt_input_conv

    conv = model.stem.conv.conv
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    new.weight.data = adapt_input_conv(in_chans, conv.weight.data)
    model.stem.conv.conv = new
    model.in_chans = in_chans


def _check_stage_range(indices: Union[int, Tuple[int, ...]], stages: int, name: str) -> None:
    if isinstance(indices, int):
        if indices > stages:
            raise ValueError(f"out_indices={indices}: {name} has {stages} stages, so the last n can be 1 to {stages}")
        return
    bad = [i for i in indices if not -stages <= i < stages]
    if bad:
        raise ValueError(f"out_indices={indices}: {name} has {stages} stages, indices 0 to {stages - 1} "
                         f"(or -{stages} to -1 from the end); {bad[0]} is out of range")


def _create_timm(name, pretrained, num_classes, in_chans, drop_rate, drop_path_rate, features_only,
                 out_indices, **kwargs) -> nn.Module:
    import timm

    args = dict(kwargs)
    for key, val in (("num_classes", num_classes), ("in_chans", in_chans), ("drop_rate", drop_rate),
                     ("drop_path_rate", drop_path_rate)):
        if val is not None:
            args[key] = val
    if features_only:
        args["features_only"] = True
        if out_indices is not None:
            args["out_indices"] = out_indices
    try:
        if isinstance(pretrained, (str, os.PathLike)):
            return timm.create_model(name, pretrained=False, checkpoint_path=str(pretrained), **args)
        return timm.create_model(name, pretrained=bool(pretrained), **args)
    except (AssertionError, IndexError) as e:
        if out_indices is None:
            raise
        # timm checks the indices against the model's stages with an assert (or indexes past the end)
        raise ValueError(f"out_indices={out_indices}: does not fit the feature stages of {name} "
                         f"({e or type(e).__name__})") from None
