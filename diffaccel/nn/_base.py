"""What QuantLinear and QuantConv2d share: the packed weight buffers built from a spec, the
activation parameters (one set per timestep when calibrated that way), device moves that
keep packed dtypes, and the GEMM dispatch on a 2-d [M, K] activation."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from diffaccel._moves import FollowsMoves
from diffaccel.ops import gemm as G
from diffaccel.quant import formats as fmt
from diffaccel.quant.formats import QuantSpec, resolve_spec

# weight-only int GEMM in-kernel up to this many rows; above it the weight is dequantized once
# per call and a float GEMM runs (the dequantization is O(N*K) against O(M*N*K) of work)
WEIGHT_ONLY_KERNEL_MAX_M = 256


def _float_tensor(name: str, t, shape: tuple) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point() or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{name}: expected a float tensor, got {t.dtype}")
    if t.is_meta:
        raise ValueError(f"{name}: a tensor on the meta device has no values to quantize")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    return t


def check_weight_source(weight, weight_q, weight_scale) -> None:
    if weight is not None and (weight_q is not None or weight_scale is not None):  # (the codes would win)
        raise ValueError("weight: given together with weight_q / weight_scale; pass the float weight to quantize, "
                         "or the codes and their scales, not both")


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` that shares no storage with it."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _positive(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_meta:
        raise ValueError(f"{name}: a tensor on the meta device has no values")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    if not bool((t > 0).all()):
        raise ValueError(f"{name}: expected values > 0, got min {t.min().item():g}")
    return t


def in_autocast_dtype(y: torch.Tensor) -> torch.Tensor:
    """``y`` as nn.Linear / nn.Conv2d return it: in the autocast dtype inside an autocast region on its
    device (the kernels write the layer's storage dtype), else unchanged."""
    kind = y.device.type
    if kind != "meta" and torch.is_autocast_enabled(kind):  # (autocast has no meta device: it raises)
        dtype = torch.get_autocast_dtype(kind)
        if y.dtype != dtype:
            return y.to(dtype)
    return y


def records_autograd(*tensors) -> bool:
    """Autograd records through one of ``tensors``: a gradient has to flow back through them, so
    fused paths that pass int8 codes between ops (which cut the graph) step aside."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _StraightThrough(torch.autograd.Function):
    """A quantized layer's low-bit forward, and as backward the input gradient of the float layer its
    codes stand for (``layer.input_grad``): straight through the activation quantization, as QLoRA
    and quantization-aware training do. The codes and scales are buffers and get no gradient."""

    @staticmethod
    def forward(ctx, x, layer, forward):
        ctx.layer, ctx.x_shape, ctx.x_dtype = layer, x.shape, x.dtype
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.layer.input_grad(grad, ctx.x_shape).to(ctx.x_dtype), None, None


def straight_through(layer: nn.Module, x: torch.Tensor, forward) -> torch.Tensor:
    """``forward(x)``, differentiable in ``x`` with ``layer``'s straight-through gradient."""
    return _StraightThrough.apply(x, layer, forward)


class QuantLayerBase(FollowsMoves, nn.Module):
    """Holds: weight_q (int8 [N, K] | uint8 packed int4/fp4 [N, K // 2] | float8_e4m3fn [N, K]),
    weight_scale (fp32 [N] or [N, G]; fp16 [N, G] for fp4), weight_sum (int32 row sums of the
    codes for the zero-point correction, static asymmetric only), bias (fp32), smooth (fp32 [K]),
    act_scale / act_zero_point ([T] or [T, 2] for a split input). K is the GEMM's K."""

    def __getattr__(self, name: str):
        # (only reached when normal lookup fails) buffers first: the forward reads several per call
        # and nn.Module.__getattr__ behind this frame would cost a second one for each
        buffers = self.__dict__.get("_buffers")
        if buffers is not None and name in buffers:
            return buffers[name]
        # code written for nn.Linear / nn.Conv2d that reads layer.weight, e.g. diffusers' own
        # forwards reading a layer's dtype, gets told what to do
        if name == "weight":
            where = self.__dict__.get("qualified_name") or "<its qualified name>"
            raise AttributeError(f"{type(self).__name__} has no float 'weight': it stores low-bit codes (weight_q) "
                                 f"and scales (weight_scale); its dtype is in original_dtype. Code that reads "
                                 f"layer.weight runs before diffaccel.patch (diffusers' fuse_qkv_projections: "
                                 f"fuse, then patch; or unpatch, fuse, patch again), or needs that layer left in "
                                 f"floating point: diffaccel.patch(..., exclude=[{where!r}])")
        return super().__getattr__(name)

    def check_output_dtype(self) -> None:
        """A layer cast to float64 (``model.double()``) has no kernel to run: say so, rather than
        fail on an ``out_dtype`` argument the caller never passed (or, weight-only, return fp64)."""
        if self.original_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"module: cast to {self.original_dtype} (e.g. .double()), but quantized layers output "
                            f"float16, bfloat16 or float32; cast it back (.float()), or diffaccel.unpatch the model "
                            f"to run it in {self.original_dtype}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # torch's parameter name: callers pass input=
        self.check_output_dtype()
        if records_autograd(input):  # training through the layer: straight-through gradients
            y = straight_through(self, input, self._forward)
        else:
            y = self._forward(input)
        return in_autocast_dtype(y)

    def _init_common(self, spec: QuantSpec, N: int, K: int, original_dtype: torch.dtype):
        self.spec = spec
        self.gemm_n = N
        self.gemm_k = K
        self.group_size = spec.weight_group_size
        self.original_dtype = original_dtype
        self.step_state = None  # set by calibration code: an object with .index (0-d int64 on device)
        self.act_split_k: Optional[int] = None

    # -- building ---------------------------------------------------------------------------

    def _build_weight(self, w2d: Optional[torch.Tensor], weight_q, weight_scale, smooth_k):
        """w2d: the float weight [N, K] (already in the GEMM's K order), or codes + scales."""
        spec, N, K = self.spec, self.gemm_n, self.gemm_k
        g = spec.weight_group_size
        groups = None if g is None else K // g
        scale_shape = (N,) if groups is None else (N, groups)
        if weight_q is not None or weight_scale is not None:
            if weight_q is None or weight_scale is None:
                raise ValueError("weight_q: weight_q and weight_scale are given together")
            if spec.weight_dtype == "fp4_e2m1":
                raise ValueError("weight_q: pre-quantized codes are not accepted for fp4_e2m1; pass weight=")
            # [N, K], or the float weight's own shape (a conv's [N, C, kh, kw]); [K, N] is refused
            if not isinstance(weight_q, torch.Tensor) or weight_q.numel() != N * K or weight_q.shape[0] != N:
                raise ValueError(f"weight_q: expected {N * K} codes ([N, K] = [{N}, {K}], or the weight's shape), got "
                                 f"{tuple(weight_q.shape) if isinstance(weight_q, torch.Tensor) else type(weight_q)}")
            q = weight_q.reshape(N, K)
            if spec.weight_dtype == "fp8_e4m3":
                if q.dtype != torch.float8_e4m3fn:
                    raise TypeError(f"weight_q: expected float8_e4m3fn codes, got {q.dtype}")
                if bool(q.float().isnan().any()):  # (E4M3 has no inf; a NaN code made NaN outputs)
                    raise ValueError("weight_q: float8_e4m3fn codes must not be NaN")
            else:
                if q.dtype.is_floating_point or q.dtype == torch.bool:
                    raise TypeError(f"weight_q: expected integer codes, got {q.dtype}")
                lo, hi = (-8, 7) if spec.weight_dtype == "int4" else (-127, 127)
                if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
                    raise ValueError(f"weight_q: {spec.weight_dtype} codes must lie in [{lo}, {hi}]")
                q = q.to(torch.int8)
            if not isinstance(weight_scale, torch.Tensor) or weight_scale.numel() != (N if groups is None else N * groups):
                raise ValueError(f"weight_scale: expected shape {scale_shape}")
            scale = _positive("weight_scale", weight_scale.reshape(scale_shape)).contiguous()
            if w2d is not None:  # codes from a recipe (kept on CPU) live where the layer they replace does
                q, scale = q.to(w2d.device), scale.to(w2d.device)
        else:
            if smooth_k is not None:
                w2d = w2d.float() * smooth_k.reshape(1, K)
            if spec.weight_dtype in ("int8", "int4"):
                q, scale = fmt.quantize_weight_int(w2d, spec.weight_bits, g)
            elif spec.weight_dtype == "fp8_e4m3":
                q, scale = fmt.quantize_weight_fp8(w2d)
            else:
                q, scale = fmt.quantize_weight_fp4(w2d, g)
        codes_int = q if spec.weight_dtype in ("int8", "int4") else None
        if spec.weight_dtype == "int4":
            q = fmt.pack_int4(q)
        self.register_buffer("weight_q", q.contiguous())
        self.register_buffer("weight_scale", scale.contiguous())
        return codes_int

    def _build_act(self, codes_int, act_scale, act_zero_point, act_split: Optional[int], smooth_k, device):
        spec = self.spec
        if smooth_k is not None and spec.act_dtype is None:
            raise ValueError("smooth: SmoothQuant scaling needs quantized activations; the spec is weight-only")
        # (every tensor taken from the caller is copied: .float() / .contiguous() / .to() return the
        # caller's own tensor when nothing changes, and a later edit of it must not reach this layer)
        self.register_buffer("smooth", None if smooth_k is None else _own(smooth_k.float().to(device)))
        static = spec.act_dtype is not None and spec.act_mode == "static"
        if not static:
            for name, v in (("act_scale", act_scale), ("act_zero_point", act_zero_point), ("act_split", act_split)):
                if v is not None:
                    raise ValueError(f"{name}: only for static activations; spec has act_dtype={spec.act_dtype!r}, "
                                     f"act_mode={spec.act_mode!r}")
            self.register_buffer("act_scale", None)
            self.register_buffer("act_zero_point", None)
            self.register_buffer("weight_sum", None)
            return
        if act_scale is None:
            raise ValueError("act_scale: required for static activation quantization (calibrated scales [T])")
        parts = 1 if act_split is None else 2
        if not isinstance(act_scale, torch.Tensor):
            raise TypeError(f"act_scale: expected a float32 tensor [T{', 2' if parts == 2 else ''}], "
                            f"got {type(act_scale).__name__}")
        if not act_scale.is_floating_point():
            raise TypeError(f"act_scale: expected a float32 tensor, got {act_scale.dtype}")
        want_dim = 1 if parts == 1 else 2
        if act_scale.dim() != want_dim or act_scale.shape[0] < 1 or (parts == 2 and act_scale.shape[1] != 2):
            raise ValueError(f"act_scale: expected shape [T]{' x 2 (act_split)' if parts == 2 else ''} with T >= 1, "
                             f"got {tuple(act_scale.shape)}")
        scale = _own(_positive("act_scale", act_scale).to(device))
        zp = None
        if act_zero_point is not None:
            if not isinstance(act_zero_point, torch.Tensor) or act_zero_point.dtype.is_floating_point \
                    or act_zero_point.dtype == torch.bool:
                raise TypeError(f"act_zero_point: expected an int32 tensor, got "
                                f"{act_zero_point.dtype if isinstance(act_zero_point, torch.Tensor) else type(act_zero_point).__name__}")
            if tuple(act_zero_point.shape) != tuple(act_scale.shape):
                raise ValueError(f"act_zero_point: expected shape {tuple(act_scale.shape)} like act_scale, "
                                 f"got {tuple(act_zero_point.shape)}")
            if act_zero_point.numel() and (int(act_zero_point.min()) < -128 or int(act_zero_point.max()) > 127):
                raise ValueError("act_zero_point: expected values in [-128, 127]")
            if spec.act_symmetric and bool((act_zero_point != 0).any()):
                raise ValueError("act_zero_point: the spec's activations are symmetric (act_symmetric=True), "
                                 "got non-zero zero points")
            if spec.act_dtype != "int8" and bool((act_zero_point != 0).any()):
                raise ValueError("act_zero_point: fp8 activations have no zero point")
            if bool((act_zero_point != 0).any()):
                zp = _own(act_zero_point.to(torch.int32).to(device))
        self.register_buffer("act_scale", scale)
        self.register_buffer("act_zero_point", zp)
        wsum = None
        if zp is not None:
            wsum = self._weight_sums(codes_int)
        self.register_buffer("weight_sum", wsum)

    def _weight_sums(self, codes):
        """int32 row sums of the codes per channel [N] (or per group [N, G]); with a split input,
        per channel: [2, N] (the two K ranges)."""
        N, K = codes.shape
        g = self.group_size
        if g is not None:
            return codes.to(torch.int32).reshape(N, K // g, g).sum(-1, dtype=torch.int32).contiguous()
        if self.act_split_k is not None:
            k1 = self.act_split_k
            return torch.stack((codes[:, :k1].sum(1, dtype=torch.int32),
                                codes[:, k1:].sum(1, dtype=torch.int32))).contiguous()
        return codes.sum(1, dtype=torch.int32).contiguous()

    def _set_bias(self, bias: Optional[torch.Tensor]):
        self.register_buffer("bias", None if bias is None else _own(bias.detach().float()))

    # -- module plumbing ----------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # codes, scales and sums only make sense together: a layer whose buffers do not all match
        # loads none of them (torch raises with the messages at the end). torch alone would copy
        # each matching key and refuse the others, leaving another layer's codes beside this one's
        # scales; and copy_ would cast another format's codes (fp8 into int8: 448 -> 120).
        wrong = []
        saved = [name for name in self._buffers if name not in self._non_persistent_buffers_set]
        if any(prefix + name in state_dict for name in saved):  # (a LoRA-only load names none)
            for name in saved:
                buf, given = self._buffers[name], state_dict.get(prefix + name)
                if buf is None and given is None:
                    continue
                if buf is None:
                    why = "this layer has none"
                elif given is None:
                    why = "missing from the state dict"
                elif not isinstance(given, torch.Tensor):
                    continue  # (torch's own message)
                elif given.dtype != buf.dtype:
                    why = f"stored as {given.dtype}, this layer holds {buf.dtype}"
                elif given.shape != buf.shape:
                    why = f"stored with shape {tuple(given.shape)}, this layer holds {tuple(buf.shape)}"
                else:
                    continue
                wrong.append(f"{prefix}{name}: {why} ({self.spec}); load it into a layer built with the same spec")
        float_weight = state_dict.get(prefix + "weight")
        if isinstance(float_weight, torch.Tensor) and float_weight.is_floating_point() \
                and prefix + "weight_q" not in state_dict:
            # the float model's state dict (torch would list every key; strict=False would load
            # the bias beside stale codes): say what it is and what to do
            wrong.append(f"{prefix}weight: a float weight for a quantized layer ({self.spec}); this state dict is "
                         f"of the float model: load it before diffaccel.patch (or diffaccel.unpatch, load, patch "
                         f"again)")
        if wrong:
            error_msgs.extend(wrong)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def state_digest(self) -> Optional[tuple]:
        """A fingerprint of the layer's buffers (codes, scales, bias, activation parameters): per buffer
        its name, shape, dtype, float64 sum and the sum of every 7th value. ``patch`` records it and
        ``unpatch`` compares it, to tell whether load_state_dict put other weights here since patching.
        None on the meta device. (Reads every buffer once: a host sync on a GPU.)"""
        out = []
        for name, buf in sorted(self._buffers.items()):
            if buf is None:
                continue
            if buf.is_meta:
                return None
            flat = buf.reshape(-1)
            sums = (float(flat.sum(dtype=torch.float64)), float(flat[::7].sum(dtype=torch.float64)))
            out.append((name, tuple(buf.shape), buf.dtype, tuple("nan" if v != v else v for v in sums)))
        return tuple(out)

    @staticmethod
    def same_digest(a: tuple, b: tuple) -> bool:
        """Two ``state_digest`` results of the same weights: the sums may differ in their last bits when
        computed on another device (another summation order), another checkpoint's by far more."""
        if len(a) != len(b):
            return False
        for (name, shape, dtype, sums), (name_b, shape_b, dtype_b, sums_b) in zip(a, b):
            if (name, shape, dtype) != (name_b, shape_b, dtype_b):
                return False
            for x, y in zip(sums, sums_b):
                if x != y and ("nan" in (x, y) or abs(x - y) > 1e-9 * max(abs(x), abs(y), 1.0)):
                    return False
        return True

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast float8 codes and fp32 scales; instead move buffers to the
        # target device keeping their dtypes, and let a float dtype change the output dtype
        # (FollowsMoves records it, and the memory format, for unpatch).
        device = self.record_move(fn, self.weight_q.device)
        for name, buf in list(self._buffers.items()):
            if buf is not None and buf.device != device:
                # a meta buffer can only get here through to_empty (a .to() of the meta probe in
                # record_move raised already): allocate it, uninitialised, as to_empty does
                self._buffers[name] = torch.empty_like(buf, device=device) if buf.is_meta else buf.to(device)
        return self

    @property
    def qweight(self) -> torch.Tensor:
        """weight_q under the name peft reads a quantized base layer's device from when it wraps the
        layer in LoRA (as for GPTQ layers); the packed codes, not a float weight."""
        return self.weight_q

    def weight_bytes(self) -> int:
        """Bytes of the packed weights, their scales and the zero-point corrections."""
        return sum(t.numel() * t.element_size() for t in (self.weight_q, self.weight_scale, self.weight_sum)
                   if t is not None)

    def _weight_gemm_dequantized(self) -> torch.Tensor:
        """fp32 [N, K]: the weight the codes represent in the GEMM (smoothing still folded in)."""
        s = self.spec
        if s.weight_dtype == "fp4_e2m1":
            return fmt.dequantize_fp4(self.weight_q, self.weight_scale, self.group_size)
        if s.weight_dtype == "fp8_e4m3":
            return self.weight_q.float() * self.weight_scale.reshape(-1, 1)
        q = fmt.unpack_int4(self.weight_q) if s.weight_dtype == "int4" else self.weight_q
        return fmt.dequantize_int(q, self.weight_scale, self.group_size)

    def _dequantized_weight_2d(self) -> torch.Tensor:
        w = self._weight_gemm_dequantized()
        if self.smooth is not None:
            w = w / self.smooth.reshape(1, -1)
        return w

    def _spec_repr(self) -> str:
        s = self.spec
        parts = [f"w={s.weight_dtype}", f"group={s.weight_group_size or 'channel'}",
                 f"a={s.act_dtype or 'fp16/bf16 (weight-only)'}"]
        if s.act_dtype is not None:
            parts.append(f"act_mode={s.act_mode}{'' if s.act_symmetric else ' asym'}")
            if self.act_scale is not None:
                parts.append(f"timestep_sets={self.act_scale.shape[0]}")
        if self.smooth is not None:
            parts.append("smooth")
        parts.append(f"out={str(self.original_dtype).replace('torch.', '')}")
        return ", ".join(parts)

    # -- forward ------------------------------------------------------------------------------

    def _act_params(self):
        """(scale [1] or [2], zero point [1] or [2] or None) of the active timestep set."""
        scale, zp = self.act_scale, self.act_zero_point
        T = scale.shape[0]
        if T == 1:
            return scale[0], (zp[0] if zp is not None else None)
        state = self.step_state
        if state is None or getattr(state, "index", None) is None:
            raise RuntimeError(f"step_state: act_scale holds {T} timestep sets; set module.step_state to an object "
                               f"whose .index (0-d int64 tensor on {scale.device}) selects one")
        idx = state.index.reshape(1)  # device tensor: no .item(), no host sync
        scale = torch.index_select(scale, 0, idx)[0]
        if zp is not None:
            zp = torch.index_select(zp, 0, idx)[0]
        return scale, zp

    @property
    def op_name(self) -> str:
        """The op that does this layer's main work (the patch report names the backend it runs on)."""
        s = self.spec
        if s.act_dtype == "int8":
            return "int8_linear"
        if s.act_dtype == "fp8_e4m3":
            return "fp8_gemm"
        return "weight_only_gemm"

    def _gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] float -> [M, N] in the module's output dtype."""
        s = self.spec
        out_dtype = self.original_dtype
        if s.act_dtype == "int8":
            w_int4 = s.weight_dtype == "int4"
            common = dict(group_size=self.group_size, w_int4=w_int4, out_dtype=out_dtype)
            if s.act_mode == "dynamic":
                return G.int8_linear(x2, self.weight_q, self.weight_scale, smooth=self.smooth, bias=self.bias, **common)
            scale, zp = self._act_params()
            if self.act_split_k is None:
                return G.int8_linear(x2, self.weight_q, self.weight_scale, smooth=self.smooth, act_scale=scale,
                                     act_zero_point=zp, w_sum=self.weight_sum, bias=self.bias, **common)
            return self._split_int8(x2, scale, zp, w_int4, out_dtype)
        if s.act_dtype == "fp8_e4m3":
            if s.act_mode == "dynamic":
                return G.fp8_linear(x2, self.weight_q, self.weight_scale, smooth=self.smooth, bias=self.bias,
                                    out_dtype=out_dtype)
            scale, _ = self._act_params()
            if self.act_split_k is None:
                return G.fp8_linear(x2, self.weight_q, self.weight_scale, smooth=self.smooth, act_scale=scale,
                                    bias=self.bias, out_dtype=out_dtype)
            return self._split_fp8(x2, scale, out_dtype)
        return self._weight_only(x2)

    def forward_quantized(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """[M, N] from activations already quantized dynamically per token (``codes`` [M, K] int8
        or float8_e4m3fn, ``scale`` [M, 1] fp32, as ``diffaccel.ops.gemm.quantize_activation_*``
        return them): the GEMM ``_gemm`` runs after its own quantization, so results are identical."""
        s = self.spec
        if s.act_dtype is None or s.act_mode != "dynamic" or self.smooth is not None:
            raise ValueError(f"codes: pre-quantized input needs dynamic activations without smoothing; this layer has "
                             f"{self._spec_repr()}")
        if s.act_dtype == "int8":
            return G.int8_gemm(codes, self.weight_q, scale, self.weight_scale, bias=self.bias,
                               group_size=self.group_size, w_int4=s.weight_dtype == "int4",
                               out_dtype=self.original_dtype)
        return G.fp8_gemm(codes, self.weight_q, scale, self.weight_scale, bias=self.bias, out_dtype=self.original_dtype)

    def forward_static_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """[M, N] from int8 ``codes`` [M, K] already quantized with this layer's own static quantizer
        (the active timestep set of ``act_scale`` / ``act_zero_point``, smoothing applied), as
        ``diffaccel.ops.int8_ffn_up(..., next_scale=...)`` writes them: the GEMM ``_gemm`` runs after
        its own quantization."""
        s = self.spec
        if s.act_dtype != "int8" or s.act_mode != "static" or self.act_split_k is not None:
            raise ValueError(f"codes: pre-quantized static input needs static int8 activations (one input range); "
                             f"this layer has {self._spec_repr()}")
        scale, zp = self._act_params()
        return G.int8_gemm(codes, self.weight_q, scale, self.weight_scale, bias=self.bias, zero_point=zp,
                           w_sum=self.weight_sum if zp is not None else None, group_size=self.group_size,
                           w_int4=s.weight_dtype == "int4", out_dtype=self.original_dtype)

    def _split_int8(self, x2, scale, zp, w_int4, out_dtype):
        # Q-Diffusion split shortcut: two K ranges with their own quantizers (see split_k_int8_linear)
        def linear(x, w, w_scale, smooth, act_scale, act_zero_point, w_sum, bias, group_size, w_int4, out_dtype):
            return G.int8_linear(x, w, w_scale, smooth=smooth, act_scale=act_scale, act_zero_point=act_zero_point,
                                 w_sum=w_sum, bias=bias, group_size=group_size, w_int4=w_int4, out_dtype=out_dtype)

        return G.split_k_int8_linear(linear, x2, self.weight_q, self.weight_scale, self.smooth, scale, zp,
                                     self.weight_sum, self.bias, self.group_size, w_int4, out_dtype, self.act_split_k)

    def _split_fp8(self, x2, scale, out_dtype):
        k1 = self.act_split_k
        ys = [G.fp8_linear(x2[:, ks], self.weight_q[:, ks], self.weight_scale,
                           smooth=None if self.smooth is None else self.smooth[ks], act_scale=scale[part],
                           bias=self.bias if part == 1 else None, out_dtype=torch.float32)
              for part, ks in enumerate((slice(0, k1), slice(k1, None)))]
        return (ys[0] + ys[1]).to(out_dtype)

    def _weight_only(self, x2):
        if x2.dtype not in G.FLOAT_DTYPES:  # (as the int8 / fp8 layers' ops refuse it)
            raise TypeError(f"x: expected float16, bfloat16 or float32 activations, got {x2.dtype}")
        s = self.spec
        dt = self.original_dtype if self.original_dtype in (torch.float16, torch.bfloat16) else torch.float32
        x2 = x2.to(dt)
        if s.weight_dtype in ("int8", "int4") and dt != torch.float32 and x2.shape[0] <= WEIGHT_ONLY_KERNEL_MAX_M:
            y = G.weight_only_gemm(x2, self.weight_q, self.weight_scale, bias=self.bias, group_size=self.group_size,
                                   w_int4=s.weight_dtype == "int4")
        else:
            # fp8/fp4 weight-only storage, fp32 compute, or large M: dequantize, then a float GEMM
            w = self._weight_gemm_dequantized().to(dt)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(dt))
        return y.to(self.original_dtype)


def has_forward_hooks(m: nn.Module) -> bool:
    """Something runs around ``m``'s forward: torch forward (pre-)hooks on ``m`` itself, or a forward
    wrapped on the instance (accelerate's offload hooks, diffusers' HookRegistry). A fused path that
    uses ``m``'s tensors without calling ``m`` would skip it; under sequential CPU offload ``m``'s
    weights are even on the meta device until its own hook loads them."""
    return bool(m._forward_hooks or m._forward_pre_hooks) or forward_wrapped(m)


def _own_forward(m: nn.Module, f, cls: type) -> bool:
    return getattr(f, "__self__", None) is m and getattr(f, "__func__", None) is cls.forward


def forward_wrapped(m: nn.Module) -> bool:
    """``m.forward`` replaced on the instance (diffusers' HookRegistry, accelerate's hooks do that): a
    forward defined by the class, or a replacement module's, would not be the one that runs. The
    class's own forward bound to ``m`` is no wrapper: accelerate leaves that behind when its hook
    is removed."""
    f = m.__dict__.get("forward")
    return f is not None and not _own_forward(m, f, type(m))


def set_class(m: nn.Module, cls: type) -> None:
    """``m.__class__ = cls``, first dropping a leftover instance ``forward`` bound to the class being
    left (see forward_wrapped): it would keep running that class's forward after the swap."""
    f = m.__dict__.get("forward")
    if f is not None and _own_forward(m, f, type(m)):
        del m.__dict__["forward"]
    m.__class__ = cls


class QuantLayerWrapper:
    """A module standing in for the quantized layer it holds as ``layer``, with that layer's inputs and
    outputs (MixDQ's BOSPrecomputed): LoRA, the patch report and unpatch's checks see through it."""

    layer: "QuantLayerBase"

    @property
    def qweight(self) -> torch.Tensor:  # (what peft reads a quantized base layer's device from)
        return self.layer.weight_q


def quantized_layer_of(module) -> Optional["QuantLayerBase"]:
    """The QuantLinear / QuantConv2d ``module`` is or wraps (``QuantLayerWrapper``), else None."""
    if isinstance(module, QuantLayerWrapper):
        module = module.layer
    return module if isinstance(module, QuantLayerBase) else None


def reason_for_shape(spec: QuantSpec, N: int, K: int) -> Optional[str]:
    """Why a [N, K] weight can't take ``spec`` (None: it can)."""
    if N == 0 or K == 0:  # (the float layer computes an empty or all-bias output; nothing to quantize)
        return f"the weight is empty ([N, K] = [{N}, {K}])"
    g = spec.weight_group_size
    if g is not None and K % g:
        return f"K={K} is not divisible by weight_group_size={g}"
    if spec.weight_dtype in ("int4", "fp4_e2m1") and K % 2:
        return f"K={K} is odd; {spec.weight_dtype} packs two values per byte"
    if spec.act_dtype == "int8" and K > G.MAX_INT8_K:
        return f"K={K} int8 products overflow the int32 sums above K={G.MAX_INT8_K}"
    return None


_FLOAT_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def own_forward_reason(module: nn.Module, kind: type) -> Optional[str]:
    """Why ``module``, an instance of ``kind`` (nn.Linear or nn.Conv2d), is not one a quantized layer can
    stand in for: a subclass with its own forward (or, for a conv, its own ``_conv_forward``) computes
    something else, which the replacement would not run. None if it can."""
    for attr in ("forward", "_conv_forward"):
        base = getattr(kind, attr, None)
        if base is not None and getattr(type(module), attr) is not base:
            return (f"{type(module).__name__} overrides nn.{kind.__name__}.{attr}, which a quantized layer would "
                    f"not run")
    return None


def float_weight_reason(module: nn.Module) -> Optional[str]:
    """Why ``module.weight`` is not a plain float tensor diffaccel can quantize (None: it is)."""
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "weight is not initialized yet (a lazy module: run one forward before quantizing it)"
    if weight.is_meta:
        return "weight is on the meta device"
    # torchao / NF4 / DTensor weights are tensor subclasses: their values are not a float matrix
    # to read (quantizing them again would at best dequantize another library's codes)
    if type(weight) not in (torch.Tensor, nn.Parameter) or type(weight.data) is not torch.Tensor:
        return (f"weight is a {type(weight.data).__name__} (quantized or sharded by another library); only plain "
                f"float weights are quantized")
    if weight.dtype not in _FLOAT_WEIGHT_DTYPES:
        return f"weight dtype {weight.dtype} is not float16, bfloat16 or float32"
    # these pre-hooks recompute `weight` from other parameters at every call (a replacement
    # without them would keep one stale weight, and the hooks it inherits would fail on it)
    hooks = tuple(module._forward_pre_hooks.values())
    if any(isinstance(h, prune.BasePruningMethod) for h in hooks):
        return "pruned with torch.nn.utils.prune; make the pruning permanent first (prune.remove(module, 'weight'))"
    if any(isinstance(h, WeightNorm) for h in hooks):
        return ("weight-normalized with torch.nn.utils.weight_norm; fold it into the weight first "
                "(torch.nn.utils.remove_weight_norm(module))")
    if any(isinstance(h, SpectralNorm) for h in hooks):
        return ("spectral-normalized with torch.nn.utils.spectral_norm; fold it into the weight first "
                "(torch.nn.utils.remove_spectral_norm(module))")
    return None


def check_float_weight(module: nn.Module):
    why = float_weight_reason(module)
    if why is not None:
        raise TypeError(f"module: expected a plain float16/bfloat16/float32 weight, but its {why}"
                        if why.startswith("weight ") else f"module: {why}")
    return module.weight


__all__ = ["QuantLayerBase", "QuantLayerWrapper", "quantized_layer_of", "forward_wrapped", "has_forward_hooks", "own_forward_reason", "reason_for_shape", "records_autograd", "resolve_spec",
           "set_class", "straight_through"]
