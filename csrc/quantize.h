// INT8 activation quantization. The per-element math is written once here and compiled into
// both the CPU loop and the CUDA kernels, so the CPU tests pin the arithmetic the GPU runs.
// It matches diffaccel.ops.quantize's torch reference bit for bit: fp32, IEEE division,
// round half to even (rintf in the default rounding mode; nvcc's '/' is IEEE without fast-math).
#pragma once
#include <cmath>
#include "common.h"

namespace diffaccel {

constexpr float kAmaxFloor = 1e-12f;

// A NaN code becomes 0 before the zero point (as in the reference: fmaxf/fminf would make it -128).
DA_HD int8_t quantize_int8(float x, float scale, float zero_point) {
  float q = rintf(x / scale);
  if (q != q) q = 0.f;
  q = fminf(fmaxf(q + zero_point, -128.f), 127.f);
  return static_cast<int8_t>(q);
}

// Max that keeps a NaN (fmaxf drops it), so a row's amax is NaN if any element is, Inf if one is.
DA_HD float nan_max(float a, float b) { return (a != a || b != b) ? NAN : fmaxf(a, b); }

// A row holding a NaN or Inf gets a NaN scale, so its output dequantizes to NaN as it would in
// float (the reference adds sum(x * 0) to the scale; a - a == 0 exactly when a is finite).
DA_HD float per_token_scale(float amax) { return amax - amax == 0.f ? fmaxf(amax, kAmaxFloor) / 127.f : NAN; }

at::Tensor quantize_per_tensor_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point);
std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x);
#ifdef DIFFACCEL_WITH_CUDA
at::Tensor quantize_per_tensor_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point);
std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x);
#endif

inline void check_quantize_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point) {
  check_float_input(x, "x");
  DA_CHECK_ARG(scale.scalar_type() == at::kFloat && scale.numel() == 1, "scale", "expected one float32 value");
  DA_CHECK_ARG(zero_point.scalar_type() == at::kInt && zero_point.numel() == 1, "zero_point",
               "expected one int32 value");
  check_same_device(scale, x, "scale");
  check_same_device(zero_point, x, "zero_point");
}

}  // namespace diffaccel
