"""Measurement tools: MACs, latency, MACpS, block sweeps."""
from ..models.macs import MacReport, count_macs, count_params

__all__ = ["count_macs", "count_params", "MacReport"]
