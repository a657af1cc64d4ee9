"""Quantization formats: the spec a layer carries, and the weight encodings.

Weights are symmetric, per output channel (``weight_group_size=None``) or per group of
``weight_group_size`` consecutive input channels (K). Encodings, all of a float weight
``w`` of shape [N, K] computed in fp32:

- int8:  scale = max(amax, 1e-12) / 127,  q = clamp(round(w / scale), -127, 127)
- int4:  scale = max(amax, 1e-12) / 7,    q = clamp(round(w / scale), -8, 7), stored two per
         byte (uint8 [N, K // 2]): the LOW nibble holds the even k, the HIGH nibble the odd k,
         each as a two's-complement 4-bit value.
- fp8_e4m3: scale = max(amax, 1e-12) / 448, q = (w / scale).to(torch.float8_e4m3fn)
         (torch's cast, round to nearest even), per output channel only.
- fp4_e2m1: per group of 16 or 32, scale = fp16(max(amax, 1e-6) / 6); codes are the E2M1
         values {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign bit (bit 3), nearest value with
         ties to the even code, packed two per byte like int4. Storage only: compute
         dequantizes to fp16/bf16 and runs a float GEMM.

``round`` is round half to even (``torch.round``); division is IEEE fp32 division.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch

from diffaccel.ops._checks import plain_number
from diffaccel.ops.quantize import div_exact

WEIGHT_DTYPES = ("int8", "int4", "fp8_e4m3", "fp4_e2m1")
ACT_DTYPES = ("int8", "fp8_e4m3", None)
ACT_MODES = ("dynamic", "static")
GROUP_SIZES = (None, 16, 32, 64, 128)
FP4_GROUP_SIZES = (16, 32)
WEIGHT_BITS = {"int8": 8, "int4": 4, "fp8_e4m3": 8, "fp4_e2m1": 4}

AMAX_FLOOR = 1e-12
FP4_AMAX_FLOOR = 1e-6  # keeps the fp16 scale a normal number
FP8_E4M3_MAX = 448.0
FP16_MAX = 65504.0
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized. Presets: ``QuantSpec.preset("w8a8" | "fp8" | "w4a8" | "w4a16")``."""

    weight_dtype: str = "int8"
    weight_group_size: Optional[int] = None  # None: per output channel
    act_dtype: Optional[str] = "int8"  # None: weight-only (activations stay fp16/bf16)
    act_mode: str = "dynamic"  # "dynamic": per token; "static": per tensor, calibrated
    act_symmetric: bool = True

    def __post_init__(self):
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype: expected one of {WEIGHT_DTYPES}, got {self.weight_dtype!r}")
        if self.weight_group_size is not None:  # (a numpy integer is kept as the int it stands for)
            object.__setattr__(self, "weight_group_size", plain_number(self.weight_group_size))
        if self.weight_group_size not in GROUP_SIZES or type(self.weight_group_size) not in (int, type(None)):
            raise ValueError(f"weight_group_size: expected one of {GROUP_SIZES}, got {self.weight_group_size!r}")
        if self.act_dtype not in ACT_DTYPES:
            raise ValueError(f"act_dtype: expected one of {ACT_DTYPES}, got {self.act_dtype!r}")
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"act_mode: expected one of {ACT_MODES}, got {self.act_mode!r}")
        if not isinstance(self.act_symmetric, bool):
            raise ValueError(f"act_symmetric: expected a bool, got {self.act_symmetric!r}")
        if self.weight_dtype == "fp8_e4m3" and self.weight_group_size is not None:
            raise ValueError(f"weight_group_size: fp8_e4m3 weights are per output channel (None), "
                             f"got {self.weight_group_size}")
        if self.weight_dtype == "fp4_e2m1":
            if self.weight_group_size not in FP4_GROUP_SIZES:
                raise ValueError(f"weight_group_size: fp4_e2m1 needs a group of {FP4_GROUP_SIZES}, "
                                 f"got {self.weight_group_size!r}")
            if self.act_dtype is not None:
                raise ValueError(f"act_dtype: fp4_e2m1 is a weight-only storage format (act_dtype=None), "
                                 f"got {self.act_dtype!r}")
        if self.act_dtype == "fp8_e4m3" and self.weight_dtype != "fp8_e4m3":
            raise ValueError(f"act_dtype: fp8_e4m3 activations need fp8_e4m3 weights, got weight_dtype "
                             f"{self.weight_dtype!r}")
        if self.weight_dtype == "fp8_e4m3" and self.act_dtype == "int8":
            raise ValueError("act_dtype: fp8_e4m3 weights run with fp8_e4m3 activations or weight-only (None), "
                             "got 'int8'")
        if self.act_dtype is not None and not self.act_symmetric:
            if self.act_mode == "dynamic":
                raise ValueError("act_symmetric: dynamic per-token activations are symmetric; "
                                 "asymmetric needs act_mode='static'")
            if self.act_dtype == "fp8_e4m3":
                raise ValueError("act_symmetric: fp8_e4m3 activations are symmetric")

    @property
    def weight_bits(self) -> int:
        return WEIGHT_BITS[self.weight_dtype]

    @property
    def act_bits(self) -> int:
        return 16 if self.act_dtype is None else 8

    @property
    def weight_only(self) -> bool:
        return self.act_dtype is None

    @classmethod
    def preset(cls, name: str) -> "QuantSpec":
        try:
            return cls(**PRESETS[name])
        except (KeyError, TypeError):
            raise ValueError(f"spec: unknown preset {name!r}; expected one of {tuple(PRESETS)}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict, got {type(d).__name__}")
        unknown = set(d) - {"weight_dtype", "weight_group_size", "act_dtype", "act_mode", "act_symmetric"}
        if unknown:
            raise ValueError(f"d: unknown QuantSpec fields {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    "w8a8": dict(weight_dtype="int8", weight_group_size=None, act_dtype="int8", act_mode="dynamic"),
    "fp8": dict(weight_dtype="fp8_e4m3", weight_group_size=None, act_dtype="fp8_e4m3", act_mode="dynamic"),
    "w4a8": dict(weight_dtype="int4", weight_group_size=128, act_dtype="int8", act_mode="dynamic"),
    "w4a16": dict(weight_dtype="int4", weight_group_size=128, act_dtype=None, act_mode="dynamic"),
}


