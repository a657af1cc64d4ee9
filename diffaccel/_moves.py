"""What a model's moves did to a module that stands in for a float original (quantized layers,
calibration recipes' wrappers), so that ``unpatch`` can do the same to the original. Imports torch
only: ``diffaccel.nn`` and ``diffaccel.quant`` both use it."""
from __future__ import annotations

import torch

_NARROW_DTYPES = (torch.float16, torch.bfloat16)


class FollowsMoves:
    """For a module that stands in for a float original ``unpatch`` puts back: what ``model.to()``,
    ``.half()`` or ``.to(memory_format=...)`` did to the model since patching, recorded from the
    function ``Module._apply`` passes down, so that ``unpatch`` can do the same to the original.
    Casts to float32 / float64 lose nothing, so only the narrowing ones are kept, in order: after
    ``.half().float()`` the original is rounded to fp16 and back like every float layer of the
    model (``original_dtype`` alone would cast it once, to fp32, from its patch-time values)."""

    original_dtype: torch.dtype
    # set by model.to(memory_format=...), unpatch applies it to the original: the torch.memory_format's
    # name ("channels_last"), as torch.save cannot pickle the object itself
    memory_format = None
    narrowing_casts: tuple = ()

    def record_move(self, fn, device) -> torch.device:
        """Read what ``fn`` does off two 4-d probes (a contiguous fp32 one shows any cast but to fp32,
        fp64 included, and a change to channels_last; a channels_last fp64 one a cast to fp32 and a
        change back to contiguous); returns the device it moves to."""
        probe = fn(torch.zeros(2, 3, 2, 2, dtype=torch.float32, device=device))
        other = fn(torch.zeros(2, 3, 2, 2, dtype=torch.float64, device=device).contiguous(
            memory_format=torch.channels_last))
        dtype = None
        if probe.dtype != torch.float32 and probe.dtype.is_floating_point:
            dtype = probe.dtype
        elif other.dtype == torch.float32:
            dtype = torch.float32
        if dtype is not None:
            if dtype in _NARROW_DTYPES and self.narrowing_casts[-1:] != (dtype,):
                self.narrowing_casts = self.narrowing_casts + (dtype,)
            self.original_dtype = dtype
        if not probe.is_contiguous():
            self.memory_format = "channels_last"
        elif other.is_contiguous():
            self.memory_format = "contiguous_format"
        return probe.device
