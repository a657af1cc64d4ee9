"""diffaccel: fused attention, quantized layers and fused solver steps for diffusion models."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers the custom ops)
from ._info import info  # noqa: E402
from .patch import PatchReport, is_patched, patch, unpatch  # noqa: E402

__all__ = ["__version__", "info", "ops", "patch", "unpatch", "is_patched", "PatchReport"]
