"""Philox4x32-10 counter-based normal noise, the torch reference of the fused solver step's
in-kernel noise (``fused_solver_step(..., noise_seed=, noise_offset=)``).

The stream is Triton's ``tl.randn(seed, offset)`` (triton/language/random.py), written once per
language: here (uint32 arithmetic emulated exactly in int64 tensors), in csrc/solver.h
(``solver::philox4x32_10``, shared by the CPU loop and the CUDA kernel) and in kernels/solver.py
(``tl.randn``). Element ``i`` (flat row-major index over the whole latent, batch included) of a
step with base offset ``noise_offset`` uses

  offset  = noise_offset + i                       (int64; 0 <= offset < 2**63)
  key     = (lo32(seed), hi32(seed))               (seed: int64, read as its 64 bits)
  counter = (lo32(offset), hi32(offset), 0, 0)
  (w0, w1, w2, w3) = Philox4x32 with 10 rounds (round constants 0xD2511F53 / 0xCD9E8D57,
                     key increments 0x9E3779B9 / 0xBB67AE85)
  u(w)    = fp32(w if w < 2**31 else 2**32 - 1 - w) * fp32(4.6566127342e-10)   (in [0, 1))
  n       = sqrt(-2 log(max(u(w0), 1e-7))) * cos(fp32(2 pi) * u(w1))          (fp32 Box-Muller)

The uint32 words are bit-identical across backends; the normals agree to the last few ulps of
log / cos / sqrt (torch, libm, libdevice and the GPU's approximate instructions differ there).
A caller that gives step ``s`` the base ``sum of numel over the earlier steps that drew noise``
(what ``patch_scheduler(..., noise="philox")`` does) never reuses a counter.
"""
from __future__ import annotations

import torch

from ._checks import plain_number

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # the largest fp32 scale with (2**31 - 1) * scale < 1
UNIFORM_MIN = 1.0e-7
TWO_PI = 6.283185307179586
MASK32 = 0xFFFFFFFF
MAX_OFFSET = 2**63 - 1


def _mul_hi_lo(a: torch.Tensor, const: int):
    """(hi32, lo32) of a * const for uint32 values a held in int64 (16-bit limbs: no int64 overflow)."""
    lo_part = a * (const & 0xFFFF)
    t = a * (const >> 16) + (lo_part >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox4x32_10_reference(seed, offsets: torch.Tensor):
    """The four uint32 words (int64 tensors in [0, 2**32)) for each int64 counter in ``offsets``.

    ``seed`` is a Python int or an int64 tensor with one element (read on its device, no host sync).
    """
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(()).to(device=offsets.device, dtype=torch.int64)
    else:
        s = torch.tensor(seed_as_int64(seed), dtype=torch.int64, device=offsets.device)
    k0 = s & MASK32
    k1 = (s >> 32) & MASK32  # arithmetic shift, then masked: the high word of the 64 bits
    offsets = offsets.to(torch.int64)
    c0 = offsets & MASK32
    c1 = (offsets >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint32_to_uniform_reference(w: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for uint32 words held in int64: fp32 in [0, 1)."""
    folded = torch.where(w >= 2**31, MASK32 - w, w)  # bitcast to int32, then ~x for x < 0
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def philox_normal_reference(seed, noise_offset: int, numel: int, device=None) -> torch.Tensor:
    """``numel`` fp32 N(0, 1) samples: element i from counter ``noise_offset + i`` (Triton's tl.randn)."""
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
    offsets = torch.arange(numel, dtype=torch.int64, device=device) + int(noise_offset)
    w0, w1, _, _ = philox4x32_10_reference(seed, offsets)
    u1 = torch.clamp_min(uint32_to_uniform_reference(w0), UNIFORM_MIN)
    th = torch.tensor(TWO_PI, dtype=torch.float32) * uint32_to_uniform_reference(w1)
    r = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32) * torch.log(u1))
    return r * torch.cos(th)


def seed_as_int64(seed: int) -> int:
    """A seed in [-2**63, 2**64) as the int64 with the same 64 bits (torch.initial_seed() may exceed 2**63)."""
    seed = plain_number(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected a python int, got {type(seed).__name__}")
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"seed: expected a 64-bit value in [-2**63, 2**64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed
