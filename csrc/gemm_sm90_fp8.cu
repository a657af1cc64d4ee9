// The sm_90a fp8 (e4m3) W8A8 GEMM (gemm_sm90.cuh): fp8 x fp8 -> fp32 with precise promotion of
// wgmma's partial sums, dequantization, bias, optional GELU (tanh) and cast in the epilogue.
#include "gemm_sm90.cuh"

namespace diffaccel {

at::Tensor fp8_gemm_sm90(const at::Tensor& a, const at::Tensor& w, const at::Tensor& a_scale,
                         const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                         at::ScalarType out_dtype, int64_t activation) {
#ifdef DIFFACCEL_WITH_CUTLASS
  return scaled_gemm_sm90(a, w, a_scale, w_scale, bias, out_dtype, at::kFloat8_e4m3fn, activation,
                          &sm90::dispatch<cutlass::float_e4m3_t>);
#else
  return scaled_gemm_sm90(a, w, a_scale, w_scale, bias, out_dtype, at::kFloat8_e4m3fn, activation, nullptr);
#endif
}

}  // namespace diffaccel
