// The W8A8 GEMMs for Hopper (sm_90a) on CUTLASS 3, shared by gemm_sm90_int8.cu (int8 x int8 with
// int32 accumulation) and gemm_sm90_fp8.cu (fp8 e4m3 x e4m3 with fp32 accumulation), one
// translation unit each so that the two compile in parallel. TMA loads, a warp-specialised wgmma
// main loop, and the dequantization fused into the epilogue as an epilogue visitor tree:
//
//   out[m, n] = cast_rn( act( (fp32(acc[m, n]) * a_scale[m]) * w_scale[n] + bias[n] ) )
//
// act: none, or GELU's tanh form (the feed-forward up projection of Flux, SD3, PixArt, DiT, Wan:
// diffaccel.ops.int8_ffn_up / fp8_ffn_up), written as the Triton epilogue writes it.
//
// the order and rounding of diffaccel.ops.gemm's references (int8_act_gemm_reference,
// fp8_gemm_reference): every product and the sum are separate IEEE round-to-nearest operations
// (__fmul_rn / __fadd_rn, which nvcc never contracts into an FMA) and the int32 to fp32
// conversion rounds to nearest as torch's .float() does, so int8 results are bit-exact; fp8
// results equal the reference up to the order of the fp32 accumulation (the main loop promotes
// wgmma's partial sums into fp32 registers every few k-blocks: no "fast accumulation"). a_scale
// is per row (dynamic per-token activations) or one value (static per-tensor, a stride-0
// broadcast); bias may be absent (a null pointer broadcasts +0, so -0.0 may come out as +0.0).
// int8 with static asymmetric activations first corrects the int32 sums, acc - zp * w_sum[n],
// zp read on the device (no host sync).
//
// Why: on the H200 cuBLAS int8 (torch._int_mm) was no faster than fp16 (BENCHMARKS.md,
// 2026-12-04), the Triton int8 GEMM reached 0.5-0.8x of fp16 and the Triton fp8 GEMM 0.5-0.6x of
// torch._scaled_mm; wgmma int8/fp8 has twice the fp16 peak. What is not covered here (group-wise
// or int4 weights, fp32 output, K or N not multiples of 16 / 8) runs on Triton;
// the Python side (diffaccel.ops.gemm) decides.
// CuTe's device-side assert() is a call to __assertfail: a call inside the wgmma pipeline makes
// ptxas serialize every wgmma (warning C7510). torch extensions build without NDEBUG.
#pragma once
#ifndef NDEBUG
#define NDEBUG
#endif
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <torch/types.h>

#include "common.h"
#include "gemm_sm90.h"

#ifdef DIFFACCEL_WITH_CUTLASS
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#endif

