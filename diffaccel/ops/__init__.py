"""The op layer: each op is a torch.library custom op with a fake kernel, one torch
reference, and backend kernels chosen per call by ``_backend.choose``."""
from ._backend import BACKENDS, BackendUnavailable, explain, use_backend
from .quantize import quantize_per_tensor, quantize_per_token
from .gemm import (fp8_gemm, fp8_linear, int8_gemm, int8_linear, quantize_activation_fp8, quantize_activation_int8,
                   weight_only_gemm)
from .conv import fp8_conv2d, int8_conv2d
from .ffn import fp8_ffn_up, int8_ffn_up
from .norm import group_norm_affine, layer_norm_quantize
from .solver import fused_solver_step
from .attention import attention

__all__ = ["BACKENDS", "BackendUnavailable", "explain", "use_backend", "quantize_per_tensor", "quantize_per_token",
           "int8_gemm", "int8_linear", "quantize_activation_int8", "fp8_gemm", "fp8_linear", "quantize_activation_fp8",
           "weight_only_gemm", "int8_conv2d", "fp8_conv2d", "int8_ffn_up", "fp8_ffn_up", "group_norm_affine",
           "layer_norm_quantize", "fused_solver_step", "attention"]
