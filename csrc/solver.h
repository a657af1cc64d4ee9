// Fused diffusion-solver step. The per-element math is written once here and compiled into the
// CPU loop and the CUDA kernel, so CPU tests pin the arithmetic the GPU runs. Layout and
// meaning of the coefficients: diffaccel/ops/solver.py (the torch reference).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "common.h"

namespace diffaccel {
namespace solver {

constexpr int kNumCoeffs = 24;
enum Coeff {
  A_X = 0, A_E, A_N, CLIP, C_P, C_X, B_X, B_E, B_P, B_H0, B_H1, B_H2, B_N, D_L, D_P, D_H0, D_H1, D_H2,
  C_H0, C_H1, C_H2  // history terms of the new history entry (DC-Solver's compensated x0)
};

// A float tensor of any storage dtype, read as fp32. The dtype branch is uniform across a
// launch, so it costs no divergence; it saves compiling every dtype combination of 8 tensors.
struct Src {
  const void* p = nullptr;
  int dtype = 0;  // 0 fp32, 1 fp16, 2 bf16
  DA_HD float at(int64_t i) const {
    if (dtype == 1) return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    if (dtype == 2) return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    return static_cast<const float*>(p)[i];
  }
};

struct Dst {
  void* p = nullptr;
  int dtype = 0;
  DA_HD void set(int64_t i, float v) const {
    if (dtype == 1) static_cast<c10::Half*>(p)[i] = c10::Half(v);
    else if (dtype == 2) static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v);
    else static_cast<float*>(p)[i] = v;
  }
};

// v rounded to a storage dtype and read back, as diffusers' .to(dtype) between two stages does
DA_HD float round_to(int dtype, float v) {
  if (dtype == 1) return static_cast<float>(c10::Half(v));
  if (dtype == 2) return static_cast<float>(c10::BFloat16(v));
  return v;
}

// -- Philox4x32-10: the in-kernel noise, Triton's tl.randn stream word for word ------------------
// Formula and constants: diffaccel/ops/philox.py (the torch reference). Element i of a step uses
// counter (lo32(offset + i), hi32(offset + i), 0, 0) and key (lo32(seed), hi32(seed)).
DA_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

DA_HD void philox4x32_10(uint64_t seed, uint64_t counter, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {  // a constant trip count: nvcc unrolls it
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Triton's uint_to_uniform_float: the word read as int32, negatives folded by ~x, scaled into [0, 1).
DA_HD float uint32_to_uniform(uint32_t w) {
  const int32_t x = static_cast<int32_t>(w);
  return static_cast<float>(x < 0 ? ~x : x) * 4.6566127342e-10f;
}

// Triton's randn: Box-Muller on the first two words (u1 clamped to 1e-7), fp32 throughout.
DA_HD float philox_normal(uint64_t seed, uint64_t counter) {
  uint32_t w[4];
  philox4x32_10(seed, counter, w);
  const float u1 = fmaxf(1.0e-7f, uint32_to_uniform(w[0]));
  const float th = 6.283185307179586f * uint32_to_uniform(w[1]);
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(th);
}

inline int dtype_code(at::ScalarType t) { return t == at::kHalf ? 1 : (t == at::kBFloat16 ? 2 : 0); }

DA_HD float guided(float u, float c, float s) { return u + s * (c - u); }

// e: the (guided, rescaled) model output. Writes the new sample, the history entry and, with a
// last sample (last_dtype >= 0; UniPC's corrector), the corrected sample rounded to its dtype.
DA_HD void step_point(const float* k, float x, float e, float n, float h0, float h1, float h2, float last,
                      bool has_noise, int n_hist, int last_dtype, float& x_out, float& h_out, float& c_out) {
  float p = k[A_X] * x + k[A_E] * e;
  float xo = k[B_E] * e;
  if (has_noise) {
    p += k[A_N] * n;
    xo += k[B_N] * n;
  }
  // a clip that lets NaN through, as the reference's torch.maximum/minimum do (fmaxf/fminf would
  // turn a NaN -- an off-table row, a NaN model output -- into -CLIP)
  p = p < -k[CLIP] ? -k[CLIP] : (p > k[CLIP] ? k[CLIP] : p);
  h_out = k[C_P] * p + k[C_X] * x;
  xo += k[B_P] * p;
  if (n_hist >= 1) {
    xo += k[B_H0] * h0;
    h_out += k[C_H0] * h0;
  }
  if (n_hist >= 2) {
    xo += k[B_H1] * h1;
    h_out += k[C_H1] * h1;
  }
  if (n_hist >= 3) {
    xo += k[B_H2] * h2;
    h_out += k[C_H2] * h2;
  }
  if (last_dtype >= 0) {
    c_out = round_to(last_dtype, k[D_L] * last + k[D_P] * p + k[D_H0] * h0 + k[D_H1] * h1 + k[D_H2] * h2);
    xo += k[B_X] * c_out;
  } else {
    xo += k[B_X] * x;
  }
  x_out = xo;
}

// Chan's combination of per-chunk (count, mean, M2): the unbiased variance of the whole.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
};

DA_HD Moments combine(Moments a, double count, double mean, double m2) {
  if (count == 0) return a;
  Moments r;
  r.count = a.count + count;
  const double delta = mean - a.mean;
  r.mean = a.mean + delta * count / r.count;
  r.m2 = a.m2 + m2 + delta * delta * a.count * count / r.count;
  return r;
}

DA_HD float rescale_factor(const Moments& mc, const Moments& mg, float rescale) {
  const double var_c = mc.m2 / (mc.count - 1.0), var_g = mg.m2 / (mg.count - 1.0);
  return rescale * static_cast<float>(sqrt(var_c) / sqrt(var_g)) + (1.f - rescale);
}

}  // namespace solver

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_solver_step_cpu(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& row, const std::optional<at::Tensor>& model_output_cond,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& h1, const std::optional<at::Tensor>& h2,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& last_sample, double guidance_scale,
    double guidance_rescale, at::ScalarType out_dtype,
    at::ScalarType history_dtype, bool write_history, const std::optional<at::Tensor>& noise_seed,
    int64_t noise_offset);
// Raw Philox words [numel, 4] (int64 holding uint32) for counters offset .. offset + numel - 1: tests only.
at::Tensor philox4x32_cpu(const at::Tensor& seed, int64_t offset, int64_t numel);
#ifdef DIFFACCEL_WITH_CUDA
at::Tensor philox4x32_cuda(const at::Tensor& seed, int64_t offset, int64_t numel);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_solver_step_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& row, const std::optional<at::Tensor>& model_output_cond,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& h1, const std::optional<at::Tensor>& h2,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& last_sample, double guidance_scale,
    double guidance_rescale, at::ScalarType out_dtype,
    at::ScalarType history_dtype, bool write_history, const std::optional<at::Tensor>& noise_seed,
    int64_t noise_offset);