namespace diffaccel {

#ifdef DIFFACCEL_WITH_CUTLASS
namespace sm90 {

using namespace cute;

// Compute capability and SM count, asked of the driver once per device: the persistent tile
// scheduler sizes its grid by the SM count (left at 0, CUTLASS would ask on every call). ATen's
// cached device properties need cusparse.h, which a bare toolkit lacks.
struct DeviceInfo {
  int cc = 0;  // major * 10 + minor
  int sm_count = 0;
};

inline DeviceInfo device_info(int device) {
  TORCH_CHECK(device >= 0 && device < 64, "scaled_gemm_sm90: device index ", device, " out of range");
  static std::atomic<int> cached_cc[64] = {}, cached_sm_count[64] = {};  // 0: not asked yet
  DeviceInfo info{cached_cc[device].load(std::memory_order_relaxed),
                  cached_sm_count[device].load(std::memory_order_relaxed)};
  if (info.cc == 0 || info.sm_count == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
    info.cc = major * 10 + minor;
    cached_cc[device].store(info.cc, std::memory_order_relaxed);
    cached_sm_count[device].store(info.sm_count, std::memory_order_relaxed);
  }
  return info;
}

DA_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DA_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Epilogue compute functors (Sm90Compute applies them to fragments, element by element): plain
// multiplies/plus would let nvcc fuse the last product and the bias into one FMA, rounding once
// instead of twice.
template <class Op, class T>
struct Elementwise {
  template <class... Ts>
  CUTLASS_HOST_DEVICE T operator()(Ts const&... xs) const { return Op{}(xs...); }
};
template <class Op, int N>
struct Elementwise<Op, cutlass::Array<float, N>> {
  template <class... Ts>
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(Ts const&... xs) const {
    cutlass::Array<float, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = Op{}(xs[i]...);
    return r;
  }
};

struct MulOp {
  DA_HD float operator()(float a, float b) const { return mul_rn(a, b); }
};
struct AddOp {
  DA_HD float operator()(float a, float b) const { return add_rn(a, b); }
};
template <class T>
using MulRn = Elementwise<MulOp, T>;
template <class T>
using AddRn = Elementwise<AddOp, T>;

// GELU, tanh form, as y * sigmoid(2u) with u = sqrt(2/pi) (y + 0.044715 y^3) and the sigmoid from
// t = exp(-|2u|) <= 1 (kernels/_common.py mul_sigmoid): nothing overflows, no cancellation.
DA_HD float gelu_tanh(float y) {
  const float u = mul_rn(0.7978845608028654f, add_rn(y, mul_rn(mul_rn(mul_rn(0.044715f, y), y), y)));
  const float z = mul_rn(2.f, u);
  const float t = expf(-fabsf(z));
#ifdef __CUDA_ARCH__
  return __fdiv_rn(mul_rn(y, z >= 0.f ? 1.f : t), add_rn(1.f, t));
#else
  return mul_rn(y, z >= 0.f ? 1.f : t) / add_rn(1.f, t);
#endif
}

enum Activation : int { kNoActivation = 0, kGeluTanh = 2 };  // diffaccel.kernels.gemm.ACTIVATIONS' codes

struct GeluTanhOp {
  DA_HD float operator()(float y) const { return gelu_tanh(y); }
};
template <class T>
using GeluTanh = Elementwise<GeluTanhOp, T>;

// A GEMM's tensors, checked by scaled_gemm_sm90. zero_point / w_sum: int8 only (static asymmetric
// activations), or undefined.
struct Sm90Operands {
  at::Tensor a, w, a_scale, w_scale, bias, zero_point, w_sum, out;
};

template <class T>
T const* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T const*>(t.data_ptr()) : nullptr;
}

// One GEMM configuration: operand and out element types, epilogue activation, CTA tile, cluster
// and kernel schedule.
template <class ElementAB, class ElementOut, int kAct, class TileShape, class ClusterShape, class KernelSchedule,
          class EpilogueSchedule>
struct ScaledGemmSm90 {
  static constexpr bool kInt8 = cute::is_same_v<ElementAB, int8_t>;
  using ElementAcc = cute::conditional_t<kInt8, int32_t, float>;
  static constexpr int kAlignAB = 16;                            // 1-byte elements per 16-byte TMA row unit
  static constexpr int kAlignOut = 16 / sizeof(ElementOut);

  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  // a_scale: per row, or one value when its dynamic M stride is 0 (static activations)
  using AScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<bool, _0, int64_t>>;
  using WScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using Mul = cutlass::epilogue::fusion::Sm90Compute<MulRn, float, float, RN>;
  using AddCast = cutlass::epilogue::fusion::Sm90Compute<AddRn, ElementOut, float, RN>;
  // int8: acc - zp * w_sum[n] in int32 first (static asymmetric activations; a null zero point
  // broadcasts 0, which leaves acc as it is)
  using Zp = cutlass::epilogue::fusion::Sm90ScalarBroadcast<int32_t>;
  using WSum = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, int32_t, int32_t, Stride<_0, _1, int64_t>>;
  using IMul = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, int32_t, int32_t, RN>;
  using ISub = cutlass::epilogue::fusion::Sm90Compute<cutlass::minus, int32_t, int32_t, RN>;
  using CorrectedAcc = cutlass::epilogue::fusion::Sm90EVT<ISub, Acc, cutlass::epilogue::fusion::Sm90EVT<IMul, Zp, WSum>>;
  using AccIn = cute::conditional_t<kInt8, CorrectedAcc, Acc>;
  using ScaledA = cutlass::epilogue::fusion::Sm90EVT<Mul, AccIn, AScale>;
  using ScaledAW = cutlass::epilogue::fusion::Sm90EVT<Mul, ScaledA, WScale>;
  // with an activation: the biased value stays fp32, the activation casts
  using AddF = cutlass::epilogue::fusion::Sm90Compute<AddRn, float, float, RN>;
  using ActCast = cutlass::epilogue::fusion::Sm90Compute<GeluTanh, ElementOut, float, RN>;
  using Activated = cutlass::epilogue::fusion::Sm90EVT<ActCast, cutlass::epilogue::fusion::Sm90EVT<AddF, ScaledAW, Bias>>;
  using Epilogue = cute::conditional_t<kAct == kNoActivation, cutlass::epilogue::fusion::Sm90EVT<AddCast, ScaledAW, Bias>,
                                       Activated>;
  static_assert(kAct == kNoActivation || kAct == kGeluTanh, "activations: none, GELU (tanh)");

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
      void, cutlass::layout::RowMajor, kAlignOut,          // no C operand
      ElementOut, cutlass::layout::RowMajor, kAlignOut, EpilogueSchedule, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementAB, cutlass::layout::RowMajor, kAlignAB,       // A [M, K], K contiguous
      ElementAB, cutlass::layout::ColumnMajor, kAlignAB,    // W [N, K] row-major is B [K, N] column-major
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const Sm90Operands& op) {
    const at::Tensor &a = op.a, &w = op.w, &out = op.out;
    const int M = a.size(0), K = a.size(1), N = w.size(0);
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1));
    StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
    StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));

    typename AccIn::Arguments acc_in{};
    if constexpr (kInt8) {
      acc_in = {{},                                                  // Acc
                {{{0}, {ptr_or_null<int32_t>(op.zero_point)}, {}},   // Zp (read on the device)
                 {ptr_or_null<int32_t>(op.w_sum), 0, {}},            // WSum
                 {}},                                                // IMul
                {}};                                                 // ISub
    }
    const bool per_row = op.a_scale.numel() > 1;
    const typename ScaledAW::Arguments scaled{
        {                                                            // ScaledA
            acc_in,
            {ptr_or_null<float>(op.a_scale), 0.f, {per_row, _0{}, int64_t(0)}},
            {}},                                                     // Mul
        {ptr_or_null<float>(op.w_scale), 0.f, {}},
        {}};                                                         // Mul
    const typename Bias::Arguments bias{ptr_or_null<float>(op.bias), 0.f, {}};
    typename Epilogue::Arguments epi{};
    if constexpr (kAct == kNoActivation)
      epi = {scaled, bias, {}};                                      // AddCast
    else
      epi = {{scaled, bias, {}}, {}};                                // AddF, then ActCast

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {reinterpret_cast<ElementAB const*>(a.data_ptr()), stride_a,
         reinterpret_cast<ElementAB const*>(w.data_ptr()), stride_b},
        {epi, nullptr, stride_d, reinterpret_cast<ElementOut*>(out.data_ptr()), stride_d},
        {}};
    args.hw_info.device_id = a.get_device();
    args.hw_info.sm_count = device_info(a.get_device()).sm_count;

    Gemm gemm;
    const auto status = gemm.can_implement(args);
    TORCH_CHECK(status == cutlass::Status::kSuccess, "scaled_gemm_sm90: CUTLASS cannot run M=", M, " N=", N, " K=", K,
                ": ", cutlassGetStatusString(status));
    const size_t workspace_bytes = Gemm::get_workspace_size(args);
    at::Tensor workspace;
    if (workspace_bytes)
      workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, a.options().dtype(at::kByte));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
    const auto run_status = gemm.run(args, workspace_bytes ? workspace.data_ptr() : nullptr, stream);
    TORCH_CHECK(run_status == cutlass::Status::kSuccess, "scaled_gemm_sm90: launch failed: ",
                cutlassGetStatusString(run_status));
  }
};

