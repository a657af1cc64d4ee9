#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "solver.h"

namespace diffaccel {
namespace {

using solver::Dst;
using solver::Moments;
using solver::Src;

constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // independent elements in flight per thread
constexpr int kMaxChunks = 256;

struct StepArgs {
  Src x, u, c, n, h0, h1, h2, l;
  Dst xo, ho, co;
  int last_dtype;  // -1: no last sample
  const float* coeffs;
  const void* row;  // nullptr: coeffs is one row
  bool row_is_long;
  int64_t n_rows, per_sample, chunk, n_chunks;
  const float* partials;  // [B, n_chunks, 4] (mean_c, M2_c, mean_g, M2_g), nullptr without rescale
  float s, rescale;
  bool has_cond, has_noise, write_history;
  int n_hist;
  const int64_t* seed;  // nullptr: no in-kernel noise; read on the device so a graph replays with a new seed
  uint64_t noise_offset;
};

__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

// Per (chunk, sample) block: mean and M2 of c and of g = u + s(c - u), two passes over the chunk.
__global__ void rescale_stats_kernel(Src u, Src c, float s, int64_t per_sample, int64_t chunk, float* partials) {
  __shared__ float shared[kThreads / 32];
  const int64_t b = blockIdx.y, base = b * per_sample, start = blockIdx.x * chunk;
  const int64_t stop = start + chunk < per_sample ? start + chunk : per_sample;
  const float count = static_cast<float>(stop - start);
  float sc = 0.f, sg = 0.f;
  for (int64_t i = start + threadIdx.x; i < stop; i += kThreads) {
    const float ci = c.at(base + i);
    sc += ci;
    sg += solver::guided(u.at(base + i), ci, s);
  }
  const float mean_c = block_sum(sc, shared) / count;
  const float mean_g = block_sum(sg, shared) / count;
  float mc = 0.f, mg = 0.f;
  for (int64_t i = start + threadIdx.x; i < stop; i += kThreads) {
    const float ci = c.at(base + i);
    const float dc = ci - mean_c, dg = solver::guided(u.at(base + i), ci, s) - mean_g;
    mc += dc * dc;
    mg += dg * dg;
  }
  const float m2_c = block_sum(mc, shared), m2_g = block_sum(mg, shared);
  if (threadIdx.x == 0) {
    float* out = partials + (b * gridDim.x + blockIdx.x) * 4;
    out[0] = mean_c;
    out[1] = m2_c;
    out[2] = mean_g;
    out[3] = m2_g;
  }
}

__device__ __forceinline__ Moments shfl_moments(const Moments& m, int o) {
  Moments r;
  r.count = __shfl_xor_sync(0xffffffffu, m.count, o);
  r.mean = __shfl_xor_sync(0xffffffffu, m.mean, o);
  r.m2 = __shfl_xor_sync(0xffffffffu, m.m2, o);
  return r;
}

// The step's coefficients (the row read on the device) into shared ``k``, and the guidance
// rescale factor of sample ``b`` from the per-chunk statistics (1 without rescaling).
__device__ __forceinline__ float load_step_constants(const StepArgs& a, int64_t b, float* k, float* factor) {
  if (threadIdx.x < solver::kNumCoeffs) {
    int64_t r = 0;
    bool bad = false;
    if (a.row != nullptr) {  // read on the device: no host sync, capturable
      r = a.row_is_long ? *static_cast<const int64_t*>(a.row) : *static_cast<const int32_t*>(a.row);
      bad = r < 0 || r >= a.n_rows;
      if (bad) r = 0;
    }
    float v = a.coeffs[r * solver::kNumCoeffs + threadIdx.x];
    if (bad && (threadIdx.x == solver::A_X || threadIdx.x == solver::B_X)) v = NAN;
    k[threadIdx.x] = v;
  }
  if (a.partials != nullptr && threadIdx.x < 32) {
    Moments mc, mg;
    for (int64_t j = threadIdx.x; j < a.n_chunks; j += 32) {
      const float* p = a.partials + (b * a.n_chunks + j) * 4;
      const int64_t rest = a.per_sample - j * a.chunk;
      const double cnt = static_cast<double>(rest < a.chunk ? rest : a.chunk);
      mc = solver::combine(mc, cnt, p[0], p[1]);
      mg = solver::combine(mg, cnt, p[2], p[3]);
    }
    for (int o = 16; o > 0; o >>= 1) {
      const Moments oc = shfl_moments(mc, o), og = shfl_moments(mg, o);
      mc = solver::combine(mc, oc.count, oc.mean, oc.m2);
      mg = solver::combine(mg, og.count, og.mean, og.m2);
    }
    if (threadIdx.x == 0) *factor = solver::rescale_factor(mc, mg, a.rescale);
  } else if (threadIdx.x == 0) {
    *factor = 1.f;
  }
  __syncthreads();
  return *factor;
}

// One element: guidance, noise, the step (the per-element math the CPU loop runs too).
__device__ __forceinline__ void step_element(const StepArgs& a, const float* k, float f, uint64_t seed, int64_t i,
                                             float x, float u, float c, float n, float h0, float h1, float h2,
                                             float l, float& xo, float& ho, float& co) {
  const bool philox = a.seed != nullptr;
  const float e = a.has_cond ? solver::guided(u, c, a.s) * f : u;
  const float nv = a.has_noise ? n : (philox ? solver::philox_normal(seed, a.noise_offset + static_cast<uint64_t>(i))
                                             : 0.f);
  solver::step_point(k, x, e, nv, h0, h1, h2, l, a.has_noise || philox, a.n_hist, a.last_dtype, xo, ho, co);
}

// Any layout and length: one element at a time, kPerThread of them per thread.
__global__ void fused_solver_step_kernel(StepArgs a) {
  __shared__ float k[solver::kNumCoeffs];
  __shared__ float factor;
  const int64_t b = blockIdx.y, base = b * a.per_sample;
  const float f = load_step_constants(a, b, k, &factor);
  const uint64_t seed = a.seed != nullptr ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t tile = static_cast<int64_t>(kThreads) * kPerThread;
  for (int64_t t0 = blockIdx.x * tile; t0 < a.per_sample; t0 += static_cast<int64_t>(gridDim.x) * tile) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t li = t0 + j * kThreads + threadIdx.x;
      if (li >= a.per_sample) break;
      const int64_t i = base + li;
      float xv, hv, cv = 0.f;
      step_element(a, k, f, seed, i, a.x.at(i), a.u.at(i), a.has_cond ? a.c.at(i) : 0.f,
                   a.has_noise ? a.n.at(i) : 0.f, a.n_hist >= 1 ? a.h0.at(i) : 0.f, a.n_hist >= 2 ? a.h1.at(i) : 0.f,
                   a.n_hist >= 3 ? a.h2.at(i) : 0.f, a.last_dtype >= 0 ? a.l.at(i) : 0.f, xv, hv, cv);
      a.xo.set(i, xv);
      if (a.write_history) a.ho.set(i, hv);
      if (a.last_dtype >= 0) a.co.set(i, cv);
    }
  }
}