def resolve_spec(spec: Union[QuantSpec, str]) -> QuantSpec:
    """A QuantSpec, or the preset a name stands for (ValueError naming the known presets)."""
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, str):
        return QuantSpec.preset(spec)
    raise TypeError(f"spec: expected a QuantSpec or a preset name, got {type(spec).__name__}")


# -- weight encodings ---------------------------------------------------------------------

def _grouped(w: torch.Tensor, group_size: Optional[int]) -> torch.Tensor:
    """[N, K] -> [N, G, g] (G = 1, g = K per channel)."""
    n, k = w.shape
    g = k if group_size is None else plain_number(group_size)  # (16.0 or "16" then fail: not an int)
    if type(g) is not int or g <= 0:
        raise ValueError(f"group_size: expected a positive int or None, got {group_size!r}")
    if k % g:
        raise ValueError(f"weight_group_size: {g} does not divide K={k}")
    return w.reshape(n, k // g, g)


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"weight: expected a float16/bfloat16/float32 tensor, got {w.dtype}")
    if w.dim() != 2 or w.shape[1] == 0:
        raise ValueError(f"weight: expected a 2-d [N, K] tensor with K > 0, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight: expected finite values, got NaN or Inf")


def _squeeze_scale(scale: torch.Tensor, group_size: Optional[int]) -> torch.Tensor:
    return scale[:, 0].contiguous() if group_size is None else scale.contiguous()


def quantize_weight_int(w: torch.Tensor, bits: int, group_size: Optional[int] = None):
    """Symmetric int8/int4 -> (q int8 [N, K] in [-2^(b-1), 2^(b-1)-1], scale fp32 [N] or [N, G])."""
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")
    _check_weight(w)
    qmax = 2 ** (bits - 1) - 1
    wg = _grouped(w.float(), group_size)
    scale = div_exact(wg.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR), qmax)
    q = torch.round(wg / scale).clamp_(-qmax - 1 if bits == 4 else -qmax, qmax).to(torch.int8)
    return q.reshape(w.shape), _squeeze_scale(scale[..., 0], group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] of shape [N, K] (K even) -> uint8 [N, K // 2]; low nibble = even k."""
    if q.dtype != torch.int8:
        raise TypeError(f"q: expected int8, got {q.dtype}")
    if q.dim() == 0:
        raise ValueError("q: expected [..., K] codes, got a 0-d tensor")
    if q.shape[-1] % 2:
        raise ValueError(f"q: expected an even last dimension to pack two per byte, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("q: expected values in [-8, 7]")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 [N, K] (inverse of ``pack_int4``)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected uint8, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed: expected [..., K // 2] bytes, got a 0-d tensor")
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = p >> 4
    lo = lo - ((lo & 8) << 1)
    hi = hi - ((hi & 8) << 1)
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int8)


