// INT8 activation quantization. The per-element math is written once here and compiled into
// both the CPU loop and the CUDA kernels, so the CPU tests pin the arithmetic the GPU runs.
// It matches diffaccel.ops.quantize's torch reference bit for bit: fp32, IEEE division,
// round half to even (rintf in the default rounding mode; nvcc's '/' is IEEE without fast-math).
#pragma once
#include <cmath>
#include "common.h"

namespace diffaccel {

constexpr float kAmaxFloor = 1e-12f;

DA_HD int8_t quantize_int8(float x, float scale, float zero_point) {
  float q = rintf(x / scale) + zero_point;
  q = fminf(fmaxf(q, -128.f), 127.f);
  return static_cast<int8_t>(q);
}

DA_HD float per_token_scale(float amax) { return fmaxf(amax, kAmaxFloor) / 127.f; }

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
