"""Attributes that import their module on first use (PEP 562).

Used by the package ``__init__`` files so that torch-free parts (the ONNX predictor, the command line's
start-up) import without pulling in torch.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Mapping, Tuple


def lazy_attributes(package: str, names: Mapping[str, str], module_globals: Dict[str, Any]
                    ) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` resolving ``names`` (attribute -> relative module)."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(set(module_globals) | set(names))

    return __getattr__, __dir__
