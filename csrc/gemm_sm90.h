// The W8A8 GEMMs on Hopper (CUTLASS 3, sm_90a): int8 and fp8 e4m3; see gemm_sm90.cuh.
#pragma once
#include <torch/types.h>

namespace diffaccel {

// rows at or below which the 64 x 128 ping-pong tile runs (above: 128 x 128 cooperative)
constexpr int64_t kSm90SmallM = 128;

#ifdef DIFFACCEL_WITH_CUDA
// a [M, K] and w [N, K] contiguous (int8, or float8_e4m3fn for fp8_gemm_sm90), K % 16 == 0,
// N % 8 == 0, 16-byte aligned; a_scale fp32 [M] or [1]; w_scale fp32 [N]; bias fp32 [N] or none;
// out_dtype float16 or bfloat16; activation 0 (none) or 2 (GELU, tanh form); int8 only:
// zero_point int32 [1] with w_sum int32 [N] (row sums of w) for static asymmetric activations.
// sm_90 only.
at::Tensor int8_gemm_sm90(const at::Tensor& a, const at::Tensor& w, const at::Tensor& a_scale,
                          const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype, const c10::optional<at::Tensor>& zero_point,
                          const c10::optional<at::Tensor>& w_sum, int64_t activation);
at::Tensor fp8_gemm_sm90(const at::Tensor& a, const at::Tensor& w, const at::Tensor& a_scale,
                         const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                         at::ScalarType out_dtype, int64_t activation);
#endif

}  // namespace diffaccel
