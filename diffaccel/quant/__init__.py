"""Quantization formats (``formats``), calibrated recipes (``recipe``) and the calibration
methods (``calibrate`` subpackage; the function is ``diffaccel.calibrate``)."""
from .formats import PRESETS, QuantSpec, resolve_spec  # first: calibrate -> nn -> quant.formats
from .recipe import QuantRecipe, RecipeError, build_quantized_modules

__all__ = ["PRESETS", "QuantSpec", "resolve_spec", "QuantRecipe", "RecipeError", "build_quantized_modules"]