// -- the vectorised kernel: kVec consecutive elements per 16-byte access ------------------------
// One element per access left each thread a few bytes in flight: 274 GB/s on an H200 for a
// bf16 video latent step (BENCHMARKS.md, 2026-12-04), far from HBM bandwidth. Here every
// tensor moves in 16-byte loads and stores (two for fp32), all issued before the math.

constexpr int kVec = 8;

__device__ __forceinline__ void load_vec(const Src& s, int64_t i, float (&v)[kVec]) {
  if (s.dtype == 0) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(s.p) + i);
    const float4 lo = p[0], hi = p[1];
    v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    return;
  }
  const uint4 r = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(s.p) + i);
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint16_t lo = static_cast<uint16_t>(w[j] & 0xffffu), hi = static_cast<uint16_t>(w[j] >> 16);
    if (s.dtype == 1) {
      v[2 * j] = static_cast<float>(c10::Half(lo, c10::Half::from_bits()));
      v[2 * j + 1] = static_cast<float>(c10::Half(hi, c10::Half::from_bits()));
    } else {
      v[2 * j] = static_cast<float>(c10::BFloat16(lo, c10::BFloat16::from_bits()));
      v[2 * j + 1] = static_cast<float>(c10::BFloat16(hi, c10::BFloat16::from_bits()));
    }
  }
}

