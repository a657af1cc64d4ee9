"""Quantization formats (``formats``); calibration lives in ``calibrate``/``recipe``."""
from .formats import PRESETS, QuantSpec, resolve_spec

__all__ = ["PRESETS", "QuantSpec", "resolve_spec"]