def quantize_weight_fp8(w: torch.Tensor):
    """Per output channel -> (q float8_e4m3fn [N, K], scale fp32 [N])."""
    _check_weight(w)
    wf = w.float()
    scale = div_exact(wf.abs().amax(dim=1, keepdim=True).clamp(min=AMAX_FLOOR), FP8_E4M3_MAX)
    q = (wf / scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale[:, 0].contiguous()


def _fp4_encode(v: torch.Tensor) -> torch.Tensor:
    """fp32 values (already divided by the scale, |v| <= 6) -> uint8 codes 0..15."""
    values = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=v.device)
    mids = (values[1:] + values[:-1]) / 2
    a = v.abs().clamp(max=6.0)
    idx = (a.unsqueeze(-1) > mids).sum(-1)  # ties resolve downwards ...
    at_mid = (idx < 7) & (a == mids[idx.clamp(max=6)])
    idx = torch.where(at_mid & (idx % 2 == 1), idx + 1, idx)  # ... then to the even code
    sign = ((v < 0) & (idx > 0)).to(torch.int64) << 3
    return (idx | sign).to(torch.uint8)


def quantize_weight_fp4(w: torch.Tensor, group_size: int):
    """-> (packed uint8 [N, K // 2] of E2M1 codes, scale fp16 [N, K // group_size])."""
    if group_size not in FP4_GROUP_SIZES:
        raise ValueError(f"group_size: fp4_e2m1 needs one of {FP4_GROUP_SIZES}, got {group_size!r}")
    _check_weight(w)
    wg = _grouped(w.float(), group_size)
    amax = wg.abs().amax(dim=-1, keepdim=True)
    largest = float(amax.max()) if w.numel() else 0.0  # (one read; w is finite: _check_weight)
    if largest / 6.0 > FP16_MAX:  # the group scale would be fp16 inf
        raise ValueError(f"weight: fp4_e2m1 stores group scales in float16, so |w| must stay <= 6 * {FP16_MAX:g}; "
                         f"got max |w| = {largest:g}")
    scale = div_exact(amax.clamp(min=FP4_AMAX_FLOOR), 6.0).to(torch.float16)
    codes = _fp4_encode(wg / scale.float()).reshape(w.shape)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.contiguous(), scale[..., 0].contiguous()


def fp4_codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    values = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = values[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fp4 reference dequantization: value(code) * fp32(scale), then cast to ``dtype``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected uint8, got {packed.dtype}")
    n = packed.shape[0]
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(n, -1)
    v = fp4_codes_to_float(codes)
    k = v.shape[1]
    if scale.shape != (n, k // group_size):
        raise ValueError(f"scale: expected shape {(n, k // group_size)}, got {tuple(scale.shape)}")
    out = v.reshape(n, k // group_size, group_size) * scale.float().unsqueeze(-1)
    return out.reshape(n, k).to(dtype)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, group_size: Optional[int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [N, K] (int4 already unpacked) * fp32 scale per channel/group -> ``dtype``."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"q: expected an int8 [N, K] tensor (int4 codes unpacked), got "
                        f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}"
                        f"{f' of shape {tuple(q.shape)}' if isinstance(q, torch.Tensor) else ''}")
    qg = _grouped(q, group_size)  # [N, G, g]; checks group_size
    want = (q.shape[0],) if group_size is None else tuple(qg.shape[:2])
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != want:
        got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"scale: expected shape {want} for q {tuple(q.shape)} and group_size={group_size}, got {got}")
    return (qg.float() * scale.float().reshape(*qg.shape[:2], 1)).reshape(q.shape).to(dtype)
