#include <ATen/Parallel.h>
#include "solver.h"

namespace diffaccel {

using solver::Dst;
using solver::Src;

static Src src_of(const std::optional<at::Tensor>& t) {
  Src s;
  if (t.has_value()) {
    s.p = t->data_ptr();
    s.dtype = solver::dtype_code(t->scalar_type());
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_solver_step_cpu(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& row, const std::optional<at::Tensor>& model_output_cond,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& h1, const std::optional<at::Tensor>& h2,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& last_sample, double guidance_scale,
    double guidance_rescale, at::ScalarType out_dtype,
    at::ScalarType history_dtype, bool write_history, const std::optional<at::Tensor>& noise_seed,
    int64_t noise_offset) {
  auto [x_out, h_out, c_out] = prepare_solver_step(sample, model_output, coeffs, row, model_output_cond, h0, h1, h2,
                                                   noise, last_sample, out_dtype, history_dtype, write_history,
                                                   noise_seed, noise_offset);
  const int64_t batch = sample.size(0), numel = sample.numel();
  if (numel == 0) return {x_out, h_out, c_out};
  const int64_t per_sample = numel / batch;

  float k[solver::kNumCoeffs];
  const float* table = coeffs.data_ptr<float>();
  int64_t r = 0;
  bool bad_row = false;
  if (row.has_value()) {
    r = row->scalar_type() == at::kLong ? row->data_ptr<int64_t>()[0] : row->data_ptr<int32_t>()[0];
    bad_row = r < 0 || r >= coeffs.size(0);
    if (bad_row) r = 0;
  }
  for (int j = 0; j < solver::kNumCoeffs; ++j) k[j] = table[r * solver::kNumCoeffs + j];
  if (bad_row) k[solver::A_X] = k[solver::B_X] = NAN;  // as on the GPU: poison, never read out of bounds

  const Src x = src_of(sample), u = src_of(model_output), c = src_of(model_output_cond), n = src_of(noise),
            s0 = src_of(h0), s1 = src_of(h1), s2 = src_of(h2), l = src_of(last_sample);
  const Dst xo{x_out.data_ptr(), solver::dtype_code(out_dtype)};
  const Dst ho{h_out.data_ptr(), solver::dtype_code(history_dtype)};
  const int last_dtype = last_sample.has_value() ? l.dtype : -1;
  const Dst co{c_out.data_ptr(), last_dtype < 0 ? 0 : last_dtype};
  const bool has_cond = model_output_cond.has_value(), has_noise = noise.has_value();
  const bool philox = noise_seed.has_value();
  const uint64_t seed = philox ? static_cast<uint64_t>(noise_seed->data_ptr<int64_t>()[0]) : 0;
  const uint64_t counter0 = static_cast<uint64_t>(noise_offset);
  const int n_hist = h0.has_value() + h1.has_value() + h2.has_value();
  const float s = static_cast<float>(guidance_scale), rescale = static_cast<float>(guidance_rescale);

  std::vector<float> factor(batch, 1.f);
  if (has_cond && rescale != 0.f) {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t base = b * per_sample;
        double sum_c = 0, sum_g = 0;
        for (int64_t i = 0; i < per_sample; ++i) {
          const float ci = c.at(base + i);
          sum_c += ci;
          sum_g += solver::guided(u.at(base + i), ci, s);
        }
        solver::Moments mc, mg;
        const double mean_c = sum_c / per_sample, mean_g = sum_g / per_sample;
        double m2_c = 0, m2_g = 0;
        for (int64_t i = 0; i < per_sample; ++i) {
          const float ci = c.at(base + i);
          const double dc = ci - mean_c, dg = solver::guided(u.at(base + i), ci, s) - mean_g;
          m2_c += dc * dc;
          m2_g += dg * dg;
        }
        mc = solver::combine(mc, per_sample, mean_c, m2_c);
        mg = solver::combine(mg, per_sample, mean_g, m2_g);
        factor[b] = solver::rescale_factor(mc, mg, rescale);
      }
    });
  }

  at::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float e = u.at(i);
      if (has_cond) e = solver::guided(e, c.at(i), s) * factor[i / per_sample];
      float xv, hv, cv = 0.f;
      const float nv = has_noise ? n.at(i) : (philox ? solver::philox_normal(seed, counter0 + i) : 0.f);
      solver::step_point(k, x.at(i), e, nv, n_hist >= 1 ? s0.at(i) : 0.f,
                         n_hist >= 2 ? s1.at(i) : 0.f, n_hist >= 3 ? s2.at(i) : 0.f,
                         last_dtype >= 0 ? l.at(i) : 0.f, has_noise || philox, n_hist, last_dtype, xv, hv, cv);
      xo.set(i, xv);
      if (write_history) ho.set(i, hv);
      if (last_dtype >= 0) co.set(i, cv);
    }
  });
  return {x_out, h_out, c_out};
}

at::Tensor philox4x32_cpu(const at::Tensor& seed, int64_t offset, int64_t numel) {
  check_philox_seed(seed);
  DA_CHECK_ARG(numel >= 0 && offset >= 0 && offset <= std::numeric_limits<int64_t>::max() - numel, "offset",
               "expected 0 <= offset and offset + numel < 2**63");
  auto out = at::empty({numel, 4}, seed.options().dtype(at::kLong));
  const uint64_t s = static_cast<uint64_t>(seed.data_ptr<int64_t>()[0]);
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, numel, 1 << 12, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint32_t w[4];
      solver::philox4x32_10(s, static_cast<uint64_t>(offset + i), w);
      for (int j = 0; j < 4; ++j) o[i * 4 + j] = w[j];
    }
  });
  return out;
}

}  // namespace diffaccel