#endif

inline void check_solver_args(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coeffs,
                              const std::optional<at::Tensor>& row,
                              std::initializer_list<std::pair<const char*, const std::optional<at::Tensor>*>> likes,
                              at::ScalarType out_dtype, at::ScalarType history_dtype) {
  check_float_input(sample, "sample");
  DA_CHECK_ARG(sample.dim() >= 1, "sample", "expected a batch dimension");
  auto check_like = [&](const at::Tensor& t, const char* name) {
    check_float_input(t, name);
    DA_CHECK_ARG(t.sizes() == sample.sizes(), name, "expected shape ", sample.sizes(), " like sample, got ",
                 t.sizes());
    check_same_device(t, sample, name);
  };
  check_like(model_output, "model_output");
  for (const auto& [name, t] : likes)
    if (t->has_value()) check_like(t->value(), name);
  DA_CHECK_ARG(coeffs.scalar_type() == at::kFloat && coeffs.is_contiguous() && coeffs.size(-1) == solver::kNumCoeffs,
               "coeffs", "expected contiguous float32 [..., ", solver::kNumCoeffs, "]");
  check_same_device(coeffs, sample, "coeffs");
  if (row.has_value()) {
    DA_CHECK_ARG(row->numel() == 1 && (row->scalar_type() == at::kLong || row->scalar_type() == at::kInt), "row",
                 "expected one int32/int64 index");
    DA_CHECK_ARG(coeffs.dim() == 2, "coeffs", "expected a table [R, ", solver::kNumCoeffs, "] with row");
    check_same_device(*row, sample, "row");
  } else {
    DA_CHECK_ARG(coeffs.dim() == 1, "coeffs", "expected one row [", solver::kNumCoeffs, "] without row");
  }
  for (auto d : {out_dtype, history_dtype})
    DA_CHECK_ARG(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, "out_dtype/history_dtype",
                 "expected float16, bfloat16 or float32, got ", d);
}

inline void check_philox_seed(const at::Tensor& seed) {
  DA_CHECK_ARG(seed.scalar_type() == at::kLong && seed.numel() == 1, "noise_seed",
               "expected an int64 tensor with one element, got ", seed.scalar_type(), " ", seed.sizes());
}

// Validation and output allocation shared by the CPU and CUDA entry points:
// (new sample, new history entry, corrected sample); unused outputs are empty.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_solver_step(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& row, const std::optional<at::Tensor>& model_output_cond,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& h1, const std::optional<at::Tensor>& h2,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& last_sample, at::ScalarType out_dtype,
    at::ScalarType history_dtype, bool write_history, const std::optional<at::Tensor>& noise_seed,
    int64_t noise_offset) {
  check_solver_args(sample, model_output, coeffs, row,
                    {{"model_output_cond", &model_output_cond}, {"h0", &h0}, {"h1", &h1}, {"h2", &h2},
                     {"noise", &noise}, {"last_sample", &last_sample}},
                    out_dtype, history_dtype);
  if (noise_seed.has_value()) {
    DA_CHECK_ARG(!noise.has_value(), "noise_seed", "given together with noise; pass one of them");
    check_philox_seed(*noise_seed);
    check_same_device(*noise_seed, sample, "noise_seed");
    DA_CHECK_ARG(noise_offset >= 0 && noise_offset <= std::numeric_limits<int64_t>::max() - sample.numel(),
                 "noise_offset", "expected 0 <= noise_offset <= 2**63 - 1 - numel, got ", noise_offset);
  }
  DA_CHECK_ARG(!h1.has_value() || h0.has_value(), "h1", "given without h0");
  DA_CHECK_ARG(!h2.has_value() || h1.has_value(), "h2", "given without h1");
  auto x_out = at::empty(sample.sizes(), sample.options().dtype(out_dtype));
  // without write_history the entry is not stored (a step whose caller drops it saves a full write)
  auto h_out = write_history ? at::empty(sample.sizes(), sample.options().dtype(history_dtype))
                             : at::empty({0}, sample.options().dtype(history_dtype));
  auto c_out = last_sample.has_value() ? at::empty(sample.sizes(), last_sample->options())
                                       : at::empty({0}, sample.options());
  return {x_out, h_out, c_out};
}

}  // namespace diffaccel
