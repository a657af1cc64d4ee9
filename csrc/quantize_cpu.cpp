#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include "quantize.h"

namespace diffaccel {

at::Tensor quantize_per_tensor_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point) {
  check_quantize_args(x, scale, zero_point);
  auto out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  const float s = scale.item<float>();
  const float zp = static_cast<float>(zero_point.item<int32_t>());
  int8_t* o = out.data_ptr<int8_t>();
  DA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "quantize_per_tensor_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = quantize_int8(static_cast<float>(xp[i]), s, zp);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x) {
  check_float_input(x, "x");
  DA_CHECK_ARG(x.dim() >= 1 && x.size(-1) > 0, "x", "expected a non-empty last dimension");
  const int64_t K = x.size(-1), M = x.numel() / K;
  auto out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = 1;
  auto scales = at::empty(scale_shape, x.options().dtype(at::kFloat));
  int8_t* o = out.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  DA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "quantize_per_token_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = nan_max(amax, fabsf(static_cast<float>(row[k])));
        const float s = per_token_scale(amax);
        for (int64_t k = 0; k < K; ++k) o[r * K + k] = quantize_int8(static_cast<float>(row[k]), s, 0.f);
        sp[r] = s;
      }
    });
  });
  return {out, scales};
}

}  // namespace diffaccel
