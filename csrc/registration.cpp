// The one place where diffaccel's compiled kernels are registered with torch. Schemas here are
// the extension's kernels (ext_*); the public ops (diffaccel::<name>, with their fake kernels)
// are defined in diffaccel/ops and choose among the extension, Triton and the torch reference.
#include <torch/extension.h>
#include <torch/library.h>
#include "gemm_sm90.h"
#include "quantize.h"
#include "solver.h"

#ifndef DIFFACCEL_CUDA_ARCHS
#define DIFFACCEL_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(diffaccel, m) {
  m.def("ext_quantize_per_tensor(Tensor x, Tensor scale, Tensor zero_point) -> Tensor");
  m.def("ext_quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("ext_fused_solver_step(Tensor sample, Tensor model_output, Tensor coeffs, Tensor? row, "
        "Tensor? model_output_cond, Tensor? h0, Tensor? h1, Tensor? h2, Tensor? noise, Tensor? last_sample, "
        "float guidance_scale, float guidance_rescale, ScalarType out_dtype, ScalarType history_dtype, "
        "bool write_history, Tensor? noise_seed=None, int noise_offset=0) -> (Tensor, Tensor, Tensor)");
  m.def("ext_philox4x32(Tensor seed, int offset, int numel) -> Tensor");  // the raw noise stream, for tests
  m.def("ext_int8_gemm_sm90(Tensor a, Tensor w, Tensor a_scale, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype, Tensor? zero_point=None, Tensor? w_sum=None, int activation=0) -> Tensor");
  m.def("ext_fp8_gemm_sm90(Tensor a, Tensor w, Tensor a_scale, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype, int activation=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffaccel, CPU, m) {
  m.impl("ext_quantize_per_tensor", &diffaccel::quantize_per_tensor_cpu);
  m.impl("ext_quantize_per_token", &diffaccel::quantize_per_token_cpu);
  m.impl("ext_fused_solver_step", &diffaccel::fused_solver_step_cpu);
  m.impl("ext_philox4x32", &diffaccel::philox4x32_cpu);
}

#ifdef DIFFACCEL_WITH_CUDA
TORCH_LIBRARY_IMPL(diffaccel, CUDA, m) {
  m.impl("ext_quantize_per_tensor", &diffaccel::quantize_per_tensor_cuda);
  m.impl("ext_quantize_per_token", &diffaccel::quantize_per_token_cuda);
  m.impl("ext_fused_solver_step", &diffaccel::fused_solver_step_cuda);
  m.impl("ext_philox4x32", &diffaccel::philox4x32_cuda);
  m.impl("ext_int8_gemm_sm90", &diffaccel::int8_gemm_sm90);
  m.impl("ext_fp8_gemm_sm90", &diffaccel::fp8_gemm_sm90);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "diffaccel compiled kernels (registered as torch.ops.diffaccel.ext_*)";
  module.def("cuda_archs", [] { return std::string(DIFFACCEL_CUDA_ARCHS); },
             "Semicolon-separated archs this build holds SASS for; empty when built without CUDA.");
  module.def("cutlass_sm90", [] {
#ifdef DIFFACCEL_WITH_CUTLASS
    return true;
#else
    return false;
#endif
  }, "Whether the CUTLASS sm_90a GEMMs (ext_int8_gemm_sm90, ext_fp8_gemm_sm90) were compiled.");
}