// Two tiles per operand type: 64 x 128 (ping-pong: two consumer warp groups alternate, one in its
// epilogue while the other computes) for M up to kSm90SmallM, and 128 x 128 (cooperative, a 2 x 1
// cluster sharing W tiles by multicast) above. K tiles are 128-256 bytes per row: whole TMA boxes.
// The fp8 schedules are the precise ones (partial sums promoted to fp32), not *FP8FastAccum.
template <class ElementAB, class ElementOut, int kAct>
using SmallM = ScaledGemmSm90<ElementAB, ElementOut, kAct,
                              Shape<_64, _128, cute::conditional_t<cute::is_same_v<ElementAB, int8_t>, _256, _128>>,
                              Shape<_1, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                              cutlass::epilogue::TmaWarpSpecialized>;
template <class ElementAB, class ElementOut, int kAct>
using LargeM = ScaledGemmSm90<ElementAB, ElementOut, kAct, Shape<_128, _128, _128>, Shape<_2, _1, _1>,
                              cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                              cutlass::epilogue::TmaWarpSpecializedCooperative>;

template <class ElementAB, class ElementOut, int kAct>
void dispatch_tile(const Sm90Operands& op) {
  if (op.a.size(0) <= kSm90SmallM)
    SmallM<ElementAB, ElementOut, kAct>::run(op);
  else
    LargeM<ElementAB, ElementOut, kAct>::run(op);
}

template <class ElementAB, int kAct>
void dispatch_out(const Sm90Operands& op) {
  if (op.out.scalar_type() == at::kHalf)
    dispatch_tile<ElementAB, cutlass::half_t, kAct>(op);
  else
    dispatch_tile<ElementAB, cutlass::bfloat16_t, kAct>(op);
}

template <class ElementAB>
void dispatch(const Sm90Operands& op, int64_t activation) {
  if (activation == kGeluTanh)
    dispatch_out<ElementAB, kGeluTanh>(op);
  else
    dispatch_out<ElementAB, kNoActivation>(op);
}

}  // namespace sm90
#endif  // DIFFACCEL_WITH_CUTLASS

