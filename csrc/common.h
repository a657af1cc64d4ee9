// Shared by every diffaccel C++/CUDA source: host/device qualifiers and argument checks whose
// messages name the argument, as the Python wrappers' do.
#pragma once
#include <ATen/Dispatch.h>
#include <torch/types.h>

#ifdef __CUDACC__
#define DA_HD __host__ __device__ __forceinline__
#else
#define DA_HD inline
#endif

#define DA_CHECK_ARG(cond, name, ...) TORCH_CHECK(cond, name, ": ", __VA_ARGS__)

// The storage dtypes diffaccel kernels take (no double: half the instantiations, half the build).
#define DA_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)               \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace diffaccel {

inline void check_float_input(const at::Tensor& t, const char* name) {
  DA_CHECK_ARG(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
               name, "expected float16, bfloat16 or float32, got ", t.scalar_type());
  DA_CHECK_ARG(t.is_contiguous(), name, "expected a contiguous tensor");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  DA_CHECK_ARG(t.device() == ref.device(), name, "expected a tensor on ", ref.device(), ", got one on ", t.device());
}

}  // namespace diffaccel