// the bits Dst::set would write (the same conversions, so both kernels store identical values)
__device__ __forceinline__ uint32_t half_bits(int dtype, float v) {
  return dtype == 1 ? c10::Half(v).x : c10::BFloat16(v).x;
}

__device__ __forceinline__ void store_vec(const Dst& d, int64_t i, const float (&v)[kVec]) {
  if (d.dtype == 0) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(d.p) + i);
    p[0] = make_float4(v[0], v[1], v[2], v[3]);
    p[1] = make_float4(v[4], v[5], v[6], v[7]);
    return;
  }
  uint32_t w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) w[j] = half_bits(d.dtype, v[2 * j]) | (half_bits(d.dtype, v[2 * j + 1]) << 16);
  *reinterpret_cast<uint4*>(static_cast<uint16_t*>(d.p) + i) = make_uint4(w[0], w[1], w[2], w[3]);
}

// per_sample % kVec == 0 and every pointer 16-byte aligned (vectorisable() checks both).
__global__ void __launch_bounds__(kThreads) fused_solver_step_vec_kernel(StepArgs a) {
  __shared__ float k[solver::kNumCoeffs];
  __shared__ float factor;
  const int64_t b = blockIdx.y, base = b * a.per_sample;
  const float f = load_step_constants(a, b, k, &factor);
  const uint64_t seed = a.seed != nullptr ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t n_vec = a.per_sample / kVec;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; v < n_vec;
       v += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = base + v * kVec;
    float x[kVec], u[kVec], c[kVec] = {}, n[kVec] = {}, h0[kVec] = {}, h1[kVec] = {}, h2[kVec] = {}, l[kVec] = {};
    load_vec(a.x, i, x);
    load_vec(a.u, i, u);
    if (a.has_cond) load_vec(a.c, i, c);
    if (a.has_noise) load_vec(a.n, i, n);
    if (a.n_hist >= 1) load_vec(a.h0, i, h0);
    if (a.n_hist >= 2) load_vec(a.h1, i, h1);
    if (a.n_hist >= 3) load_vec(a.h2, i, h2);
    if (a.last_dtype >= 0) load_vec(a.l, i, l);
    float xo[kVec], ho[kVec], co[kVec] = {};
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      step_element(a, k, f, seed, i + j, x[j], u[j], c[j], n[j], h0[j], h1[j], h2[j], l[j], xo[j], ho[j], co[j]);
    store_vec(a.xo, i, xo);
    if (a.write_history) store_vec(a.ho, i, ho);
    if (a.last_dtype >= 0) store_vec(a.co, i, co);
  }
}

__global__ void philox4x32_kernel(const int64_t* seed, uint64_t offset, int64_t numel, int64_t* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  uint32_t w[4];
  solver::philox4x32_10(static_cast<uint64_t>(*seed), offset + static_cast<uint64_t>(i), w);
  for (int j = 0; j < 4; ++j) out[i * 4 + j] = w[j];
}

// Whether the vectorised kernel can run: whole vectors per sample, 16-byte aligned tensors.
bool vectorisable(const StepArgs& a) {
  if (a.per_sample % kVec != 0) return false;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  for (const void* p : {a.x.p, a.u.p, a.c.p, a.n.p, a.h0.p, a.h1.p, a.h2.p, a.l.p})
    if (p != nullptr && !aligned(p)) return false;
  for (const void* p : {a.xo.p, a.ho.p, a.co.p})
    if (p != nullptr && !aligned(p)) return false;
  return true;
}

