"""Design configs: a CPUBone architecture as a JSON file, accepted wherever a model name is.

A config lists the constructor's architecture arguments (``ARCH_KEYS``); per-stage keys take one value
or four (stages 1-4). ``"base"`` names a released variant whose values fill every key the config does
not set, so a design reads as "B0 with these changes"::

    {"name": "b0_deeper", "base": "cpubone_b0", "depths": [0, 1, 1, 4, 5]}

The released variants are configs in the same format (``variant_config("cpubone_b0")``). Optional
``"input_size": [H, W]`` records the size a design was made for (it becomes the model's
``pretrained_cfg["input_size"]``). A directory written by ``save_pretrained`` is a config source too: its
``config.json`` carries the architecture under ``"model_config"``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from .cpubone import ARCH_KEYS, VARIANTS, arch_args

__all__ = ["ConfigError", "CONFIG_FORMAT", "is_config_source", "load_config", "variant_config", "save_config",
           "config_name"]

CONFIG_FORMAT = "cpubone-config/1"
META_KEYS = ("format", "name", "base", "input_size", "description", "notes")
ConfigSource = Union[str, os.PathLike, Mapping[str, Any]]


class ConfigError(ValueError):
    """A design config that cannot be read or cannot build a model (the message names file and key)."""


def is_config_source(name: Any) -> bool:
    """True for a config dict, a ``.json`` path, or a directory holding a saved design's config.json."""
    if isinstance(name, Mapping):
        return True
    if not isinstance(name, (str, os.PathLike)):
        return False
    path = Path(name)
    if str(name).endswith(".json"):
        return True
    return path.is_dir() and (path / "config.json").is_file()


def variant_config(name: str) -> Dict[str, Any]:
    """The released variant ``name`` as a complete config (every architecture key set)."""
    if name not in VARIANTS:
        raise ConfigError(f"base {name!r}: not a released variant ({', '.join(VARIANTS)})")
    return dict(format=CONFIG_FORMAT, name=name, **arch_args(**VARIANTS[name].model_args()))


def _read(source: ConfigSource) -> tuple:
    """(raw dict, label used in messages)."""
    if isinstance(source, Mapping):
        return dict(source), "config"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{source}: no such config file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if "model_config" in raw:  # written by save_pretrained
        if not isinstance(raw["model_config"], dict):
            raise ConfigError(f"{path}: key 'model_config' is not an object")
        inner = dict(raw["model_config"])
        arch = (raw.get("pretrained_cfg") or {}).get("architecture")
        if arch and "name" not in inner:
            inner["name"] = arch
        return inner, str(path)
    if "architecture" in raw and not set(ARCH_KEYS) & set(raw):
        raise ConfigError(f"{path}: a saved model without a design config (key 'model_config'); load it with "
                          f"create_model({raw['architecture']!r}, pretrained=...)")
    return raw, str(path)


def load_config(source: ConfigSource) -> Dict[str, Any]:
    """Read, complete (from ``base``) and check a design config; returns every architecture key plus
    ``name`` and, if given, ``input_size``. Raises ``ConfigError`` naming the file and the key."""
    raw, label = _read(source)
    unknown = sorted(set(raw) - set(ARCH_KEYS) - set(META_KEYS))
    if unknown:
        raise ConfigError(f"{label}: unknown key {unknown[0]!r} (known: {', '.join(ARCH_KEYS + META_KEYS)})")
    if raw.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
        raise ConfigError(f"{label}: format {raw['format']!r} is not {CONFIG_FORMAT!r}")
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{label}: key 'base' must be a variant name")
    if base is not None:
        try:
            args = {k: v for k, v in variant_config(base).items() if k in ARCH_KEYS}
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None
    else:
        missing = [k for k in ("widths", "depths") if k not in raw]
        if missing:
            raise ConfigError(f"{label}: missing key {missing[0]!r} (or a 'base' variant to take it from)")
        args = {}
    args.update({k: raw[k] for k in ARCH_KEYS if k in raw})
    try:
        arch = arch_args(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{label}: {e}") from None
    out: Dict[str, Any] = dict(format=CONFIG_FORMAT, name=str(raw.get("name") or base or "cpubone_design"), **arch)
    if "input_size" in raw:
        size = raw["input_size"]
        if (not isinstance(size, list) or len(size) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 32 for s in size)):
            raise ConfigError(f"{label}: key 'input_size'={size!r}: expected [H, W], each at least 32")
        out["input_size"] = size
    for key in ("description", "notes"):
        if key in raw:
            out[key] = raw[key]
    return out


def config_name(source: ConfigSource) -> str:
    """The name a config source goes by in reports: its ``name`` key, else the file name."""
    try:
        return load_config(source)["name"]
    except ConfigError:
        return Path(str(source)).stem if not isinstance(source, Mapping) else "cpubone_design"


def save_config(config: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write a (checked, completed) config as indented JSON; returns the path."""
    cfg = load_config(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # one key per line, lists on one line: a config reads like the variant table
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in cfg.items()) + "\n}\n"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def config_model_args(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``CPUBone`` constructor arguments of a loaded config."""
    return {k: config[k] for k in ARCH_KEYS}


def config_input_size(config: Mapping[str, Any]) -> Optional[tuple]:
    size = config.get("input_size")
    return (3, int(size[0]), int(size[1])) if size else None