// The checks both GEMMs share; ``ab`` is the operand dtype (int8 or float8_e4m3fn), ``run`` the
// dispatch of that operand type (sm90::dispatch<int8_t or float_e4m3_t>, a null pointer when built
// without CUTLASS). Everything a wrong argument could break is checked here, naming the argument,
// before anything launches.
template <class Dispatch>
at::Tensor scaled_gemm_sm90(const at::Tensor& a, const at::Tensor& w, const at::Tensor& a_scale,
                            const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                            at::ScalarType out_dtype, at::ScalarType ab, int64_t activation, Dispatch run,
                            const c10::optional<at::Tensor>& zero_point = c10::nullopt,
                            const c10::optional<at::Tensor>& w_sum = c10::nullopt) {
#ifndef DIFFACCEL_WITH_CUTLASS
  TORCH_CHECK(false, "diffaccel was built without CUTLASS, so without its sm_90a GEMMs "
              "(pip install --no-deps nvidia-cutlass, then rebuild)");
#else
  DA_CHECK_ARG(a.is_cuda() && a.scalar_type() == ab && a.dim() == 2 && a.is_contiguous(), "a",
               "expected a contiguous ", ab, " CUDA tensor [M, K], got ", a.scalar_type(), " ", a.sizes());
  DA_CHECK_ARG(w.scalar_type() == ab && w.dim() == 2 && w.is_contiguous() && w.size(1) == a.size(1), "w",
               "expected a contiguous ", ab, " tensor [N, K] with K=", a.size(1), ", got ", w.scalar_type(), " ",
               w.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  DA_CHECK_ARG(K % 16 == 0 && K > 0, "a", "K must be a positive multiple of 16 (16-byte TMA rows), got K=", K);
  DA_CHECK_ARG(N % 8 == 0 && N > 0, "w", "N must be a positive multiple of 8 (16-byte output rows), got N=", N);
  DA_CHECK_ARG(a_scale.scalar_type() == at::kFloat && a_scale.is_contiguous() &&
                   (a_scale.numel() == 1 || a_scale.numel() == M),
               "a_scale", "expected float32 with 1 or M=", M, " values, got ", a_scale.numel());
  DA_CHECK_ARG(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == N, "w_scale",
               "expected float32 with N=", N, " values (per output channel)");
  if (bias.has_value())
    DA_CHECK_ARG(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias",
                 "expected float32 with N=", N, " values");
  DA_CHECK_ARG(zero_point.has_value() == w_sum.has_value(), "zero_point", "zero_point and w_sum come together");
  if (zero_point.has_value()) {
    DA_CHECK_ARG(zero_point->scalar_type() == at::kInt && zero_point->numel() == 1, "zero_point",
                 "expected one int32 value");
    DA_CHECK_ARG(w_sum->scalar_type() == at::kInt && w_sum->is_contiguous() && w_sum->numel() == N, "w_sum",
                 "expected int32 row sums of w, N=", N, " values");
  }
  DA_CHECK_ARG(out_dtype == at::kHalf || out_dtype == at::kBFloat16, "out_dtype",
               "expected float16 or bfloat16, got ", out_dtype);
  DA_CHECK_ARG(activation == sm90::kNoActivation || activation == sm90::kGeluTanh, "activation",
               "expected 0 (none) or 2 (GELU, tanh form), got ", activation);
  sm90::Sm90Operands op{a, w, a_scale, w_scale, bias.value_or(at::Tensor()), zero_point.value_or(at::Tensor()),
                  w_sum.value_or(at::Tensor()), at::Tensor()};
  const std::pair<const at::Tensor*, const char*> named[] = {
      {&op.w, "w"}, {&op.a_scale, "a_scale"}, {&op.w_scale, "w_scale"}, {&op.bias, "bias"},
      {&op.zero_point, "zero_point"}, {&op.w_sum, "w_sum"}};
  for (const auto& [t, name] : named)
    if (t->defined()) check_same_device(*t, a, name);
  // TMA needs 16-byte aligned bases; w_scale, bias and w_sum are held to 16 bytes too (CUTLASS 4.2 reads
  // them element by element, a vectorised row broadcast would not)
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  DA_CHECK_ARG(aligned(a), "a", "expected a 16-byte aligned data pointer");
  for (const auto& [t, name] : named)
    if (t->defined() && t != &op.a_scale && t != &op.zero_point)
      DA_CHECK_ARG(aligned(*t), name, "expected a 16-byte aligned data pointer");
  const c10::cuda::OptionalCUDAGuard guard(a.device());
  const int cc = sm90::device_info(a.get_device()).cc;
  TORCH_CHECK(cc == 90, "scaled_gemm_sm90: needs an sm_90 GPU, this one is sm_", cc);
  op.out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0) return op.out;
  run(op, activation);
  return op.out;
#endif
}

}  // namespace diffaccel