Src src_of(const std::optional<at::Tensor>& t) {
  Src s;
  if (t.has_value()) {
    s.p = t->data_ptr();
    s.dtype = solver::dtype_code(t->scalar_type());
  }
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_solver_step_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& row, const std::optional<at::Tensor>& model_output_cond,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& h1, const std::optional<at::Tensor>& h2,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& last_sample, double guidance_scale,
    double guidance_rescale, at::ScalarType out_dtype,
    at::ScalarType history_dtype, bool write_history, const std::optional<at::Tensor>& noise_seed,
    int64_t noise_offset) {
  const c10::cuda::CUDAGuard guard(sample.device());
  auto [x_out, h_out, c_out] = prepare_solver_step(sample, model_output, coeffs, row, model_output_cond, h0, h1, h2,
                                                   noise, last_sample, out_dtype, history_dtype, write_history,
                                                   noise_seed, noise_offset);
  const float rescale_ratio = static_cast<float>(guidance_rescale);
  const bool rescale = model_output_cond.has_value() && rescale_ratio != 0.f;
  // the batch is gridDim.y (at most 65535); without per-sample statistics a step is one flat
  // sample (element i and its Philox counter are the same either way)
  const int64_t numel = sample.numel(), batch = rescale ? sample.size(0) : 1;
  if (numel == 0) return {x_out, h_out, c_out};
  DA_CHECK_ARG(batch <= 65535, "sample", "expected a batch of at most 65535 with guidance_rescale");
  auto stream = c10::cuda::getCurrentCUDAStream();

  StepArgs a;
  a.x = src_of(sample);
  a.u = src_of(model_output);
  a.c = src_of(model_output_cond);
  a.n = src_of(noise);
  a.h0 = src_of(h0);
  a.h1 = src_of(h1);
  a.h2 = src_of(h2);
  a.l = src_of(last_sample);
  a.last_dtype = last_sample.has_value() ? a.l.dtype : -1;
  a.co = Dst{c_out.data_ptr(), a.last_dtype < 0 ? 0 : a.last_dtype};
  a.xo = Dst{x_out.data_ptr(), solver::dtype_code(out_dtype)};
  a.ho = Dst{h_out.data_ptr(), solver::dtype_code(history_dtype)};
  a.coeffs = coeffs.data_ptr<float>();
  a.row = row.has_value() ? row->data_ptr() : nullptr;
  a.row_is_long = row.has_value() && row->scalar_type() == at::kLong;
  a.n_rows = coeffs.dim() == 2 ? coeffs.size(0) : 1;
  a.per_sample = numel / batch;
  a.has_cond = model_output_cond.has_value();
  a.has_noise = noise.has_value();
  a.write_history = write_history;
  a.n_hist = h0.has_value() + h1.has_value() + h2.has_value();
  a.seed = noise_seed.has_value() ? noise_seed->data_ptr<int64_t>() : nullptr;
  a.noise_offset = static_cast<uint64_t>(noise_offset);
  a.s = static_cast<float>(guidance_scale);
  a.rescale = rescale_ratio;
  a.chunk = 4096;
  while ((a.per_sample + a.chunk - 1) / a.chunk > kMaxChunks) a.chunk *= 2;
  a.n_chunks = (a.per_sample + a.chunk - 1) / a.chunk;
  a.partials = nullptr;
  at::Tensor partials;
  if (rescale) {  // the second launch: per-sample statistics first
    partials = at::empty({batch, a.n_chunks, 4}, sample.options().dtype(at::kFloat));
    rescale_stats_kernel<<<dim3(static_cast<unsigned>(a.n_chunks), static_cast<unsigned>(batch)), kThreads, 0,
                           stream>>>(a.u, a.c, a.s, a.per_sample, a.chunk, partials.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    a.partials = partials.data_ptr<float>();
  }
  if (vectorisable(a)) {
    const int64_t blocks = std::min<int64_t>((a.per_sample / kVec + kThreads - 1) / kThreads, 65535);
    fused_solver_step_vec_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(batch)), kThreads, 0,
                                   stream>>>(a);
  } else {
    const int64_t tile = static_cast<int64_t>(kThreads) * kPerThread;
    const int64_t blocks = std::min<int64_t>((a.per_sample + tile - 1) / tile, 65535);
    fused_solver_step_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(batch)), kThreads, 0,
                               stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_out, h_out, c_out};
}

at::Tensor philox4x32_cuda(const at::Tensor& seed, int64_t offset, int64_t numel) {
  const c10::cuda::CUDAGuard guard(seed.device());
  check_philox_seed(seed);
  DA_CHECK_ARG(numel >= 0 && offset >= 0 && offset <= std::numeric_limits<int64_t>::max() - numel, "offset",
               "expected 0 <= offset and offset + numel < 2**63");
  auto out = at::empty({numel, 4}, seed.options().dtype(at::kLong));
  if (numel == 0) return out;
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  DA_CHECK_ARG(blocks <= 2147483647LL, "numel", "too large for one launch");
  philox4x32_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      seed.data_ptr<int64_t>(), static_cast<uint64_t>(offset), numel, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace diffaccel
