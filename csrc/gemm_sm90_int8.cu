// The sm_90a int8 W8A8 GEMM (gemm_sm90.cuh): int8 x int8 -> int32, zero-point correction,
// dequantization, bias, optional GELU (tanh) and cast in the epilogue.
#include "gemm_sm90.cuh"

namespace diffaccel {

at::Tensor int8_gemm_sm90(const at::Tensor& a, const at::Tensor& w, const at::Tensor& a_scale,
                          const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype, const c10::optional<at::Tensor>& zero_point,
                          const c10::optional<at::Tensor>& w_sum, int64_t activation) {
#ifdef DIFFACCEL_WITH_CUTLASS
  return scaled_gemm_sm90(a, w, a_scale, w_scale, bias, out_dtype, at::kChar, activation, &sm90::dispatch<int8_t>,
                          zero_point, w_sum);
#else
  return scaled_gemm_sm90(a, w, a_scale, w_scale, bias, out_dtype, at::kChar, activation, nullptr);
#endif
}

}  // namespace diffaccel
