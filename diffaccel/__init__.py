"""diffaccel: fused attention, quantized layers and fused solver steps for diffusion models."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers the custom ops)
from ._info import info  # noqa: E402
from .patch import PatchReport, is_patched, patch, unpatch  # noqa: E402
from .solvers import patch_scheduler, unpatch_scheduler  # noqa: E402

# Calibration pulls in SciPy and the reconstruction machinery: loaded on first use.
_LAZY = {"calibrate": ("diffaccel.quant.calibrate", "calibrate"),
         "QuantRecipe": ("diffaccel.quant.recipe", "QuantRecipe"),
         "QuantSpec": ("diffaccel.quant.formats", "QuantSpec")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffaccel' has no attribute {name!r}")


__all__ = ["__version__", "info", "ops", "patch", "unpatch", "is_patched", "PatchReport", "patch_scheduler",
           "unpatch_scheduler", "calibrate", "QuantRecipe", "QuantSpec"]
