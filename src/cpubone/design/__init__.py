"""``cpubone design``: the best CPUBone-style backbone for a CPU and a latency budget.

``lut`` measures every unit of the design space on the target CPU into a portable table, ``predict``
adds a design's entries up, ``search`` maximises an accuracy proxy under a latency budget; a design is a
config that ``cpubone.create_model`` (and every command taking a model name) accepts.
"""
from .._lazy import lazy_attributes

_LAZY = {
    "LatencyTable": ".lut", "LutError": ".lut", "build_lut": ".lut", "load_lut": ".lut",
    "Prediction": ".predict", "predict": ".predict",
    "SearchSpace": ".search", "SearchResult": ".search", "search": ".search", "accuracy_proxy": ".search",
    "proxy_evidence": ".search", "space_units": ".search", "released_units": ".search",
    "Unit": ".units", "model_units": ".units",
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
