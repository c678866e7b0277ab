"""Measurement tools: MACs, latency, MACpS, block sweeps."""
from .macs import count_macs, count_params, MacReport

__all__ = ["count_macs", "count_params", "MacReport"]
