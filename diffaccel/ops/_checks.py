"""Argument validation shared by every op wrapper: each message names the argument."""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the float storage every op takes


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def plain_number(value):
    """A numpy scalar as the python number it stands for, anything else unchanged, so that every
    number check accepts ``np.float32(7.5)`` where it accepts ``7.5`` (numpy bools stay: rejected)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def check_flag(name: str, value) -> bool:
    """``value`` if it is a bool (numpy's too); a TypeError naming ``name`` otherwise (a string such as
    "no" would read as True)."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):  # numpy's bool
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {value!r}")


def check_features(x: torch.Tensor, name: str = "x") -> None:
    """``x`` [..., K] with K > 0 (a per-token scale of zero features is undefined)."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected [..., K] with K > 0 features, got shape {tuple(x.shape)}")


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    ndim: Optional[int | tuple] = None,
    device: Optional[torch.device] = None,
    last_dim_contiguous: bool = False,
    contiguous: bool = False,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"{name}: expected dtype in ({_dtype_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name}: expected a {want}-d tensor, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dimension, got strides {t.stride()}")
    return t


def same_device(device: torch.device, a: torch.device) -> bool:
    """cuda and cuda:0 are the same device for our purposes."""
    if device == a:  # the common case, without reading .type / .index (about 1.5 us a call)
        return True
    if device.type != a.type:
        return False
    if device.type != "cuda":
        return True
    di = device.index if device.index is not None else torch.cuda.current_device()
    ai = a.index if a.index is not None else torch.cuda.current_device()
    return di == ai


PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # not a subclass that intercepts torch calls


def values_readable(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values: a plain CPU tensor outside compilation and fake or
    functional tracing. On a GPU a read costs a host sync per call, so device-resident scales are
    checked where they are made (calibration, from_float, load)."""
    return (t.device.type == "cpu" and type(t) in PLAIN_TENSOR_TYPES
            and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack())


def check_int8_zero_point(name: str, t: torch.Tensor) -> None:
    """Value check for int8 zero points (in [-128, 127]), where ``values_readable``."""
    if not values_readable(t) or not bool(((t < -128) | (t > 127)).any()):
        return
    if t.numel() == 1:
        raise ValueError(f"{name}: expected a value in [-128, 127], got {int(t.reshape(-1)[0])}")
    raise ValueError(f"{name}: expected values in [-128, 127], got {t.tolist()}")


def check_positive_finite(name: str, t: torch.Tensor, *, allow_nan: bool = False) -> None:
    """Value check for scales, where ``values_readable``. ``allow_nan``: per-row activation scales,
    where NaN marks a row that held a NaN or Inf (ops/quantize.py) and makes its output NaN."""
    if not values_readable(t):
        return
    tf = t.float()
    if allow_nan:
        tf = tf[~torch.isnan(tf)]
    if not bool(torch.isfinite(tf).all()):
        raise ValueError(f"{name}: expected finite values, got {'Inf' if allow_nan else 'NaN or Inf'}")
    if not bool((tf > 0).all()):
        raise ValueError(f"{name}: expected values > 0, got min {tf.min().item():g}")
