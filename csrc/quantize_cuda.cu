#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "quantize.h"

namespace diffaccel {
namespace {

// Scale and zero point are read on the device: no host sync, capturable in a CUDA graph.
template <typename T>
__global__ void quantize_per_tensor_kernel(const T* __restrict__ x, const float* __restrict__ scale,
                                           const int32_t* __restrict__ zero_point, int8_t* __restrict__ out,
                                           int64_t n) {
  const float s = *scale;
  const float zp = static_cast<float>(*zero_point);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = quantize_int8(static_cast<float>(x[i]), s, zp);
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// One block per row: amax by a block reduction, then quantize. The row is re-read from L2,
// which for diffusion widths (320-5120) is cheaper than staging it in shared memory.
template <typename T, int kThreads>
__global__ void quantize_per_token_kernel(const T* __restrict__ x, int8_t* __restrict__ out,
                                          float* __restrict__ scales, int64_t K) {
  __shared__ float warp_amax[kThreads / 32];
  __shared__ float row_scale;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  int8_t* orow = out + row * K;
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) amax = nan_max(amax, fabsf(static_cast<float>(xr[k])));
  amax = warp_max(amax);
  if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < kThreads / 32 ? warp_amax[threadIdx.x] : 0.f;
    v = warp_max(v);
    if (threadIdx.x == 0) {
      row_scale = per_token_scale(v);
      scales[row] = row_scale;
    }
  }
  __syncthreads();
  const float s = row_scale;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) orow[k] = quantize_int8(static_cast<float>(xr[k]), s, 0.f);
}

}  // namespace

at::Tensor quantize_per_tensor_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point) {
  check_quantize_args(x, scale, zero_point);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535LL * 8));
  auto stream = c10::cuda::getCurrentCUDAStream();
  DA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "quantize_per_tensor_cuda", [&] {
    quantize_per_tensor_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), scale.data_ptr<float>(),
        zero_point.data_ptr<int32_t>(), out.data_ptr<int8_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  check_float_input(x, "x");
  DA_CHECK_ARG(x.dim() >= 1 && x.size(-1) > 0, "x", "expected a non-empty last dimension");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1), M = x.numel() / K;
  auto out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = 1;
  auto scales = at::empty(scale_shape, x.options().dtype(at::kFloat));
  if (M == 0) return {out, scales};
  constexpr int kThreads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  DA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "quantize_per_token_cuda", [&] {
    quantize_per_token_kernel<scalar_t, kThreads><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<int8_t>(), scales.data_ptr<float>(), K);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, scales};
}

}  // namespace diffaccel
