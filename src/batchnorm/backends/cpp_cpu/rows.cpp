// Batch norm of float32 and bfloat16 CPU inputs whose channels are the innermost dimension
// ((N, C) and channels_last tensors: M rows of C contiguous values), with the fused
// epilogue y = act(BN(x) + residual), as one C++ autograd node: no Python between the
// forward and the backward, no shift, no temporary tensor. The math is
// batchnorm.reference's (the tests hold the two together). Inputs of kParallelValues values
// or more run on torch's intra-op threads (at::parallel_for), with sums that do not depend
// on the thread count. NCHW inputs: in eval when no graph is recorded (inference), a plane
// at a time (eval_planes), and small ones (or large float32 ones whose output streams) in
// training or with a graph in the same node, a channel at a time (forward_planes). On CPUs
// with AVX-512, float16 and bfloat16 inputs of either layout in inference run eval_halves
// instead, and float16 rows run in training too.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The activations, by the codes of __init__.py's ACTIVATION_CODES. Not ELU: its exp(x) - 1
// needs expm1's accuracy near 0; the Python side applies torch's ELU after the node.
enum Activation : int64_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kSilu = 3 };

// Whether the loops of half-precision values written in AVX-512's instructions (F, BW, VL)
// are built (eval_halves, normalize_units, dx_halves, ChannelBuffers' conversions): without
// them float16 runs elsewhere.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define BATCHNORM_HALF_LOOPS 1
#else
#define BATCHNORM_HALF_LOOPS 0
#endif
constexpr bool kHalfLoops = BATCHNORM_HALF_LOOPS;
// 16 lanes of float32: the values of the loops written in AVX-512's instructions.
constexpr int64_t kLanes = 16;
#if BATCHNORM_HALF_LOOPS
using Lanes = __m512;
#endif

// 1 + exp(x) in float32 in operations that vectorize (std::exp does not, without
// -ffast-math, which would drop NaN and Inf; a scalar exp a value made the SiLU loops 3x
// slower than torch.nn's BN followed by F.silu), for SiLU and its derivative: x = n ln2 + r
// with |r| <= ln2 / 2 (ln2 in two parts), n rounded to nearest by adding 1.5 * 2^23 (the
// sum's low bits then hold n, without a rounding or a conversion instruction), exp(r) by a
// polynomial of degree 6 fitted to it on [-ln2 / 2, ln2 / 2] (relative error 2e-9 in exact
// arithmetic), 2^n as a float's exponent, the 1 added by the last multiply-add. x is clamped
// to [kLow, kHigh]: from kLow 2^n is normal; at kHigh n is 128, whose exponent's bits are
// infinity's, so that from kHigh on (88.38, where exp is 2.4e38) the result is inf (1 /
// (1 + exp) is below 5e-39 either way) without a test of x. Within 8.1e-8 of 1 + exp in
// relative terms (a sweep of 1.8 million points; the Taylor polynomial to r^7 after a
// rounding instruction, before 2026-12-05 evening, was as close and made a fused SiLU's
// forward + backward take 11-17 % longer); below kLow 1 + 1.2e-38; NaN for NaN (the clamps
// keep it). V: float, in the loops GCC vectorizes (NCHW planes; everywhere on CPUs without
// AVX-512), or Lanes (16 float32 values, AVX-512), in those written in its instructions
// (rows: normalize_halves, pre_gradient_lanes): the same operations, so the same bits.
// (Until 2026-12-07 afternoon kHigh was 88 and a test of x gave inf above it: GCC
// vectorized the clamps and the test into compares, blends and mask operations, ~30
// instructions for 16 values where these are ~20.)
struct ExpConstants {
  static constexpr float kLow = -87.33654f, kHigh = 88.3763f, kRound = 12582912.0f;
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2High = -0.693145751953125f, kLn2Low = -1.428606765330187045e-06f;
  // exp(r)'s polynomial, its highest power's coefficient first
  static constexpr float kPoly[7] = {0.0013846145f, 0.0083741201f, 0.041667961f, 0.16666432f,
                                     0.49999994f,   1.0f,          1.0f};
};

inline float clamp_exp(float x) {  // x < kLow: kLow; x > kHigh: kHigh; else (NaN too) x
  const float low = x < ExpConstants::kLow ? ExpConstants::kLow : x;
  return low > ExpConstants::kHigh ? ExpConstants::kHigh : low;
}
inline float fma_of(float a, float b, float c) { return std::fma(a, b, c); }
inline float power_of_two(float shifted) {  // 2^n, from shifted's bits (0x4B400000 + n)
  // n + 127 in the exponent's bits (what lies above the exponent's 8 bits shifts out)
  return __builtin_bit_cast(float, (__builtin_bit_cast(uint32_t, shifted) + 127u) << 23);
}

#if BATCHNORM_HALF_LOOPS
inline Lanes clamp_exp(Lanes x) {  // the same: max and min return x where it is NaN
  return _mm512_min_ps(_mm512_set1_ps(ExpConstants::kHigh),
                       _mm512_max_ps(_mm512_set1_ps(ExpConstants::kLow), x));
}
inline Lanes fma_of(Lanes a, Lanes b, Lanes c) { return _mm512_fmadd_ps(a, b, c); }
inline Lanes power_of_two(Lanes shifted) {
  const __m512i biased = _mm512_add_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
}
#endif

template <typename V>
inline V one_plus_exp(V x) {
  using E = ExpConstants;
  const V clamped = clamp_exp(x), round = V{} + E::kRound;
  const V shifted = fma_of(clamped, V{} + E::kLog2e, round);
  const V n = shifted - round;
  V r = fma_of(n, V{} + E::kLn2High, clamped);
  r = fma_of(n, V{} + E::kLn2Low, r);
  V poly = V{} + E::kPoly[0];  // (a loop over the powers kept GCC's loops scalar)
  poly = fma_of(poly, r, V{} + E::kPoly[1]);
  poly = fma_of(poly, r, V{} + E::kPoly[2]);
  poly = fma_of(poly, r, V{} + E::kPoly[3]);
  poly = fma_of(poly, r, V{} + E::kPoly[4]);
  poly = fma_of(poly, r, V{} + E::kPoly[5]);
  poly = fma_of(poly, r, V{} + E::kPoly[6]);
  return fma_of(poly, power_of_two(shifted), V{} + 1.0f);
}

// SiLU, p sigmoid(p), computed as torch does it, p / (1 + exp(-p)); sigmoid(p) = 1 / (1 +
// exp(-p)); SiLU's derivative, dL/dp from dL/dy = g: g sigmoid(p) (1 + p (1 - sigmoid(p))).
template <typename V>
inline V silu_of(V p) { return p / one_plus_exp<V>(-p); }
template <typename V>
inline V silu_gradient(V g, V p) {
  const V s = (V{} + 1.0f) / one_plus_exp<V>(-p);
  return g * s * fma_of(p, (V{} + 1.0f) - s, V{} + 1.0f);
}

// ReLU's and leaky ReLU's derivatives (see with_activation), on a value and on lanes (the
// backward of half-precision rows: gradient_lanes), the same bits: ReLU +0 where
// p <= 0, else g (g's bits under a mask: no branch on g); leaky ReLU g (p > 0 ? 1 : slope).
inline float relu_gradient(float g, float p) {
  const uint32_t keep = p <= 0.0f ? 0u : ~0u;
  return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, g) & keep);
}
inline float leaky_relu_gradient(float g, float p, float slope) {
  return g * (p > 0.0f ? 1.0f : slope);
}
#if BATCHNORM_HALF_LOOPS
inline Lanes relu_gradient(Lanes g, Lanes p) {  // not (p <= 0): NaN keeps g
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_NLE_UQ), g);
}
inline Lanes leaky_relu_gradient(Lanes g, Lanes p, float slope) {
  const __mmask16 above = _mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_mul_ps(g, _mm512_mask_blend_ps(above, _mm512_set1_ps(slope),
                                               _mm512_set1_ps(1.0f)));
}
#endif

// Calls f(act, derivative, memory_bound) with the activation's function of the
// pre-activation p and its chain rule, dL/dp from dL/dy = g: torch's conventions (relu
// passes the gradient unless p <= 0, so at NaN too; leaky_relu where p > 0, else times its
// slope, so at NaN times the slope; NaN stays NaN in the forward; SiLU's derivative
// is torch's sigmoid (1 + p (1 - sigmoid))). memory_bound (a std::bool_constant): whether
// the activation's loops are bound by memory rather than by arithmetic (SiLU's exp), which
// sets their vector width (for_channels) and whether backward computes dL/dp again in each
// of its passes (RowsBatchNorm::backward). The derivatives select without a branch on g
// (or on the slope): with one, GCC loads g only where p > 0, a load the vectorizer cannot
// make unconditional, and the backward's sums ran scalar (6x slower).
template <typename F>
void with_activation(int64_t code, float slope, F&& f) {
  switch (code) {
    case kRelu:
      return f([](float p) { return p < 0.0f ? 0.0f : p; },
               [](auto g, auto p) { return relu_gradient(g, p); }, std::true_type{});
    case kLeakyRelu:
      return f([slope](float p) { return p < 0.0f ? p * slope : p; },
               [slope](auto g, auto p) { return leaky_relu_gradient(g, p, slope); },
               std::true_type{});
    case kSilu:
      return f([](auto p) { return silu_of(p); },  // (float, or Lanes: pre_gradient_lanes)
               [](auto g, auto p) { return silu_gradient(g, p); }, std::false_type{});
    default:
      return f([](float p) { return p; }, [](auto g, auto) { return g; }, std::true_type{});
  }
}

// The element types the loops read and write: float, and bfloat16 as its bits (BF16; the
// upper half of a float32), whose loops load it to float32, compute in float32 (float64
// sums of float32 partial sums) and round the results to bfloat16, as torch's
// half-precision kernels do with float32 parameters and statistics (torch.autocast's
// convention). (GCC 12 has no bfloat16 arithmetic type; these integer conversions
// vectorize.) float16 (F16, below) only on small rows and short NCHW planes in training:
// GCC 12 converts _Float16 one value at a time, and exact integer conversions (about 8
// vector instructions per 16 values to float32, 16 back) made these loops 2-3x slower than
// in bfloat16 and slower than ATen's float16 loops, which convert with F16C, where every
// pass converted so (NCHW planes now convert a channel at a time with F16C: ChannelBuffers);
// ATen and the Numba kernels (LLVM: F16C in vectors) compute the larger ones.
using BF16 = uint16_t;

inline float load(float v) { return v; }
inline float load(BF16 v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// v rounded to T: for bfloat16 to nearest, ties to even, as torch's .to(torch.bfloat16)
// (add just under half an ulp plus the kept lowest bit, keep the upper half; overflow
// gives inf), a NaN kept a quiet NaN.
template <typename T>
T store(float v);
template <>
inline float store<float>(float v) { return v; }
template <>
inline BF16 store<BF16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet = (bits >> 16) | 0x40u;
  return static_cast<BF16>(v != v ? quiet : rounded);
}

// float16 as its bits (F16), converted in integer and float32 operations that vectorize
// (GCC 12 converts _Float16 one value at a time: see above), exactly, as F16C's
// conversions and torch's .to() convert: x 2^112 moves the exponent from float16's bias to
// float32's (subnormals included); the way back rounds to nearest, ties to even (half an
// ulp minus one plus the kept lowest bit, the exponent moved back; under 2^-14 a sum with
// 0.5, whose ulp is float16's smallest subnormal, rounds), past 65504 to inf, NaN to
// torch's quiet NaN (0x7E00) of its sign. The loops written in AVX-512's instructions
// convert with F16C instead (see eval_halves).
enum class F16 : uint16_t {};
inline float load(F16 v) {
  const uint32_t bits = static_cast<uint32_t>(v);
  const float scaled = __builtin_bit_cast(float, (bits & 0x7FFFu) << 13) * 0x1p112f;
  const uint32_t special = (bits & 0x7C00u) == 0x7C00u ? 0x7F800000u : 0u;  // inf, NaN
  return __builtin_bit_cast(
      float, __builtin_bit_cast(uint32_t, scaled) | special | ((bits & 0x8000u) << 16));
}
template <>
inline F16 store<F16>(float v) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, v), magnitude = bits & 0x7FFFFFFFu;
  const uint32_t normal = std::min<uint32_t>(
      (magnitude - (112u << 23) + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13, 0x7C00u);
  const uint32_t subnormal =
      __builtin_bit_cast(uint32_t, __builtin_bit_cast(float, magnitude) + 0.5f) - 0x3F000000u;
  const uint32_t kept = magnitude > 0x7F800000u    ? 0x7E00u
                        : magnitude < 0x38800000u ? subnormal
                                                  : normal;
  return static_cast<F16>(((bits >> 16) & 0x8000u) | kept);
}

// Calls f(T{}) with T the element type of x: BF16 for bfloat16, F16 for float16, else float.
template <typename F>
decltype(auto) with_storage(const Tensor& x, F&& f) {
  if (x.scalar_type() == at::kBFloat16) return f(BF16{});
  if (x.scalar_type() == at::kHalf) return f(F16{});
  return f(float{});
}

// A tensor's values as T (null for an undefined tensor: an argument not given).
template <typename T = float>
const T* values_or_null(const Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <typename T>
T* mutable_values(Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// x - mean is computed as (x - origin) - offset, per channel. In training the origin is
// the channel's value in the first row and the offset the mean's part beyond it: x - origin
// is exact where x is near it and the offset is small, so that a spread small against the
// mean (two samples a channel, say) keeps the digits that x - mean, with the mean rounded to
// float, would lose. In eval the origin is the running mean and the offset 0. The offset,
// small against the spread, also folds into the constants of the loops value by value (see
// Affine, input_gradients), which then subtract the origin alone.
// (An infinite or NaN first value gives origin 0: an origin of inf would make the mean
// inf - inf = NaN where torch's is inf.)
struct Centre {
  std::vector<float> origin, offset;
};

// The centre of an input x whose channel c has its first value at x[c * stride] (1 for
// rows; the plane's size for NCHW), from `saved` (what the forward saves for backward): in
// training the offset (null: 0, until the statistics give it), in eval the running mean as
// the forward read it.
template <typename T>
Centre centre_of(const T* x, int64_t stride, const float* saved, int64_t channels,
                 bool training) {
  Centre centre{std::vector<float>(channels, 0.0f), std::vector<float>(channels, 0.0f)};
  for (int64_t c = 0; c < channels; ++c) {
    if (!training) {
      centre.origin[c] = saved[c];
      continue;
    }
    const float first = load(x[c * stride]);
    if (std::isfinite(first)) centre.origin[c] = first;
    if (saved) centre.offset[c] = saved[c];
  }
  return centre;
}

// Software prefetches ahead of the sums (column_sums), for inputs whose data do not stay in
// the caches: the sums read 8 rows a column at a time, which the hardware prefetcher does
// not follow as a stream, and without them a sum on one thread read memory well below its
// bandwidth. Below the thresholds they are instructions spent on data in cache: a forward's
// input, which the layer before has just written, of 8 MiB stays in the 32 MiB L3 of our
// machines (its loops were 10-25 % slower with prefetches). A backward reads the x that
// its forward saved, which in a model the layers in between have evicted (prefetches from
// any size on measured as from 1 MiB on). Measured, raw forward + backward, ms, without ->
// with (ATen's): channels_last (32, 128, 32, 32) 4.10 -> 3.54 (4.15) on 1 thread, 3.11 ->
// 2.68 (3.18) on 2. The BN layers alone of resnet18, mobilenet_v2 and efficientnet_b0
// (channels_last, one thread, forward + backward, benchmarks/models.py), torch.nn's time /
// ours, the backward's prefetches from 8 -> from 1 MiB: 0.98 -> 1.02, 0.97 -> 1.01, 0.98 ->
// 1.02; fused layers 1.12 -> 1.16, 1.08 -> 1.14, 1.19 -> 1.19 (two threads: level). A
// backward of a 2.4 MiB input right after its forward, its data still in L3, lost 10 %.
// (The loops row by row read each array in order, which the hardware prefetcher follows:
// prefetches there, which they had until 2026-12-05 evening, were instructions spent on
// lines already asked for. Raw forward + backward, ms, with -> without them, one thread
// (two): channels_last (8, 96, 48, 48) 2.72 -> 2.59 (1.21 -> 1.12), (32, 128, 32, 32)
// 7.41 -> 7.22 (3.47 -> 3.34), (64, 256, 28, 28) 26.3 -> 23.3 (13.4 -> 12.8), (32768, 128)
// 6.33 -> 6.10 (3.59 -> 3.37); the BN layers alone above, our time / torch.nn's, training
// 1.08 -> 1.05, 1.14 -> 1.09, 1.07 -> 1.04.)
enum Pass { kForward = 0, kBackward = 1 };
constexpr int64_t kPrefetchFrom[2] = {16 << 20, 1 << 20};  // bytes of the input, by Pass

// Whether the sums of `pass` over an input of element type T prefetch: not below the pass's
// threshold, nor on rows of 4 KiB or more, which the hardware prefetcher follows (each a
// page read in order): (4096, 1024) float32 was 1.02-1.19x faster with them on one thread,
// 0.86-0.97x on two.
template <typename T>
bool sums_prefetch(int64_t rows, int64_t channels, Pass pass) {
  const int64_t row_bytes = channels * static_cast<int64_t>(sizeof(T));
  return rows * row_bytes >= kPrefetchFrom[pass] && row_bytes < 4096;
}

// An array of rows that a loop reads: its address (null: none) and element size.
struct Stream {
  const char* start;
  int64_t element_size;

  template <typename E>
  Stream(const E* p) : start(reinterpret_cast<const char*>(p)), element_size(sizeof(E)) {}
  Stream(std::nullptr_t) : start(nullptr), element_size(0) {}
};

// Asks for the cache lines of `count` rows of `channels` values from row r on of each
// stream (64 bytes a line), into L2 (locality hint 1), not L1: the sums ask for the group of
// 8 rows two groups on, and with the groups they have asked for and read, on rows of 1 KiB
// (256 float32 channels) that is 48 KiB of two streams against L1's 32 KiB, each new line
// evicting one still to be read. Raw forward + backward, ms, L1 -> L2, one thread (two), on
// a host where the L1 prefetches lost to none at all (2026-12-05, 21:40; with prefetches in
// the loops row by row too, then): channels_last (64, 256, 28, 28) 31.0 -> 25.4 (16.3 ->
// 14.7), (32, 128, 32, 32) 9.8 -> 7.1 (4.4 -> 3.8), (32768, 128) 8.4 -> 7.6 (4.3 -> 3.8),
// (4096, 1024) level (no prefetches); the BN layers alone of benchmarks/models.py's
// channels_last models, our time / torch.nn's, training 1.10 -> 1.08, 1.15 -> 1.14, 1.11 ->
// 1.07 (1.07, 1.09, 1.06 without prefetches there).
inline void prefetch_rows(std::initializer_list<Stream> streams, int64_t r, int64_t count,
                          int64_t channels) {
  for (const Stream& stream : streams) {
    if (!stream.start) continue;
    const int64_t row_bytes = channels * stream.element_size;
    for (int64_t i = 0; i < count * row_bytes; i += 64)
      __builtin_prefetch(stream.start + r * row_bytes + i, 0, 1);
  }
}

// Calls f(c) for c in [0, n), a loop over a row's channels of element type T that
// vectorizes. A float32 loop bound by memory (kMemoryBound: it streams values from memory
// to memory, as normalize and dL/d(pre-activation) with a cheap activation and the input
// gradient do) runs at 8 lanes (256-bit vectors) instead of -march=native's widest (512-bit
// where the CPU has AVX-512). On our machines (AMD EPYC) 512-bit stores to memory that is
// not in the caches are slow, and in a model it is not: training keeps every layer's
// output, so each new one is written where the last step's were freed. SiLU's exp is bound
// by arithmetic and keeps the widest vectors, and so do the bfloat16 loops (their rounding
// at 8 lanes took 2.5-4x the time). Measured, one thread, 512 -> 256-bit: the channels_last
// BN layers alone of resnet18, mobilenet_v2 and efficientnet_b0 (benchmarks/models.py), our
// time / torch.nn's, training 1.00 -> 0.97, 1.04 -> 0.98, 1.00 -> 0.98 (fused 0.86 -> 0.82,
// 0.90 -> 0.84, 0.84 -> 0.84), eval 0.87 -> 0.84, 0.99 -> 0.91, 0.97 -> 0.91; a raw (8, 96,
// 48, 48) channels_last call whose outputs stay alive, µs, eval 406 -> 307 and training
// forward 565 -> 458 (ATen's 338, 584). With the output's memory in cache, as make bench's
// loops reuse it: level (its large cases, taking turns call by call), 58 -> 65 µs at (8,
// 144, 24, 24) eval. (The pragma needs -fopenmp or -fopenmp-simd, cpp_cpu.FLAGS; a compiler
// without them ignores it.)
template <bool kMemoryBound, typename T, typename F>
[[gnu::always_inline]] inline void for_channels(int64_t n, F&& f) {
  if constexpr (kMemoryBound && std::is_same_v<T, float>) {
#pragma omp simd simdlen(8)
    for (int64_t c = 0; c < n; ++c) f(c);
  } else {
    for (int64_t c = 0; c < n; ++c) f(c);
  }
}

// 1 / sqrt(var + eps), in float64, rounded to float.
inline float invstd_of(double var, double eps) {
  return static_cast<float>(1.0 / std::sqrt(var + eps));
}

// Each channel's scale (invstd * weight) and shift of the pre-activation: (x - mean) *
// scale + bias, written (x - origin) * scale + shift with shift = bias - offset * scale
// (offset: Centre's, or null for none), rounded once from float64: a subtraction and an
// array read fewer a value, and as accurate, the offset being of the spread's size (the
// origin a value of the batch, or in eval the running mean itself), so offset * scale of the
// output's. input_gradients folds it into its dx loop's constant alike. Raw calls, ms, before
// -> after, one thread (two), the builds taking turns: eval (4096, 1024) 1.64 -> 1.56
// (0.53 -> 0.45), channels_last (32, 128, 32, 32) 1.73 -> 1.43 (0.73 -> 0.60); training
// forward 2.24 -> 1.89 (0.79 -> 0.77), 2.09 -> 1.79 (1.05 -> 0.89); forward + backward 6.40
// -> 5.41 (3.01 -> 2.65), 6.71 -> 6.36 (3.10 -> 3.00); bfloat16 2-12 % faster.
struct Affine {
  std::vector<float> scale, shift;

  Affine(int64_t channels, const float* invstd, const float* weight, const float* bias,
         const float* offset)
      : scale(channels), shift(channels) {
    for (int64_t c = 0; c < channels; ++c)
      std::tie(scale[c], shift[c]) = of(c, invstd[c], weight, bias, offset ? offset[c] : 0.0f);
  }

  // Channel c's scale and shift.
  static std::pair<float, float> of(int64_t c, float invstd, const float* weight,
                                    const float* bias, float offset) {
    const float scale = weight ? invstd * weight[c] : invstd;
    const double shift = (bias ? bias[c] : 0.0) - static_cast<double>(offset) * scale;
    return {scale, static_cast<float>(shift)};
  }
};

// What a pass over the rows reads: x, the residual z (or null), both of element type T,
// and each channel's centre and affine part of the pre-activation.
template <typename T>
struct Rows {
  const T* x;
  const T* z;
  int64_t rows, channels;
  Centre centre;
  Affine affine;

  Rows(const T* x, const T* z, int64_t rows, int64_t channels, Centre centre,
       const float* invstd, const float* weight, const float* bias)
      : x(x), z(z), rows(rows), channels(channels), centre(std::move(centre)),
        affine(channels, invstd, weight, bias, this->centre.offset.data()) {}

  // Calls f(index, pre-activation) for every value of rows [begin, end) (of channels [from,
  // to) only, where given), row by row. f should capture by value what its loop reads and
  // does not write (see `call`). (The inputs are read through restrict pointers: f's stores
  // then do not alias them, and the loop vectorizes without run-time checks of overlap.)
  // Flattened: every call in it is inlined, the activation's too, which GCC otherwise left
  // a call a value where the loop runs on torch's threads (in the function OpenMP outlines
  // for them): SiLU's loop did not vectorize, and a channels_last (32, 128, 32, 32) forward
  // with SiLU took 9.2 ms on 2 threads, 1.5 ms flattened (2.0 ms on 1 thread either way).
  template <bool kMemoryBound, bool kResidual, typename F>
  [[gnu::flatten]] void each_pre(int64_t begin, int64_t end, F&& f, int64_t from,
                                 int64_t to) const {
    const float* __restrict origin = centre.origin.data();
    const float *__restrict sc = affine.scale.data(), *__restrict sh = affine.shift.data();
    const T *__restrict in = x, *__restrict residual = z;
    // f's copy, a local whose address nothing else holds: f's stores then cannot change
    // what it captured by value (the activation's slope), which the loop reads in registers
    // (read through a reference, leaky ReLU's loops did not vectorize: 5x slower)
    std::decay_t<F> call(f);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * channels;
      const T* row = in + base;
      auto value = [&](int64_t c) {
        float pre = (load(row[c]) - origin[c]) * sc[c] + sh[c];
        if constexpr (kResidual) pre += load(residual[base + c]);
        call(base + c, pre);
      };
      for_channels<kMemoryBound, T>(to - from, [&](int64_t k) { value(from + k); });
    }
  }

  // kMemoryBound: f's activation's memory_bound (with_activation), which sets the loop's
  // vector width (for_channels).
  template <bool kMemoryBound, typename F>
  void each_pre(int64_t begin, int64_t end, F&& f, int64_t from = 0, int64_t to = -1) const {
    if (to < 0) to = channels;
    if (z)
      each_pre<kMemoryBound, true>(begin, end, f, from, to);
    else
      each_pre<kMemoryBound, false>(begin, end, f, from, to);
  }
};

// Inputs of at least this many values are cut into row blocks for torch's threads; smaller
// ones run serially (a parallel region costs more than their loops).
constexpr int64_t kParallelValues = 1 << 16;

// Calls f(begin, end) on ranges of rows that together cover [0, rows): in parallel for large
// inputs, at least kParallelValues / 2 values a range. (Rows of `channels` values; also any
// units of that many values, as eval_planes' planes and blocks of planes.)
template <typename F>
void for_rows(int64_t rows, int64_t channels, F&& f) {
  if (rows * channels < kParallelValues) return f(int64_t{0}, rows);
  const int64_t grain = std::max<int64_t>(1, kParallelValues / 2 / channels);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { f(begin, end); });
}

// Float32 outputs of at least this many bytes are written with non-temporal stores
// (stream_rows, through write_rows): from half our machines' L3 (32 MiB), where the output
// and an input as large no longer fit in it together, the output's lines leave the caches
// before a later read finds most of them, and a store to a line out of the caches first
// reads that line from memory (read for ownership), which a non-temporal store does not: a
// pass that reads x and writes y moves a third less. Raw calls with a 64 MiB copy between
// them, ms, one thread (two), plain stores -> non-temporal [ATen]: eval (64, 256, 28, 28)
// 4.23 -> 2.98 (2.99 -> 2.32) [3.93 (2.97)], (8, 64, 16, 56, 56) 8.49 -> 6.58 (5.87 ->
// 4.38) [7.93 (5.79)], (16384, 1024) 5.42 -> 4.81 (4.16 -> 3.14) [5.21 (4.26)]; (16384,
// 1024) training forward 10.6 -> 9.95 (6.84 -> 5.63) [10.8 (8.55)], forward + backward 24.7
// -> 24.2 (16.0 -> 14.4) [30.6 (19.2)]; channels_last (64, 256, 28, 28), rows of 256 values:
// training forward 8.6 -> 9.0 (4.4 -> 4.6), forward + backward 21.7 -> 21.0 (14.7 -> 13.4),
// eval 4.2 -> 4.5 (3.1 -> 2.6). From 16 MiB rather than 32 since 2026-12-07: eval calls
// taking turns with ATen's, ms, medians of three rounds, one thread (two), plain ->
// non-temporal, alone and with a ReLU after it (reading y): (4096, 1024) 1.66 -> 1.31 (0.77
// -> 0.75), with ReLU 2.67 -> 2.33 (1.58 -> 1.61); (6144, 1024) 2.39 -> 1.78 (1.33 ->
// 1.14), 4.35 -> 4.02 (2.48 -> 2.35); channels_last (32, 128, 32, 32) 1.58 -> 1.16 (0.87 ->
// 0.75), 2.57 -> 2.21 (1.98 -> 1.86). At 8 MiB plain stores stay: (2048, 1024) with its
// ReLU 1.07 -> 1.14 (0.31 -> 0.45), the output still in L3 for the ReLU. float16 and
// bfloat16 outputs of as many bytes too since 2026-12-07 night, of rows or planes of whole
// lanes (store_out, in their lanes loops; see streams_lanes; plain stores before). Raw
// calls taking turns, time / plain stores, one thread (two): float16 channels_last (64,
// 256, 28, 28) eval 0.82 (0.72), training forward 0.88 (0.88), forward + backward 0.85
// (0.93); (8192, 2048) 0.78 (0.65), 0.83 (0.87), 0.97 (0.95); NCHW (64, 256, 28, 28) eval
// 0.81 (1.01); bfloat16 with ReLU, channels_last (64, 256, 28, 28) 0.80 (0.86), 0.93
// (0.94), 0.91 (0.90); (8192, 1024) training forward 0.97 (0.80), forward + backward 0.96
// (0.94); NCHW (64, 256, 28, 28) eval 0.96 (0.89). Float32 NCHW outputs and dx in training
// since 2026-12-08, of planes of whole lines, from kStreamPlanesFrom (see planes_streamed).
constexpr int64_t kStreamFrom = 16 << 20;
// Values computed into a buffer (in L1) and then streamed out, at a time: 256 bytes. The
// loads of the next values then overlap the stores of the last; blocks of 4096 values read,
// then wrote, in turn (an eval of (8, 64, 16, 56, 56), one thread: 9.86 ms, against 8.39
// with plain stores and 6.58 with blocks of 64).
constexpr int64_t kStreamBlock = 64;

// dst[0, n) = src[0, n) (float32) with non-temporal stores where the CPU has AVX (else
// plain ones): with AVX-512 a whole cache line a store, with AVX half of one. Line-wide
// stores, raw eval calls taking turns with ATen's, time / half-line stores, two threads
// (one), 2026-12-07: (4096, 1024) 0.92-0.93 (0.94), channels_last (32, 128, 32, 32) 0.87
// (0.90), NCHW (32, 128, 32, 32) and (64, 256, 28, 28) 0.98-1.00 (0.99-1.00); training
// forward and forward + backward 0.97-1.02.
inline void stream_out(float* __restrict dst, const float* __restrict src, int64_t n) {
#ifdef __AVX__
#ifdef __AVX512F__
  constexpr int64_t kWidth = 16;
  auto stream = [](float* to, const float* from) { _mm512_stream_ps(to, _mm512_loadu_ps(from)); };
#else
  constexpr int64_t kWidth = 8;
  auto stream = [](float* to, const float* from) { _mm256_stream_ps(to, _mm256_loadu_ps(from)); };
#endif
  constexpr std::uintptr_t kAlign = kWidth * sizeof(float);  // what the stores require
  int64_t i = 0;
  for (; i < n && reinterpret_cast<std::uintptr_t>(dst + i) % kAlign != 0; ++i) dst[i] = src[i];
  for (; i + kWidth <= n; i += kWidth) stream(dst + i, src + i);
  for (; i < n; ++i) dst[i] = src[i];
#else
  std::memcpy(dst, src, n * sizeof(float));
#endif
}

// Ends a thread's non-temporal stores: they are weakly ordered, and another thread reads
// what they wrote next.
inline void fence_streams() {
#ifdef __AVX__
  _mm_sfence();
#endif
}

// A plane (or a row) of n values of an output O at dst: compute(from, to, out) writes its
// values [from, to) to out[0, to - from). Straight to dst, or (stream, float32) a block of
// kStreamBlock values at a time into a buffer in L1, then to dst with non-temporal stores
// (not fenced: the caller fences its thread's stores once, fence_streams).
template <typename O, typename Compute>
void write_plane(O* dst, int64_t n, bool stream, Compute&& compute) {
  if constexpr (std::is_same_v<O, float>) {
    if (stream) {
      alignas(64) float values[kStreamBlock];
      for (int64_t from = 0; from < n; from += kStreamBlock) {
        const int64_t to = std::min(n, from + kStreamBlock);
        compute(from, to, values);
        stream_out(dst + from, values, to - from);
      }
      return;
    }
  }
  compute(int64_t{0}, n, dst);
}

// Rows [begin, end) of a float32 output y of rows of `width` values, written with
// non-temporal stores: compute(first, last, from, to, values) writes the values of rows
// [first, last), columns [from, to), row by row into `values` (at most kStreamBlock), which
// are then streamed out (a long row as write_plane's), and fenced (fence_streams).
template <typename Compute>
void stream_rows(float* y, int64_t begin, int64_t end, int64_t width, Compute&& compute) {
  if (width >= kStreamBlock) {
    for (int64_t r = begin; r < end; ++r)
      write_plane(y + r * width, width, true, [&](int64_t from, int64_t to, float* values) {
        compute(r, r + 1, from, to, values);
      });
  } else {
    alignas(64) float values[kStreamBlock];
    for (int64_t first = begin; first < end; first += kStreamBlock / width) {
      const int64_t last = std::min(end, first + kStreamBlock / width);
      compute(first, last, int64_t{0}, width, values);
      stream_out(y + first * width, values, (last - first) * width);
    }
  }
  fence_streams();
}

// Whether an output of `values` values of type T is written with non-temporal stores: one
// of kStreamFrom bytes or more.
template <typename T>
bool streams_out(int64_t values) {
  return values * static_cast<int64_t>(sizeof(T)) >= kStreamFrom;
}

// Whether the AVX-512 loops (store_out) write an output y of `units` rows or planes of
// `width` values each with non-temporal stores: one of kStreamFrom bytes or more, and in
// float16 and bfloat16 only where every store is one, each unit whole lanes from a 32-byte
// boundary. A unit that starts or ends off one has a plain masked store at either end, on
// the line that the unit before or after writes non-temporally, and such lines went from
// the write-combining buffers back through the caches: float16 eval of NCHW planes, time /
// plain stores, two threads (one), 7x7 14.5 (22.1), 14x14 4.5 (6.8); rows of 1030 values 2.1,
// channels_last rows of 24 and 100 16.1 and 8.1; with non-temporal stores on whole lines
// only (plain ones on the lines at either end) still 1.73, 2.42, 1.28, 1.39 and 1.42.
// (float32 rows run as one run of values per thread, PeriodicTables', a line at a time.)
template <typename T>
bool streams_lanes(const T* y, int64_t units, int64_t width) {
  const bool whole_lanes =
      width % kLanes == 0 && reinterpret_cast<std::uintptr_t>(y) % (kLanes * sizeof(T)) == 0;
  return streams_out<T>(units * width) && (std::is_same_v<T, float> || whole_lanes);
}

// NCHW training outputs and dx of at least this many bytes are written with non-temporal
// stores (streams_planes; a channel at a time, forward_planes and input_gradients), from
// half kStreamFrom: with a ReLU reading the output after the call, module forward +
// backward, the Numba kernels' time / the node's, two threads (one), (32, 64, 32, 32), (16,
// 128, 32, 32), (32, 96, 28, 28) and (8, 96, 56, 56), 8-10 MiB: 1.17, 1.13, 1.13 and 1.19
// (1.16, 1.12, 1.12 and 1.13), where plain stores gave 1.14, 1.10, 1.05 and 1.11 (0.98,
// 0.97, 1.00 and 0.98). A training forward without a graph then leaves its output in memory
// for the ReLU: 0.84-1.02 (1.00-1.51 without the ReLU); from 3.2 to 6.4 MiB that loss grew
// to 0.75-0.90 (one 1.05), hence the limit.
constexpr int64_t kStreamPlanesFrom = kStreamFrom / 2;

// Whether forward_planes and input_gradients write an NCHW output of `values` values of
// type T in planes of `size` with non-temporal stores (write_plane): a float32 one of
// kStreamPlanesFrom bytes or more whose planes are whole cache lines (and, the overload
// with y, start on a line's start: each store a whole line, see streams_lanes).
template <typename T>
bool streams_planes(int64_t values, int64_t size) {
  return std::is_same_v<T, float> && size % kLanes == 0 &&
         values * static_cast<int64_t>(sizeof(T)) >= kStreamPlanesFrom;
}
template <typename T>
bool streams_planes(const T* y, int64_t values, int64_t size) {
  return streams_planes<T>(values, size) && reinterpret_cast<std::uintptr_t>(y) % 64 == 0;
}

// Rows [begin, end) of an output y of rows of `width` values, of which y has `values` in
// all: compute(first, last, from, to, out) writes the values of rows [first, last), columns
// [from, to), row by row to out[0, (last - first) * (to - from)). Straight into y (all the
// rows at once, every column), or, for a float32 y of kStreamFrom bytes or more, a block at
// a time through stream_rows.
template <typename T, typename Compute>
void write_rows(T* y, int64_t values, int64_t begin, int64_t end, int64_t width,
                Compute&& compute) {
  if constexpr (std::is_same_v<T, float>) {
    if (streams_out<T>(values)) return stream_rows(y, begin, end, width, compute);
  }
  compute(begin, end, int64_t{0}, width, y + begin * width);
}

// Rows whose terms a sum adds in registers before it adds them to the sums in memory.
constexpr int64_t kRowsAtOnce = 8;
// The statistics of half-precision rows add this many: their pass is bound by arithmetic
// (each value's conversion, its centring, its square), and a store to the sums in memory
// every 16 rows instead of 8 is a tenth of it less. Raw bfloat16 training forwards taking
// turns, time / 8 rows, two threads (one): (4096, 1024) 0.93-0.94 (0.95), channels_last
// (32, 128, 32, 32) 0.91-0.94 (0.97), (8, 96, 24, 24) 0.95. (Float32's, bound by memory:
// 0.91-1.00, not kept: their sums' rounding grows with the rows summed in float32.)
constexpr int64_t kHalfStatisticsRows = 16;
// The backward's sums over an input of kPairsFrom bytes or more (larger than our machines'
// 32 MiB L3: read from memory however the layers before ran) add 2 rows at once instead,
// asking for the lines of each pair kPairsAhead rows ahead: 8 rows read a column at a time
// keep 16 lines of two arrays in flight from memory at once, and read it well below its
// bandwidth (a sum of the same arrays read in order took 0.65x the time). Two rows cost a
// store to the sums in memory every 2 rows instead of 8, which on data in the caches loses
// more than the reads gain: channels_last (32, 128, 32, 32) and (8, 96, 48, 48), 16 and 7
// MiB, were level to 10 % slower, hence the threshold. The backward's sums alone (dweight
// and dbias), channels_last (64, 256, 56, 56), ms, one thread (two): 29.3 -> 24.5 (18.7 ->
// 15.8); raw forward + backward, 8 rows -> pairs [ATen's]: 80.6 -> 76.3 [76.8] (47.0 ->
// 46.3 [52.6]), with ReLU 86.2 -> 79.7 (41.7 -> 40.7); (64, 64, 112, 112) 62.6 -> 55.9
// (32.9 -> 29.2), with ReLU 68.5 -> 61.8 (46.4 -> 44.1); (64, 256, 28, 28) 18.6 -> 17.7
// (10.4 -> 9.8); bfloat16 and SiLU level to 9 % faster. (A row at a time into float32 sums
// in memory, a stand-alone loop read at the arrays' bandwidth; in the kernel, against
// pairs, float32 was within 5 % either way and bfloat16 10-33 % slower. GCC 12 vectorizes
// that loop with ReLU's derivative in its term only under `#pragma GCC ivdep`.)
constexpr int64_t kPairsFrom = 32 << 20;
constexpr int64_t kPairsAhead = 16;

// Adds the terms of `count` rows from r0 on to each channel's sums (see column_sums): first
// and second_sums[c] += Σ term(r, c)[0] and [1] over those rows, summed in registers (in
// term's type). count: a compile-time constant (std::integral_constant), so that the loop
// over the rows unrolls in full (up to 16 rows), also with an activation's derivative in
// term: a loop left inside the loop over the channels keeps that one scalar (5-8x slower;
// 3-4x for 16 rows of statistics under an unroll of 8). (Half precision's overloads, below,
// run on lanes instead.)
template <typename Term, typename Count>
[[gnu::always_inline]] inline void add_rows_to(const Term& term, int64_t r0, Count,
                                               int64_t channels, double* __restrict first_sums,
                                               double* __restrict second_sums) {
  using Terms = std::invoke_result_t<const Term&, int64_t, int64_t>;
  for (int64_t c = 0; c < channels; ++c) {
    typename Terms::value_type first = 0, second = 0;
#pragma GCC unroll 16
    for (int64_t i = 0; i < Count::value; ++i) {
      const Terms t = term(r0 + i, c);
      first += t[0];
      second += t[1];
    }
    first_sums[c] += first;
    second_sums[c] += second;
  }
}

// batch_statistics' terms: {d, d²}, d = x - centre of the channel, in Term (float or
// double).
template <typename T, typename Term>
struct CentredTerms {
  const T* x;
  const float* centre;
  int64_t channels;
  std::array<Term, 2> operator()(int64_t r, int64_t c) const {
    const Term d = static_cast<Term>(load(x[r * channels + c])) - centre[c];
    return {d, d * d};
  }
};

#if BATCHNORM_HALF_LOOPS
// sums[0, kLanes) += terms, in float64 (add_rows_to's last step, on lanes); with a mask,
// sums[j] for its lanes j only
inline std::array<__m512d, 2> float64_halves(Lanes terms) {  // lanes [0, 8) and [8, 16)
  return {_mm512_cvtps_pd(_mm512_castps512_ps256(terms)),
          _mm512_cvtps_pd(
              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(terms), 1)))};
}
inline void add_to_sums(double* sums, Lanes terms) {
  const std::array<__m512d, 2> wide = float64_halves(terms);
  for (int k = 0; k < 2; ++k)
    _mm512_storeu_pd(sums + 8 * k, _mm512_add_pd(_mm512_loadu_pd(sums + 8 * k), wide[k]));
}
inline void add_to_sums(double* sums, Lanes terms, __mmask16 mask) {
  const std::array<__m512d, 2> wide = float64_halves(terms);
  for (int k = 0; k < 2; ++k) {
    const __mmask8 m = static_cast<__mmask8>(mask >> (8 * k));
    _mm512_mask_storeu_pd(sums + 8 * k, m,
                          _mm512_add_pd(_mm512_maskz_loadu_pd(m, sums + 8 * k), wide[k]));
  }
}
// The float32 terms of float16 rows (and bfloat16 ones: add_half_rows_to), 16 channels at a
// time in AVX-512's instructions (CentredTerms' and GradientTerms'): F16C's conversion where
// the generic loop converts in integer operations (load(F16)), each channel's terms summed
// with the generic loop's operations in its order (the same bits); the channels past the
// last 16 on masked lanes. terms_lanes(term, i, c[, mask]), for values [i, i + kLanes) of
// channels [c, c + kLanes) (the first ones: mask): the first term, and the second as its
// two factors (the generic loop's sum of that product is a fused multiply-add). (Intrinsics
// by name here: the lanes' helpers come later in this file, with terms_lanes, which
// column_sums' call finds by its argument's type where it is instantiated.) Until 2026-12-07
// night the generic loop summed the channels past the last 16, converting them in integer
// operations: raw float16 training forwards, time / before, two threads, channels_last (8,
// 24, 64, 64) 0.30, (32, 8, 32, 32) 0.26, (4096, 200) 0.83; bfloat16 (add_half_rows_to)
// 0.58, 0.47, 0.93.
template <typename Term, typename Count>
void add_lanes_to(const Term& term, int64_t r0, Count, int64_t channels,
                  double* __restrict first_sums, double* __restrict second_sums) {
  auto add_channels = [&](int64_t c, auto... mask) {
    Lanes first = _mm512_setzero_ps(), second = first;
#pragma GCC unroll 16
    for (int64_t r = r0; r < r0 + Count::value; ++r) {
      const std::array<Lanes, 3> t = terms_lanes(term, r * channels + c, c, mask...);
      first = _mm512_add_ps(first, t[0]);
      second = _mm512_fmadd_ps(t[1], t[2], second);
    }
    add_to_sums(first_sums + c, first, mask...);
    add_to_sums(second_sums + c, second, mask...);
  };
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) add_channels(c);
  if (c < channels) add_channels(c, static_cast<__mmask16>((1u << (channels - c)) - 1));
}
template <typename T>
constexpr bool kHalf = std::is_same_v<T, F16> || std::is_same_v<T, BF16>;
// The statistics' terms (CentredTerms) of bfloat16 rows of whole pairs of lanes (a multiple
// of 32 channels), 32 channels a load: each 32-bit lane holds two values, the even
// channel's in its low half, the odd one's in its high half, so a shift widens the first
// and a mask the second (GCC's loop widened each half of the load with a shuffle and a
// shift); the sums run on the even and odd channels apart, their centres taken apart the
// same way, and go back to channel order in two permutes per 16 channels before the
// float64 sums. Each channel's terms are added in the same order as the generic loop's:
// the same bits. Raw bfloat16 training forwards taking turns with the generic loop's,
// time / its, two threads (one), 2026-12-08: (4096, 1024) 0.88-0.92 (0.95-1.01),
// channels_last (32, 128, 32, 32) 0.87-0.92 (0.98-0.99), (32768, 128) 0.92 (1.02-1.03),
// channels_last (64, 256, 28, 28) 0.92 (0.98).
template <typename Count>
[[gnu::always_inline]] inline void add_bf16_pairs_to(const CentredTerms<BF16, float>& term,
                                                     int64_t r0, Count, int64_t channels,
                                                     double* __restrict first_sums,
                                                     double* __restrict second_sums) {
  const __m512i high_halves = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  // permutes of two vectors a, b (index 16 + j: b's lane j): their even lanes, and back
  const __m512i evens =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  const __m512i first_interleaved =  // a0 b0 a1 b1 ... a7 b7
      _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i last_interleaved = _mm512_add_epi32(first_interleaved, _mm512_set1_epi32(8));
  for (int64_t c = 0; c < channels; c += 2 * kLanes) {
    const Lanes centre = _mm512_loadu_ps(term.centre + c);
    const Lanes next_centre = _mm512_loadu_ps(term.centre + c + kLanes);
    const Lanes even_centre = _mm512_permutex2var_ps(centre, evens, next_centre);
    const Lanes odd_centre = _mm512_permutex2var_ps(centre, odds, next_centre);
    Lanes even_first = _mm512_setzero_ps(), odd_first = even_first;
    Lanes even_second = even_first, odd_second = even_first;
#pragma GCC unroll 16
    for (int64_t r = r0; r < r0 + Count::value; ++r) {
      const __m512i pairs = _mm512_loadu_si512(term.x + r * channels + c);
      const Lanes even = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)),
                                       even_centre);
      const Lanes odd = _mm512_sub_ps(
          _mm512_castsi512_ps(_mm512_and_si512(pairs, high_halves)), odd_centre);
      even_first = _mm512_add_ps(even_first, even);
      even_second = _mm512_fmadd_ps(even, even, even_second);
      odd_first = _mm512_add_ps(odd_first, odd);
      odd_second = _mm512_fmadd_ps(odd, odd, odd_second);
    }
    for (auto [sums, even_sum, odd_sum] : {std::tuple{first_sums, even_first, odd_first},
                                           std::tuple{second_sums, even_second, odd_second}}) {
      add_to_sums(sums + c, _mm512_permutex2var_ps(even_sum, first_interleaved, odd_sum));
      add_to_sums(sums + c + kLanes,
                  _mm512_permutex2var_ps(even_sum, last_interleaved, odd_sum));
    }
  }
}
// The float32 terms of half-precision rows (T) on lanes (add_lanes_to), but for bfloat16
// rows of whole lanes: the statistics' on pairs of lanes where the rows are whole pairs
// (add_bf16_pairs_to), else the generic loop, vectorized by GCC (its widening a shift),
// which sums as fast or faster than add_lanes_to: raw bfloat16 calls, lanes' time / its,
// one thread, channels_last (32, 128, 32, 32) training forward 0.98-1.03, forward +
// backward 1.00-1.05.
template <typename T, typename Term, typename Count>
[[gnu::always_inline]] inline void add_half_rows_to(const Term& term, int64_t r0, Count count,
                                                    int64_t channels,
                                                    double* __restrict first_sums,
                                                    double* __restrict second_sums) {
  if constexpr (std::is_same_v<Term, CentredTerms<BF16, float>>) {
    if (channels % (2 * kLanes) == 0)
      return add_bf16_pairs_to(term, r0, count, channels, first_sums, second_sums);
  }
  if (std::is_same_v<T, BF16> && channels % kLanes == 0)
    return add_rows_to<Term, Count>(term, r0, count, channels, first_sums, second_sums);
  add_lanes_to(term, r0, count, channels, first_sums, second_sums);
}
template <typename T, typename Count, typename = std::enable_if_t<kHalf<T>>>
[[gnu::always_inline]] inline void add_rows_to(const CentredTerms<T, float>& term, int64_t r0,
                                               Count count, int64_t channels,
                                               double* __restrict first_sums,
                                               double* __restrict second_sums) {
  add_half_rows_to<T>(term, r0, count, channels, first_sums, second_sums);
}
template <typename T, typename Gradient>
struct GradientTerms;
template <typename T, typename Gradient, typename Count,
          typename = std::enable_if_t<kHalf<T>>>
[[gnu::always_inline]] inline void add_rows_to(const GradientTerms<T, Gradient>& term,
                                               int64_t r0, Count count, int64_t channels,
                                               double* __restrict first_sums,
                                               double* __restrict second_sums) {
  add_half_rows_to<T>(term, r0, count, channels, first_sums, second_sums);
}
#endif

// Per-channel float64 sums of two terms over rows: sums[k][c] = sum over r of term(r, c)[k]
// for the value at r * channels + c (term returns an array of two terms of the type it
// chooses: float or double for the statistics, see batch_statistics; float for the
// backward's, see input_gradients).
// The rows are cut into a number of blocks that depends on the input's size only, each
// summed on its own, and the blocks' sums added in order: the same result on any number of
// threads. Within a block, the terms of kRowsAtOnce rows (the statistics of half-precision
// inputs: kHalfStatisticsRows) are added in registers (the loop over the channels
// vectorizes) before the block's sums in memory. Measured on one thread, (32768, 128) and
// (4096, 1024), the statistics' sums / the backward's: 0.29-0.33 / 0.72-1.05 ms; a row at a
// time the loop is store-bound; tiles of 16 channels summed down 8 rows in registers,
// 0.56-0.60 / 1.3-2.8 ms (they read each row a cache line at a time);
// the sums as an array of K terms instead of two restrict pointers, 0.30-0.34 / 2.8-4.7 ms
// (the vectorized loop is versioned for aliasing). For a large input of `pass` (see
// sums_prefetch: T is the input's element type), the arrays of `reads` (the rows term
// reads) are prefetched two groups of rows ahead; the backward's sums over an input of
// kPairsFrom bytes or more add pairs of rows instead (see there). prepare(r0, count), where
// given, runs before the terms of rows [r0, r0 + count) are read: it writes what they read
// (the backward's dpre: RowsBatchNorm::backward), which they then find in L1.
struct Unprepared {
  void operator()(int64_t, int64_t) const {}
};
template <typename T, typename Term, typename Prepare = Unprepared>
std::array<std::vector<double>, 2> column_sums(int64_t rows, int64_t channels, Term&& term,
                                               Pass pass, std::initializer_list<Stream> reads,
                                               const Prepare& prepare = Prepare{}) {
  using Terms = std::invoke_result_t<Term&, int64_t, int64_t>;  // std::array<term type, 2>
  const int64_t blocks =
      std::clamp<int64_t>(rows * channels / (kParallelValues / 2), 1,
                          std::min<int64_t>(64, std::max<int64_t>(1, (1 << 15) / channels)));
  std::vector<double> partial(blocks * 2 * channels, 0.0);
  const bool prefetching = sums_prefetch<T>(rows, channels, pass);
  const bool in_pairs = prefetching && pass == kBackward &&
                        rows * channels * static_cast<int64_t>(sizeof(T)) >= kPairsFrom;
  auto sum_block = [&](int64_t block) {
    double* __restrict first_sums = partial.data() + block * 2 * channels;
    double* __restrict second_sums = first_sums + channels;
    // term's copy, a local: the loop reads what term captured (by value) in registers (read
    // through a reference, leaky ReLU's slope was loaded where p <= 0 only: see
    // with_activation)
    const std::decay_t<Term> local_term(term);
    auto add_rows = [&](int64_t r0, auto count) {
      add_rows_to(local_term, r0, count, channels, first_sums, second_sums);
    };
    const int64_t begin = rows * block / blocks, end = rows * (block + 1) / blocks;
    int64_t r0 = begin;
    // groups of `count` rows (a compile-time constant), the lines of the group `ahead` rows
    // on asked for where prefetching
    auto in_groups = [&](auto count, int64_t ahead) {
      constexpr int64_t n = decltype(count)::value;
      for (; r0 + n <= end; r0 += n) {
        if (prefetching && r0 + ahead + n <= rows) prefetch_rows(reads, r0 + ahead, n, channels);
        prepare(r0, n);
        add_rows(r0, count);
      }
    };
    if (in_pairs)
      in_groups(std::integral_constant<int64_t, 2>{}, kPairsAhead);
    else if (pass == kForward && !std::is_same_v<T, float>)  // (the group two groups on)
      in_groups(std::integral_constant<int64_t, kHalfStatisticsRows>{}, 2 * kHalfStatisticsRows);
    else
      in_groups(std::integral_constant<int64_t, kRowsAtOnce>{}, 2 * kRowsAtOnce);
    for (; r0 < end; ++r0) {
      prepare(r0, int64_t{1});
      add_rows(r0, std::integral_constant<int64_t, 1>{});
    }
  };
  if (blocks == 1)
    sum_block(0);
  else
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) sum_block(block);
    });
  std::array<std::vector<double>, 2> sums;
  for (int k = 0; k < 2; ++k) {
    sums[k].assign(partial.begin() + k * channels, partial.begin() + (k + 1) * channels);
    for (int64_t block = 1; block < blocks; ++block) {
      const double* p = partial.data() + (block * 2 + k) * channels;
      for (int64_t c = 0; c < channels; ++c) sums[k][c] += p[c];
    }
  }
  return sums;
}

// Rows that sampled_centre averages.
constexpr int64_t kCentreSamples = 16;
// batch_statistics keeps its float32 sums where every channel's centre c lies within
// (mean - c)^2 <= kCentreSpread * var of its mean (see there).
constexpr double kCentreSpread = 2.0;

// Each channel's mean over kCentreSamples rows (all rows, if fewer): one row from each of as
// many equal strata of the rows, at an offset in its stratum that changes from one stratum
// to the next (a fixed offset would sample the same pixel of every image of a channels_last
// batch; offset 0, the corner, which padding makes unlike the rest); `fallback`'s value
// where that mean is not finite.
// (sample_position: the k-th of `samples` such positions among n.)
inline int64_t sample_position(int64_t k, int64_t samples, int64_t n) {
  const int64_t offset = (k + 1) * 2654435761LL % (n / samples);  // also in the first stratum
  return k * n / samples + offset;
}
template <typename T>
std::vector<float> sampled_centre(const T* x, const float* fallback, int64_t rows,
                                  int64_t channels) {
  const int64_t samples = std::min(rows, kCentreSamples);
  std::vector<float> centre(channels, 0.0f);
  float* __restrict sum = centre.data();
  for (int64_t k = 0; k < samples; ++k) {
    const T* __restrict row = x + sample_position(k, samples, rows) * channels;
    for (int64_t c = 0; c < channels; ++c) sum[c] += load(row[c]);
  }
  for (int64_t c = 0; c < channels; ++c) {
    const float mean = sum[c] / samples;
    sum[c] = std::isfinite(mean) ? mean : fallback[c];
  }
  return centre;
}

// The batch's mean and biased variance, in one pass: sums of d = x - c and d² around a centre
// c per channel, var = E[d²] - E[d]². A relative rounding error e of the sums' terms becomes
// e (1 + (c - mean)² / var) of the variance, as E[d²] = var + (c - mean)². So first float32
// terms, summed over 8 rows (half precision: 16) in float32 before the float64 sums
// (column_sums), around sampled_centre's c, for which (c - mean)² / var is 1/16 on average
// where rows are drawn independently, and above kCentreSpread (2) with a chance of 1.5e-8 a
// channel if they are normal. Where every channel is within it, those sums stand: their
// rounding adds at most ~60 float32 roundings to the variance, and measured as little as the
// float64 sums did (5e-8 to 1e-7 of it against float64, 2026-12-06: (32768, 128) and (4096,
// 1024) at means 0, 3 and 1e4, rows sorted, Student-t rows). The check cannot pass wrongly:
// the float32 variance is off by ~8 roundings (16 in half precision) times (1 + (c - mean)²
// / var) at most, far from the factor
// (c - mean)² / var / kCentreSpread it would take. Else the sums again, of float64 terms
// around `origin` (a channel's first value, or 0): exact terms, whose cancellation costs
// (origin - mean)² / var of float64's digits, at most the number of rows. Those terms alone
// made the pass compute-bound: raw float32 training forwards, ms, one thread (two), float64
// -> float32 terms: (4096, 1024) 1.88 -> 1.67 (0.97 -> 0.89), channels_last (32, 128, 32, 32)
// 1.84 -> 1.59 (0.87 -> 0.73), (8, 128, 12, 12) 0.043 -> 0.034 (0.033 -> 0.027), (1024, 128)
// 0.039 -> 0.030; bfloat16 inputs, whose terms were float32 around the first value before,
// take 0-2 % longer (the sampling and the check).
// {mean, biased variance} of `count` values from their sums of d = x - centre and d²
// (rounding can make the variance negative: 0; NaN stays NaN, as torch's).
inline std::pair<double, double> moments_about(double centre, double sum_d, double sum_d2,
                                               int64_t count) {
  const double shift = sum_d / count, var = sum_d2 / count - shift * shift;
  return {centre + shift, var < 0.0 ? 0.0 : var};
}

// Whether sums around `centre` keep their digits (see batch_statistics): (mean - centre)²
// within kCentreSpread variances (not for NaN).
inline bool near_centre(double mean, double centre, double var) {
  const double far = mean - centre;
  return far * far <= kCentreSpread * var;
}

template <typename T>
void batch_statistics(const T* x, const float* origin, int64_t rows, int64_t channels,
                      double* mean, double* var) {
  auto moments = [&](auto term_type, const float* centre) {
    using Term = decltype(term_type);
    auto sums = column_sums<T>(rows, channels, CentredTerms<T, Term>{x, centre, channels},
                               kForward, {x, nullptr});
    for (int64_t c = 0; c < channels; ++c)
      std::tie(mean[c], var[c]) = moments_about(centre[c], sums[0][c], sums[1][c], rows);
  };
  const std::vector<float> centre = sampled_centre(x, origin, rows, channels);
  moments(float{}, centre.data());
  for (int64_t c = 0; c < channels; ++c)
    if (!near_centre(mean[c], centre[c], var[c])) return moments(double{}, origin);
}

// y = act((x - mean) * invstd * weight + bias [+ z]) (see write_rows).
template <typename T>
void normalize(const Rows<T>& in, int64_t activation, float slope, T* y) {
  const int64_t channels = in.channels;
  with_activation(activation, slope, [&](auto act, auto, auto memory_bound) {
    for_rows(in.rows, channels, [&](int64_t begin, int64_t end) {
      auto compute = [&](int64_t first, int64_t last, int64_t from, int64_t to, T* out) {
        // one row of part of the channels, or rows of all: out[i - start] either way
        const int64_t start = first * channels + from;
        in.template each_pre<memory_bound>(first, last, [&, act](int64_t i, float pre) {
          out[i - start] = store<T>(act(pre));
        }, from, to);
      };
      write_rows(y, in.rows * channels, begin, end, channels, compute);
    });
  });
}

// g = dL/d(pre-activation) as input_gradients' passes read it, a value at a time:
// g(i, c, d), with d = x - origin (Centre's) at value i of channel c. Either g's values
// (dy without an activation, or the dpre of NCHW planes' pre_gradient) ...
template <typename G>
struct GivenGradient {
  const G* g;
  float operator()(int64_t i, int64_t, float) const { return load(g[i]); }
  std::array<Stream, 2> streams() const { return {g, nullptr}; }  // the arrays it reads
};

// ... or dpre as the sums' prepare step writes it from dy (and z) a group of rows at a time,
// just before the group's terms read it (see RowsBatchNorm::backward): the arrays that
// stream from memory are dy and z.
template <typename T>
struct PreparedGradient {
  const float* dpre;
  const T* dy;
  const T* z;
  float operator()(int64_t i, int64_t, float) const { return dpre[i]; }
  std::array<Stream, 2> streams() const { return {dy, z}; }
};

// ... or the derivative of the activation (with_activation's) at dy and the pre-activation,
// computed from d (and the residual z) in each pass: no dpre to write and read back.
template <typename T, bool kResidual, typename Derivative>
struct ActivationGradient {
  const T* dy;
  const T* z;
  const float* scale;
  const float* shift;  // Affine's, from the origin
  Derivative derivative;
  float operator()(int64_t i, int64_t c, float d) const {
    float pre = d * scale[c] + shift[c];
    if constexpr (kResidual) pre += load(z[i]);
    return derivative(load(dy[i]), pre);
  }
  std::array<Stream, 2> streams() const { return {dy, z}; }
};

// The constants of a channel's dx = k (g - a - (x - origin) b) (see input_gradients), and
// its dweight[c] and dbias[c] where asked for (not null), from its sums {Σ g, Σ g (x - mean)}
// over `count` values (in training, or where dweight or dbias is asked for), invstd, and the
// offset of its origin (Centre's). The offset's term, (x - mean) b = (x - origin) b - offset
// b, folds into a (as Affine's shift: of g's size).
struct ChannelGradients {
  float k, a, b;
};
inline ChannelGradients channel_gradients(int64_t c, std::array<double, 2> sums, double invstd,
                                          const float* weight, float offset, int64_t count,
                                          bool training, float* dweight, float* dbias) {
  const auto [sum_g, sum_g_xmu] = sums;
  if (dweight) dweight[c] = static_cast<float>(sum_g_xmu * invstd);
  if (dbias) dbias[c] = static_cast<float>(sum_g);
  ChannelGradients out{static_cast<float>(weight ? invstd * weight[c] : invstd), 0.0f, 0.0f};
  if (training) {
    const double b = sum_g_xmu * invstd * invstd / count;
    out.a = static_cast<float>(sum_g / count - offset * b);
    out.b = static_cast<float>(b);
  }
  return out;
}

// A value's dx in training from its channel's constants: k (g - a - d b), d = x - origin.
inline float dx_of(float k, float a, float b, float g, float d) { return k * (g - a - d * b); }

// Whether a Gradient is a given array of g's values (GivenGradient, PreparedGradient):
// then the streamed float32 dx of rows and the half-precision dx of planes take it
// (dx_halves).
template <typename Gradient>
constexpr bool given_values = false;
template <typename G>
constexpr bool given_values<GivenGradient<G>> = true;
template <typename T>
constexpr bool given_values<PreparedGradient<T>> = true;

template <bool kPlane, bool kStream, typename T, typename Gradient>
void dx_halves(const Gradient& g, const T* x, int64_t first, int64_t channel, T* dx, int64_t n,
               const float* origin, const float* k, const float* a, const float* b,
               int64_t period = 0);

// The per-channel arrays that a Gradient reads (ActivationGradient's scale and shift; none:
// null), and a copy of it that reads them from `scale` and `shift` instead (PeriodicTables':
// see input_gradients).
template <typename Gradient>
std::array<const float*, 2> channel_arrays(const Gradient&) {
  return {nullptr, nullptr};
}
template <typename T, bool kResidual, typename Derivative>
std::array<const float*, 2> channel_arrays(const ActivationGradient<T, kResidual, Derivative>& g) {
  return {g.scale, g.shift};
}
template <typename Gradient>
Gradient on_tables(Gradient g, const float*, const float*) {
  return g;
}
template <typename T, bool kResidual, typename Derivative>
ActivationGradient<T, kResidual, Derivative> on_tables(
    ActivationGradient<T, kResidual, Derivative> g, const float* scale, const float* shift) {
  g.scale = scale, g.shift = shift;
  return g;
}

// Float32 values in a 64-byte cache line, and AVX-512's lanes (kLanes).
constexpr int64_t kLineFloats = 16;
// PeriodicTables' periods: at most this many values (8 KiB a table). Rows of 1500
// values, a period of 6000, took 1.18-1.22x the time of a row at a time (eval, two threads);
// rows of 250 values, 2000, 0.60-0.73x.
constexpr int64_t kMaxPeriod = 2048;

// Per-channel constants for rows of `width` values that a loop of AVX-512's lanes reads as
// one run of values (normalize_units, input_gradients; periodic_tables says for which): where
// the width is not a multiple of kLineFloats, a row at a time ends each row on a masked lane
// (half precision: see kHalfRunsBelow), and float32 rows start off a cache line, whose first
// and last lines, which they share with their neighbours, took masked stores. Raw calls
// taking turns, one run / a row at a time, two threads (one): (42000, 100) eval 0.38
// (0.40-0.43; ATen's time / ours 1.3 (1.1-1.3), 0.5 before), training forward 0.52-0.55
// (0.55-0.56), forward + backward 0.60 (0.65); (16800, 250) eval 0.60-0.66 (0.80-0.81),
// training forward 0.79-0.81 (0.90), forward + backward 0.88-0.91 (0.97-1.00). Each array
// of `constants` repeated over period = lcm(width, kLineFloats) values, and kLineFloats
// more (a vector that starts in the last line reads on), in that order; none (period 0)
// where the width is a multiple of kLineFloats or the period is over kMaxPeriod.
struct PeriodicTables {
  int64_t period = 0;
  std::vector<float> values;

  PeriodicTables() = default;
  PeriodicTables(int64_t width, std::initializer_list<const float*> constants) {
    if (width % kLineFloats == 0 || std::lcm(width, kLineFloats) > kMaxPeriod) return;
    period = std::lcm(width, kLineFloats);
    values.resize(constants.size() * stride());
    float* table = values.data();
    for (const float* array : constants) {
      if (array)
        for (int64_t j = 0; j < stride(); ++j) table[j] = array[j % width];
      table += stride();
    }
  }
  int64_t stride() const { return period + kLineFloats; }
  const float* operator[](int64_t k) const { return values.data() + k * stride(); }
};

// Half-precision rows narrower than this run a row at a time: one masked lane per row is
// a small part of a wide row, and the tables cost more than it. Rows as one run, raw calls,
// time / a row at a time, two threads, float16 (bfloat16), eval: channels_last (32, 8, 32,
// 32) 0.20-0.23 (0.18-0.24), (8, 24, 64, 64) 0.32-0.39 (0.37-0.40), (8, 100, 28, 28)
// 0.73-0.79 (0.70-0.85), (6000, 136) 0.76 (0.84), (4096, 200) 0.82-1.08 (0.93-1.04),
// (3000, 264) 0.96 (0.95), (3000, 300) 1.16 (1.07), (2000, 520) 1.11 (1.29), (1000, 1000)
// 1.27 (1.49); training forward 0.75-0.83 (0.62-0.73) for the narrowest, 1.06-1.15
// (1.07-1.09) from 520 on.
constexpr int64_t kHalfRunsBelow = 256;
template <typename T>
PeriodicTables periodic_tables(int64_t width, std::initializer_list<const float*> constants) {
  if (!std::is_same_v<T, float> && width >= kHalfRunsBelow) return PeriodicTables();
  return PeriodicTables(width, constants);
}

// The SiLU backward's dpre (pre_gradient_lanes), of any dtype, runs rows narrower than this
// as one run: dpre stays in L1, so unlike a float32 output's lines there is only a masked
// lane a row to save, which the tables cost more than on wider rows. Raw forward + backward
// with SiLU, time / a row at a time, two threads, float16 (float32): channels_last (32, 8,
// 32, 32) 0.67 (0.84), (32, 24, 56, 56) 0.83 (0.91), (8, 100, 28, 28) 0.92 (0.99); (6000,
// 136) 0.96 (1.02), (4096, 200) 0.97-1.06 (1.05-1.07), (2000, 250) 1.01 (1.06).
constexpr int64_t kDpreRunsBelow = 128;

// Calls f(at) with at(i) the position of value i's constants, for i from 0 on in steps of
// at most kLineFloats: i, or on PeriodicTables of `period` (where not 0) i % period, kept as
// i grows (no division). (A test of the period at each i made a bfloat16 or float16 eval of
// rows 1-7 % slower.) A run that starts at any row's first value starts at position 0: the
// tables repeat every row.
template <typename F>
[[gnu::always_inline]] inline void with_positions(int64_t period, F&& f) {
  if (!period) return f([](int64_t i) { return i; });
  int64_t position = 0, last = 0;
  f([&](int64_t i) {
    position += i - last;
    last = i;
    if (position >= period) position -= period;
    return position;
  });
}

// input_gradients' terms of its sums: {g, g (x - mean)} of value r * channels + c, with
// x - mean = d - offset and d = x - origin (Centre's).
template <typename T, typename Gradient>
struct GradientTerms {
  const T* x;
  const float* origin;
  const float* offset;
  Gradient gradient;
  int64_t channels;
  std::array<float, 2> operator()(int64_t r, int64_t c) const {
    const int64_t i = r * channels + c;
    const float d = load(x[i]) - origin[c];
    const float g = gradient(i, c, d);
    return {g, g * (d - offset[c])};
  }
};

// From g = dpre (gradient: GivenGradient, PreparedGradient or ActivationGradient): dweight =
// Σ g (x - mean) invstd, dbias = Σ g; in training dx = weight invstd (g - Σg / M
// - (x - mean) invstd² Σ g (x - mean) / M), in eval dx = weight invstd g (the running
// statistics are constants). kMemoryBound: the dx loop's (for_channels). prepare: the sums'
// (column_sums), which writes what gradient reads; where no sums are asked for, it runs
// alone over the rows first, a pass of its own.
// The sums: float64 sums of float32 terms summed over kRowsAtOnce rows in registers. The
// terms are centred, so no mean cancels in their sum (ATen's Σ g x - mean Σ g loses digits
// to it), and a group's float32 roundings, each of the group's own size, add up over the
// groups as a random walk: on benchmarks/accuracy.py's inputs (means 0 to 1e4, with and
// without SiLU) dweight and dbias stay within 1.6e-7 of float64 torch.nn's largest value,
// against 1.3e-7 with float64 terms. Float64 terms left the loop compute-bound: raw forward
// + backward, one thread (two), channels_last (32, 128, 32, 32) 8.5 -> 7.6 ms (4.36 ->
// 3.88), (4096, 1024) 7.0 -> 6.5 ms (3.55 -> 3.43).
template <bool kMemoryBound, typename T, typename Gradient, typename Prepare = Unprepared>
void input_gradients(const Rows<T>& in, const Gradient& gradient, const float* invstd,
                     const float* weight, bool training, T* dx, float* dweight, float* dbias,
                     const Prepare& prepare = Prepare{}) {
  const int64_t rows = in.rows, channels = in.channels;
  const T* x = in.x;
  const float *origin = in.centre.origin.data(), *offset = in.centre.offset.data();
  const std::array<Stream, 2> g_streams = gradient.streams();
  std::array<std::vector<double>, 2> sums;
  if (training || dweight || dbias)
    sums = column_sums<T>(rows, channels,
                          GradientTerms<T, Gradient>{x, origin, offset, gradient, channels},
                          kBackward, {x, g_streams[0], g_streams[1]}, prepare);
  else if constexpr (!std::is_same_v<Prepare, Unprepared>)
    for_rows(rows, channels, [&](int64_t begin, int64_t end) { prepare(begin, end - begin); });
  std::vector<float> k(channels), a(channels), b(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const std::array<double, 2> sums_c = sums[0].empty()
                                             ? std::array<double, 2>{0.0, 0.0}
                                             : std::array<double, 2>{sums[0][c], sums[1][c]};
    const ChannelGradients g = channel_gradients(c, sums_c, invstd[c], weight, offset[c], rows,
                                                 training, dweight, dbias);
    k[c] = g.k, a[c] = g.a, b[c] = g.b;
  }
  if (!dx) return;
  // a training dx of kStreamFrom bytes or more: non-temporal stores (store_out)
  const bool stream = training && streams_lanes(dx, rows, channels);
  const bool streamed =
      kHalfLoops && std::is_same_v<T, float> && given_values<Gradient> && stream;
  // the rows as one run of values (the constants, g's too, on PeriodicTables): a streamed
  // float32 dx's, and a half-precision training dx's where the width calls for it
  const bool halves = kHalfLoops && !std::is_same_v<T, float> && training;
  const std::array<const float*, 2> g_constants = channel_arrays(gradient);
  const PeriodicTables tables =
      streamed || halves ? periodic_tables<T>(channels, {origin, k.data(), a.data(), b.data(),
                                                         g_constants[0], g_constants[1]})
                         : PeriodicTables();
  for_rows(rows, channels, [&](int64_t begin, int64_t end) {
    const float *__restrict ks = k.data(), *__restrict as = a.data(), *__restrict bs = b.data();
    const T* __restrict xs = x;
    const float* __restrict origins = origin;
    const Gradient g(gradient);  // a local copy: see Rows::each_pre's
    // dx of rows [first, last), channels [from, to) (see write_rows)
    auto gradients_of = [&](int64_t first, int64_t last, int64_t from, int64_t to,
                            T* rows_out) {
      for (int64_t r = first; r < last; ++r) {
        const int64_t base = r * channels;
        T* __restrict out = rows_out + (r - first) * (to - from);
        // in eval x enters through the activation only: an infinite x leaves dx finite, as
        // torch's
        if (!training) {
          for_channels<kMemoryBound, T>(to - from, [&](int64_t j) {
            const int64_t c = from + j;
            out[j] = store<T>(ks[c] * g(base + c, c, load(xs[base + c]) - origins[c]));
          });
          continue;
        }
        if constexpr (kHalfLoops && !std::is_same_v<T, float>) {
          auto dx_row = [&](auto streaming) {
            dx_halves<false, decltype(streaming)::value>(g, xs, base + from, from, out,
                                                         to - from, origins + from, ks + from,
                                                         as + from, bs + from);
          };
          if (stream) dx_row(std::true_type{});
          else dx_row(std::false_type{});
          continue;
        }
        for_channels<kMemoryBound, T>(to - from, [&](int64_t j) {
          const int64_t c = from + j;
          const float d = load(xs[base + c]) - origins[c];
          out[j] = store<T>(dx_of(ks[c], as[c], bs[c], g(base + c, c, d), d));
        });
      }
    };
    // the rows as one run on PeriodicTables (streamed or not); else a float32 dx of
    // kStreamFrom bytes or more in training straight to memory in dx_halves, a line a store
    // (see load_halves of float), a row at a time; other dx through write_rows
    if constexpr (kHalfLoops) {
      if (tables.period) {
        const int64_t first = begin * channels;
        auto one_run = [&](auto streaming) {
          dx_halves<false, decltype(streaming)::value>(
              on_tables(g, tables[4], tables[5]), xs, first, 0, dx + first,
              (end - begin) * channels, tables[0], tables[1], tables[2], tables[3],
              tables.period);
        };
        if (!streamed) return one_run(std::false_type{});
        one_run(std::true_type{});
        return fence_streams();
      }
    }
    if constexpr (kHalfLoops && given_values<Gradient>) {
      if (streamed) {
        for (int64_t r = begin; r < end; ++r)
          dx_halves<false, true>(g, xs, r * channels, 0, dx + r * channels, channels, origins,
                                 ks, as, bs);
        return fence_streams();
      }
    }
    write_rows(dx, rows * channels, begin, end, channels, gradients_of);
    if (!std::is_same_v<T, float> && stream) fence_streams();  // (stream_rows fences its own)
  });
}

// torch's running update (ATen's rule, which leaves the version counters alone): the unbiased
// batch variance, running = (1 - momentum) running + momentum batch.
void update_running(Tensor& running_mean, Tensor& running_var, const double* mean,
                    const double* var, int64_t rows, int64_t channels, double momentum) {
  float* rm = running_mean.data_ptr<float>();
  float* rv = running_var.data_ptr<float>();
  double unbias = rows > 1 ? static_cast<double>(rows) / (rows - 1) : 1.0;
  for (int64_t c = 0; c < channels; ++c) {
    rm[c] = static_cast<float>(momentum * mean[c] + (1 - momentum) * rm[c]);
    rv[c] = static_cast<float>(momentum * var[c] * unbias + (1 - momentum) * rv[c]);
  }
}

// The running statistics, which the forward updates in training: an argument autograd does
// not take for an input (no gradient, no edge, no metadata to keep), unlike a tensor.
struct Running {
  Tensor mean, var;  // undefined when not given
};

// The positions in forward's arguments (and in backward's gradients) of the inputs that can
// have a gradient; forward's ten arguments in all.
enum Input { kX = 0, kWeight = 1, kBias = 2, kResidual = 3, kArguments = 10 };

// The forward: y, and the per-channel invstd and what backward rebuilds the centre from
// (centre_of's `saved`: in training the offset, in eval a copy of the running mean).
struct Normalized {
  Tensor y, invstd, offset;
};

template <typename T>
void normalize_units(const T* x, const T* z, T* y, int64_t units, int64_t width,
                     int64_t channels, bool planes, const float* origin, const float* scale,
                     const float* shift, int64_t activation, float slope);

template <typename T, typename Derivative>
void pre_gradient_lanes(const Rows<T>& in, const T* dy, float* dpre, int64_t first,
                        int64_t count, const Derivative& derivative,
                        const PeriodicTables& tables);

Normalized forward_rows(const Tensor& x, const Tensor& weight, const Tensor& bias,
                        const Tensor& residual, Running& running, bool training,
                        double momentum, double eps, int64_t activation, double slope) {
  const int64_t channels = x.size(1), rows = x.numel() / channels;
  const auto floats = x.options().dtype(at::kFloat);  // statistics: float32, as the parameters
  Normalized out{at::empty_like(x), at::empty({channels}, floats), at::empty({channels}, floats)};
  float *inv = out.invstd.data_ptr<float>(), *off = out.offset.data_ptr<float>();
  with_storage(x, [&](auto element) {
    using T = decltype(element);
    const T* first_row = values_or_null<T>(x);
    const float *rm = values_or_null(running.mean), *rv = values_or_null(running.var);
    Centre centre = centre_of(first_row, 1, training ? nullptr : rm, channels, training);
    if (training) {
      std::vector<double> mean(channels), var(channels);
      const float* origin = centre.origin.data();
      batch_statistics(first_row, origin, rows, channels, mean.data(), var.data());
      for (int64_t c = 0; c < channels; ++c) {
        off[c] = centre.offset[c] = static_cast<float>(mean[c] - origin[c]);
        inv[c] = invstd_of(var[c], eps);
      }
      if (running.mean.defined())
        update_running(running.mean, running.var, mean.data(), var.data(), rows, channels,
                       momentum);
    } else {  // a copy of the running mean: backward needs it as it is now
      for (int64_t c = 0; c < channels; ++c) {
        off[c] = rm[c];
        inv[c] = invstd_of(rv[c], eps);
      }
    }
    Rows<T> in(first_row, values_or_null<T>(residual), rows, channels, std::move(centre), inv,
               values_or_null(weight), values_or_null(bias));
    // bfloat16 and float16 with a memory-bound activation: the same bits from AVX-512's
    // loops, rounded by their conversions (see narrow_bf16). Raw bfloat16 training forwards
    // taking turns with the generic loop's, time / before, one thread (two): (4096, 1024)
    // 0.86-0.94 (0.84-0.88), channels_last (32, 128, 32, 32) 0.84-0.85 (0.83), (512, 256)
    // 0.86 (0.90-0.92); with ReLU 0.84-0.86 (0.85-0.88), 0.81-0.82 (0.80), 0.84 (0.89-0.91).
    // SiLU too, and float32 rows of every size with SiLU, bound by its exp, where the
    // registers beat GCC's loop (see one_plus_exp; their stores plain under kStreamFrom:
    // normalize_units). Raw calls, time / GCC's loop (with the new exp), two threads (one):
    // channels_last (8, 96, 24, 24) eval 0.86 (0.84), training forward 0.88 (0.86), forward +
    // backward 0.92-0.96 (0.97); channels_last (32, 64, 32, 32) 0.72-0.84 (0.84), 0.68-0.87
    // (0.90), 0.98-0.99 (0.94); (2400, 1024) 0.85-0.93 (0.87), 0.89-0.91 (0.89), 0.98-1.00
    // (0.98); (300, 128) 0.84-0.86 (0.85), 0.87-0.89 (0.86), 0.97 (0.97). The same bits.
    // float32 outputs of kStreamFrom bytes or more, with those activations, in the same loops:
    // the same bits, stored a cache line at a time from the registers (see load_halves of
    // float). Raw eval calls taking turns with the stream_rows loop's, time / before, two
    // threads (one): (4096, 1024) 0.71-0.77 while a copy of it took 0.52-0.58 ms, 0.97-0.99
    // while it took 0.68-0.81 (0.78-0.95); channels_last (32, 128, 32, 32) 0.60-0.62, then
    // 0.99 (0.87-0.99); (4100, 1030) 0.65-0.79 (0.61-0.63); (42000, 100) 0.65-0.66 (0.53).
    // Training forward 0.89-1.00 (0.84-1.01), forward + backward with input_gradients' dx
    // 0.93-0.97 (0.93-1.01). NCHW planes in these loops (eval_planes) were level (0.96-1.04)
    // and stay in theirs.
    const bool lanes_loop =
        !std::is_same_v<T, float> || streams_out<T>(rows * channels) || activation == kSilu;
    if constexpr (kHalfLoops) {
      if (lanes_loop)
        return normalize_units(in.x, in.z, mutable_values<T>(out.y), rows, channels, channels,
                               false, in.centre.origin.data(), in.affine.scale.data(),
                               in.affine.shift.data(), activation, static_cast<float>(slope));
    }
    normalize(in, activation, static_cast<float>(slope), mutable_values<T>(out.y));
  });
  return out;
}

// Each channel's scale (invstd of the running variance, times the weight) and shift (the
// bias; with fold_mean, minus the running mean times the scale) in eval.
Affine eval_affine(const Tensor& weight, const Tensor& bias, const Running& running,
                   double eps, int64_t channels, bool fold_mean) {
  const float *rm = values_or_null(running.mean), *rv = values_or_null(running.var);
  std::vector<float> invstd(channels);
  for (int64_t c = 0; c < channels; ++c) invstd[c] = invstd_of(rv[c], eps);
  return Affine(channels, invstd.data(), values_or_null(weight), values_or_null(bias),
                fold_mean ? rm : nullptr);
}

// dst[i] = act((src[i] - mean) * scale + shift [+ add[i]]) for i < n: the values of a plane
// (an input T, an output O: T, or float32 for values still to activate). Flattened, as
// Rows::each_pre, for its loops in the functions that OpenMP outlines for torch's threads.
// kMemoryBound: act's memory_bound (with_activation), for a plane written to memory; its
// float32 loop then runs at 8 lanes (for_channels). Raw eval calls with a 64 MiB copy
// between them (the caches cold), ms, 512 -> 256-bit, one thread (two), ATen's in
// brackets: (32, 128, 32, 32) 1.61 -> 1.44 (0.93 -> 0.87) [1.47 (0.89)], (64, 256, 28, 28)
// 4.23 -> 3.90 (2.27 -> 2.15) [3.90 (2.06)], (8, 64, 56, 56) 0.67 -> 0.62 (0.41 -> 0.39)
// [0.66 (0.42)]; with ReLU 1-9 % faster; caches warm, 3-10 % faster where the input is over
// 1 MiB, level below.
template <bool kMemoryBound, typename T, typename O, typename Act>
[[gnu::flatten]] inline void normalize_plane(const T* __restrict src, const T* __restrict add,
                                             O* __restrict dst, int64_t n, float mean,
                                             float scale, float shift, Act act) {
  if (add) {
    for_channels<kMemoryBound, T>(n, [&](int64_t i) {
      dst[i] = store<O>(act((load(src[i]) - mean) * scale + shift + load(add[i])));
    });
  } else {
    for_channels<kMemoryBound, T>(n, [&](int64_t i) {
      dst[i] = store<O>(act((load(src[i]) - mean) * scale + shift));
    });
  }
}

// dst[i] = act(src[i]) for i < n (flattened: see normalize_plane).
template <typename T, typename Act>
[[gnu::flatten]] inline void activate_values(const float* __restrict src, T* __restrict dst,
                                             int64_t n, Act act) {
  for (int64_t i = 0; i < n; ++i) dst[i] = store<T>(act(src[i]));
}

// SiLU on planes of fewer values than this is applied to a block of planes at once, after
// their affine part: on one short plane its loop ran scalar, an exp a value ((8, 1152, 3, 3)
// with SiLU took 1.7x torch.nn's BN followed by its SiLU; 1.0x in blocks). ReLU and leaky
// ReLU (memory_bound: with_activation) stay in the plane's loop: in blocks, 3x3 to 7x7
// planes took 0.8-1.3x the time.
constexpr int64_t kShortPlane = 64;
// Values of a block of short planes: its float32 pre-activations, 16 KiB, stay in L1.
constexpr int64_t kBlockValues = 4096;

// Eval of an NCHW-contiguous input (planes of the values of one sample and channel) when no
// graph is recorded (inference): y = act((x - running mean) * invstd * weight + bias [+ z]),
// a plane at a time (SiLU on short planes: a block of planes at a time). ATen's eval
// streams as fast on large inputs and is slower on small ones (its call's overhead); it also
// folds the mean into the shift, x * alpha + beta, which loses digits where the mean is
// large against the spread.
Tensor eval_planes(const Tensor& x, const Tensor& weight, const Tensor& bias,
                   const Tensor& residual, const Running& running, double eps,
                   int64_t activation, double slope) {
  const int64_t channels = x.size(1), planes = x.size(0) * channels;
  const int64_t plane = planes ? x.numel() / planes : 0;
  Tensor y = at::empty_like(x);
  const float* rm = values_or_null(running.mean);
  const Affine affine = eval_affine(weight, bias, running, eps, channels, false);
  const float *scale = affine.scale.data(), *shift = affine.shift.data();
  with_storage(x, [&](auto element) {
    using T = decltype(element);
    const T* in = values_or_null<T>(x);
    const T* z = values_or_null<T>(residual);
    T* out = mutable_values<T>(y);
    // values [from, to) of planes [begin, end) normalized with act into dst, plane `begin`
    // first
    auto normalize_planes = [&](auto memory_bound, auto* dst, int64_t begin, int64_t end,
                                int64_t from, int64_t to, auto act) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % channels, first = p * plane + from;
        normalize_plane<decltype(memory_bound)::value>(in + first, z ? z + first : nullptr,
                                                       dst + (p - begin) * (to - from), to - from,
                                                       rm[c], scale[c], shift[c], act);
      }
    };
    with_activation(activation, static_cast<float>(slope), [&](auto act, auto, auto memory_bound) {
      if (memory_bound || plane >= kShortPlane) {
        for_rows(planes, plane, [&](int64_t begin, int64_t end) {
          write_rows(out, x.numel(), begin, end, plane,
                     [&](int64_t first, int64_t last, int64_t from, int64_t to, T* dst) {
                       normalize_planes(memory_bound, dst, first, last, from, to, act);
                     });
        });
        return;
      }
      const int64_t block = std::clamp<int64_t>(kBlockValues / plane, 1, planes);  // planes
      for_rows((planes + block - 1) / block, block * plane, [&](int64_t begin, int64_t end) {
        std::vector<float> pre(block * plane);
        for (int64_t b = begin; b < end; ++b) {
          const int64_t first = b * block, last = std::min(planes, first + block);
          normalize_planes(std::false_type{}, pre.data(), first, last, 0, plane,
                           [](float p) { return p; });
          activate_values(pre.data(), out + first * plane, (last - first) * plane, act);
        }
      });
    });
  });
  return y;
}

// Dense with the channels innermost: dimensions 1, d-1, ..., 2, 0 (innermost first) each of
// stride the product of the sizes before them in that order, dimensions of size 1 aside.
bool rows_layout(const Tensor& x) {
  int64_t expected = 1;
  auto next = [&](int64_t dim) {
    if (x.size(dim) == 1) return true;
    if (x.stride(dim) != expected) return false;
    expected *= x.size(dim);
    return true;
  };
  if (!next(1)) return false;
  for (int64_t dim = x.dim() - 1; dim >= 2; --dim)
    if (!next(dim)) return false;
  return next(0);
}

// NCHW-contiguous with planes of more than one value: the eval_planes layout.
bool planes_layout(const Tensor& x) {
  return x.dim() > 2 && x.is_contiguous() && x.numel() > x.size(0) * x.size(1);
}

// Training (and eval with a graph) of NCHW-contiguous inputs: x seen as (N, C, S), planes
// of S values, a channel's N planes C * S values apart. Channel by channel, on torch's
// threads from kParallelValues values on: a channel's statistics, then its planes
// normalized while they are still in the caches (the forward reads x from memory once); in
// the backward its sums, then its dx. The math is forward_rows' and input_gradients' (the
// same centre: the channel's first value, or the running mean in eval); a channel's sums
// are float64 sums of float32 sums of 8 planes' values (PlaneShape::channel_sums), in an
// order that does not depend on the thread count; the statistics take one pass around a
// sampled centre (kSampledFrom), or two, the mean and then the variance around it, the
// second over values still in the caches. Why: on small and medium inputs the Numba
// kernels' Python (a Python autograd node, a kernel call each way) cost as much as their
// loops. Module calls, two threads, µs, forward / forward + backward, the Numba kernels
// (forced) -> these in two passes [torch.nn's], 2026-12-06: float32 (8, 256, 12, 12) 149 /
// 522 -> 108 / 441 [349 / 666], (8, 64, 24, 24) 121 / 258 -> 98 / 208 [316 / 433], (8, 512,
// 7, 7) 145 / 329 -> 97 / 205 [245 / 361], (8, 1152, 3, 3) 160 / 423 -> 110 / 216 [146 /
// 258], (100, 32, 50) 131 / 316 -> 78 / 181 [205 / 325]; bfloat16 (8, 256, 12, 12) 144 /
// 309 -> 114 / 235 [115 / 252], (8, 512, 7, 7) 150 / 327 -> 107 / 222 [110 / 289]. Inputs
// over kPlanesUpTo values stay on the Numba kernels (see takes; but see planes_fused and
// planes_streamed), whose passes read memory in order: from 1.6 million values on, a
// channel's planes C * S values apart cost these loops more ((32, 64, 28, 28) forward 509
// -> 543 µs on two threads, 721 -> 1013 on one; bfloat16 336 -> 376).
constexpr int64_t kPlanesUpTo = 1 << 19;
// float16 (N, C) and channels_last inputs in training (or with a graph) run here at any
// size (takes). Until 2026-12-07 night those of over 2,097,152 values went to the Numba
// kernels unless their channels were whole lanes (a multiple of kLanes): rows of other
// widths had the channels past their last 16 summed on load(F16)'s integer conversion and
// a masked lane at the end of every row, and lost to the Numba kernels (channels_last (32,
// 24, 64, 64) at 0.52 and 0.59 of their speed). Now those channels are summed on masked
// lanes (add_lanes_to) and narrow rows run as one (kHalfRunsBelow): module calls, the Numba
// kernels' time / ours, two threads (one), training forward and forward + backward:
// channels_last (32, 24, 64, 64) 1.42 and 1.31 (1.31 and 1.27), (16, 200, 28, 28) 1.05 and
// 1.07 (0.94 and 0.98), (8192, 300) 1.50 and 1.17 (1.19 and 1.10), (4100, 1030) 1.76 and
// 1.23; forward + backward with ReLU (SiLU) 1.28 (1.50), 1.18 (1.33), 1.08 (1.36). Smaller
// ones, here before too: channels_last (8, 24, 64, 64) 1.70 and 1.40 (0.58 and 0.63
// before), (32, 8, 32, 32) 1.96 and 1.52 (0.48 and 0.57). Whole-lane widths past that size
// (here since 2026-12-07 evening; their outputs of kStreamFrom bytes or more non-temporal,
// streams_lanes), two threads: (8192, 1024) 1.20-1.30 and 1.13-1.22, channels_last (64,
// 256, 28, 28) 1.43-1.46 and 1.00-1.16.
// float16 NCHW inputs in training (or with a graph) run here (see kBufferedPlanes), up to
// kPlanesUpTo values in batches of at least kRowsAtOnce planes of at most this many values;
// others on ATen and the Numba kernels. Module calls taking turns, two threads, torch.nn's
// time / ours, training forward without autograd and forward + backward (2026-12-07,
// every output through float32 buffers): (8, 256, 12, 12) 1.17-1.20 and 1.01-1.04, (8,
// 512, 7, 7) 1.05 and 1.17, (16, 96, 10, 10) 1.21 and 1.12, (8, 256, 14, 14) 1.09-1.13 and
// 1.05-1.06, (32, 256, 7, 7) 0.99 and 1.43; forward + backward with a fused ReLU (torch.nn's
// BN and ReLU) 1.23-1.37, SiLU 1.07-1.19. Longer planes and smaller batches lost: (8, 128,
// 16, 16) 1.12 and 0.92, (8, 64, 24, 24) 1.16 and 0.91, (4, 256, 14, 14) 0.78 and 0.86; with
// the output and dx in AVX-512's loops, on two threads 1.17-1.24 and 0.92-1.02 (0.95-1.02
// on one, against the Numba kernels' 0.94-0.97 there: where the dispatch sends them), (4,
// 256, 14, 14) 0.99 and 0.99 (on one thread 0.89 and 0.95).
constexpr int64_t kFloat16PlanesUpTo = 196;
// ... except bfloat16 training with a fused ReLU or leaky ReLU and no residual, at any size:
// the node computes dL/d(pre-activation) again in each backward pass (ActivationGradient),
// where the Numba kernels' bfloat16 loops with the activation are bound by arithmetic.
// Module forward + backward through the dispatch, the Numba kernels' time / the node's,
// medians of interleaved calls, two threads (one), 2026-12-07: ReLU (32, 128, 32, 32) 1.25
// (1.10), (64, 256, 28, 28) 1.06 (1.02), (8, 64, 56, 56) 1.23 (1.21), (32, 64, 28, 28) 1.47
// (1.24); leaky ReLU 1.12 (1.04), 1.11 (1.13), 1.15 (1.14), 1.32 (1.15). Raw calls, not
// taken: float32 (one thread 0.81-1.14), a residual (0.51-1.14, most below 0.9: dL/dresidual
// is written out), plain BN (0.81-0.85 at bfloat16 (32, 128, 32, 32)), SiLU (0.92-0.99).
inline bool planes_fused(at::ScalarType dtype, int64_t activation, bool residual) {
  return dtype == at::kBFloat16 && (activation == kRelu || activation == kLeakyRelu) &&
         !residual;
}

// ... and float32 ones whose output and dx stream (streams_planes: 8 MiB or more, planes
// of whole cache lines), at any size but with SiLU or a residual that needs its gradient: a
// channel's planes, read for its statistics (or sums), are read again from L2 for its
// output (or dx), which non-temporal stores write without reading its lines first (plain
// stores read each line before they write it): the forward then reads x once and writes y
// once, a third less traffic, the dx pass a quarter less. Module calls taking turns,
// 2026-12-08, the Numba kernels' time / the node's, two threads (one): training forward
// (32, 128, 32, 32) 1.20 (1.03), (64, 256, 28, 28) 1.50 (1.17), (32, 256, 56, 56) 1.50
// (1.30), (8, 64, 16, 56, 56) 1.07 (1.07); forward + backward 1.30 (1.06), 1.43 (1.39),
// 1.33 (1.43), 1.21 (1.04); with a fused ReLU 1.10 (1.08), 1.19 (1.18) and, the 3-d one,
// 1.01 (0.95). Against the same loops with plain stores (raw calls, time / theirs):
// training forward 0.64-0.68 (0.63-0.67), forward + backward 0.83 (0.79-0.80) at (32, 128,
// 32, 32) and (64, 256, 28, 28); on 2026-12-06 they had lost to the Numba kernels on one
// thread (see performance.md). Not taken, raw calls, the Numba kernels' time / the node's:
// SiLU, forward + backward 0.81-0.85; a residual whose gradient is asked for, written out
// with dL/d(pre-activation) (ReLU 0.85-0.90, one thread 0.81; plain BN, its
// dL/dresidual a copy of dy, 0.94-1.08); planes that are not whole lines, (128, 1024, 7, 7)
// 0.79-0.94 (plain stores); bfloat16 0.87-1.12 (plain stores too).
inline bool planes_streamed(at::ScalarType dtype, int64_t values, int64_t size,
                            int64_t activation, bool residual_gradient) {
  return dtype == at::kFloat && activation != kSilu && !residual_gradient &&
         streams_planes<float>(values, size);
}

// Channels of at least this many values take their statistics in one pass around a
// sampled centre (forward_planes); smaller ones, in L1, in two passes, which cost less than
// the sampling: (8, 1152, 3, 3), 72 values a channel, module forward 110 µs on two threads
// in two passes, 140 with the sampling; (8, 64, 28, 28) 121 -> 88 µs the other way (raw).
constexpr int64_t kSampledFrom = 1024;

// Σ values, in kPartialSums interleaved float64 sums (one chain of additions, each waiting
// on the last, took 4 cycles a value: most of a small forward's time).
constexpr int64_t kPartialSums = 8;
inline double sum_of(const double* values, int64_t n) {
  double partial[kPartialSums] = {};
  int64_t i = 0;
  for (; i + kPartialSums <= n; i += kPartialSums)
    for (int64_t k = 0; k < kPartialSums; ++k) partial[k] += values[i + k];
  for (int64_t k = 0; i < n; ++i, ++k) partial[k] += values[i];
  double sum = 0.0;
  for (double p : partial) sum += p;
  return sum;
}

// An NCHW input's shape as planes.
struct PlaneShape {
  int64_t batch, channels, size;

  explicit PlaneShape(const Tensor& x)
      : batch(x.size(0)), channels(x.size(1)), size(x.numel() / (x.size(0) * x.size(1))) {}

  // The index of the first value of plane (n, c).
  int64_t start(int64_t n, int64_t c) const { return (n * channels + c) * size; }

  // Channel c's mean over kCentreSamples of its values, as sampled_centre's of rows (its
  // strata and offsets over the channel's values in their order: plane by plane); `fallback`
  // where that mean is not finite.
  template <typename T>
  float sampled_centre(const T* x, int64_t c, float fallback) const {
    const int64_t count = batch * size, samples = std::min(count, kCentreSamples);
    float sum = 0.0f;
    for (int64_t k = 0; k < samples; ++k) {
      const int64_t t = sample_position(k, samples, count);
      sum += load(x[start(t / size, c) + t % size]);
    }
    const float mean = sum / samples;
    return std::isfinite(mean) ? mean : fallback;
  }

  // {Σ term(i)[0], Σ term(i)[1]} over the values i of channel c (term returns
  // std::array<float, 2>): its planes summed as column_sums sums rows (add_rows_to), into
  // float64 sums of each position of a plane (in `scratch`, reused from channel to
  // channel), which are then summed.
  template <typename Term>
  std::array<double, 2> channel_sums(int64_t c, const Term& term,
                                     std::vector<double>& scratch) const {
    scratch.assign(2 * size, 0.0);
    double *first_sums = scratch.data(), *second_sums = first_sums + size;
    const int64_t stride = channels * size, base = c * size;
    const auto local_term = [term, stride, base](int64_t n, int64_t s) {
      return term(base + n * stride + s);
    };
    int64_t n = 0;
    auto add_planes = [&](auto count) {  // `count` planes from plane n on
      add_rows_to(local_term, n, count, size, first_sums, second_sums);
      n += decltype(count)::value;
    };
    while (n + kRowsAtOnce <= batch) add_planes(std::integral_constant<int64_t, kRowsAtOnce>{});
    // the last planes 4, 2 and 1 at a time: a plane at a time, a batch of 4 had each term
    // added to the float64 sums in memory, and took longer than the Numba kernels
    if (n + 4 <= batch) add_planes(std::integral_constant<int64_t, 4>{});
    if (n + 2 <= batch) add_planes(std::integral_constant<int64_t, 2>{});
    if (n < batch) add_planes(std::integral_constant<int64_t, 1>{});
    return {sum_of(first_sums, size), sum_of(second_sums, size)};
  }
};

// What the backward's passes over planes read, as Rows (its members of the same names).
template <typename T>
struct Planes : PlaneShape {
  const T* x;
  const T* z;
  Centre centre;
  Affine affine;

  Planes(const Tensor& x, const T* z, const float* saved, bool training, const float* invstd,
         const float* weight, const float* bias)
      : PlaneShape(x), x(values_or_null<T>(x)), z(z),
        centre(centre_of(this->x, size, saved, channels, training)),
        affine(channels, invstd, weight, bias, centre.offset.data()) {}
};

// values[i] = act(values[i]) for i < n (flattened: see normalize_plane).
template <typename Act>
[[gnu::flatten]] inline void activate_in_place(float* __restrict values, int64_t n, Act act) {
  for (int64_t i = 0; i < n; ++i) values[i] = act(values[i]);
}

template <typename T>
void halves_to_floats(const T* src, float* __restrict dst, int64_t n);
template <typename T>
void floats_to_halves(const float* __restrict src, T* dst, int64_t n);
template <typename T>
void normalize_channel_halves(const PlaneShape& shape, int64_t c, const T* x, const T* z, T* y,
                              float origin, float scale, float shift, int64_t activation,
                              float slope);

// Whether the statistics and sums of NCHW planes of element type T read a float32 copy of
// each channel (ChannelBuffers): float16, which F16C converts (kHalfLoops); load(F16)'s
// integer conversions, in every pass over the planes, made a float16 (8, 256, 12, 12)
// training step take 1.55x ATen's time. The output, and a training dx from given values
// (dy, or dpre), are computed from the planes themselves in AVX-512's loops
// (normalize_channel_halves, dx_halves); SiLU's output and the other dx into float32 and
// converted back (raw calls, two threads, time / that way for every output: training
// forward 0.93, 0.86, 0.95 and forward + backward 0.94, 0.89, 0.96 at (8, 256, 12, 12),
// (8, 64, 24, 24) and (8, 512, 7, 7), the same bits).
template <typename T>
constexpr bool kBufferedPlanes = kHalfLoops && std::is_same_v<T, F16>;

// A channel's planes as one float32 array, its batch planes one after another, which the
// loops then read as a one-channel input of the same planes (shape: the input's, with one
// channel): gathered from an input, or scattered back to an output, converted with F16C
// (float16, rounded to nearest even: torch's .to()) or copied (float32).
struct ChannelBuffers {
  PlaneShape input, shape;

  explicit ChannelBuffers(const PlaneShape& planes) : input(planes), shape(planes) {
    shape.channels = 1;
  }
  template <typename T>
  void gather(const T* x, int64_t c, float* dst) const {
    for (int64_t n = 0; n < shape.batch; ++n) {
      const T* plane = x + input.start(n, c);
      if constexpr (std::is_same_v<T, float>)
        std::memcpy(dst + shape.start(n, 0), plane, shape.size * sizeof(float));
      else
        halves_to_floats(plane, dst + shape.start(n, 0), shape.size);
    }
  }
  template <typename T>
  void scatter(const float* src, int64_t c, T* y) const {
    for (int64_t n = 0; n < shape.batch; ++n)
      floats_to_halves(src + shape.start(n, 0), y + input.start(n, c), shape.size);
  }
};

// The forward of NCHW inputs (see above), as forward_rows'. float16's statistics from a
// float32 copy of each channel (kBufferedPlanes): the same float32 operations on the same
// values as load(F16)'s loops would do.
Normalized forward_planes(const Tensor& x, const Tensor& weight, const Tensor& bias,
                          const Tensor& residual, Running& running, bool training,
                          double momentum, double eps, int64_t activation, double slope) {
  const PlaneShape shape(x);
  const int64_t channels = shape.channels, size = shape.size, count = shape.batch * size;
  const auto floats = x.options().dtype(at::kFloat);
  Normalized out{at::empty_like(x), at::empty({channels}, floats), at::empty({channels}, floats)};
  float *inv = out.invstd.data_ptr<float>(), *off = out.offset.data_ptr<float>();
  const float *rm = values_or_null(running.mean), *rv = values_or_null(running.var);
  const float *w = values_or_null(weight), *b = values_or_null(bias);
  std::vector<double> mean(channels), var(channels);
  with_storage(x, [&](auto element) {
    using T = decltype(element);
    const T *xs = values_or_null<T>(x), *z = values_or_null<T>(residual);
    T* y = mutable_values<T>(out.y);
    const Centre centre = centre_of(xs, size, training ? nullptr : rm, channels, training);
    with_activation(activation, static_cast<float>(slope), [&](auto act, auto, auto memory_bound) {
      // SiLU on short planes: a channel's pre-activations into a buffer, activated there in
      // one loop (see kShortPlane), then rounded into its planes
      const bool buffered = !memory_bound && size < kShortPlane;
      const bool stream = streams_planes(y, out.y.numel(), size);
      for_rows(channels, count, [&](int64_t begin, int64_t end) {
        std::vector<float> pre(buffered ? count : 0);
        std::vector<double> scratch;
        // channel c's statistics (in training; else the running ones), its values `in`
        // channel `k` of planes `view` (the input's, or a ChannelBuffers' of one channel):
        // the scale and shift of its pre-activations (x - origin) * scale + shift
        auto statistics = [&](int64_t c, const PlaneShape& view, int64_t k, const auto* in) {
          const float origin = centre.origin[c];
          float offset = 0.0f;
          if (training) {
            // a channel of kSampledFrom values or more: one pass around a sampled centre
            // where it lies near the mean (see batch_statistics); else the mean, then the
            // variance around it (a second pass, over values still in the caches)
            auto moments = [&](float centre_c) {
              const auto [d, d2] = view.channel_sums(k, [=](int64_t i) {
                const float v = load(in[i]) - centre_c;
                return std::array<float, 2>{v, v * v};
              }, scratch);
              std::tie(mean[c], var[c]) = moments_about(centre_c, d, d2, count);
            };
            bool near = false;
            if (count >= kSampledFrom) {
              const float sampled = view.sampled_centre(in, k, origin);
              moments(sampled);
              near = near_centre(mean[c], sampled, var[c]);
            }
            if (!near) {
              const double sum = view.channel_sums(k, [=](int64_t i) {
                return std::array<float, 2>{load(in[i]) - origin, 0.0f};
              }, scratch)[0];
              const double direct = origin + sum / count;
              moments(static_cast<float>(direct));
              mean[c] = direct;  // inf where x has one (around inf, moments' mean is NaN)
            }
            offset = off[c] = static_cast<float>(mean[c] - origin);
            inv[c] = invstd_of(var[c], eps);
          } else {  // a copy of the running mean: backward needs it as it is now
            off[c] = rm[c];
            inv[c] = invstd_of(rv[c], eps);
          }
          return Affine::of(c, inv[c], w, b, offset);
        };
        // channel c (as statistics' `in`, and `add` alike) normalized into `to` (alike)
        auto normalize_channel = [&](int64_t c, const PlaneShape& view, int64_t k,
                                     const auto* in, const auto* add, auto* to) {
          using O = std::remove_pointer_t<decltype(to)>;
          const float origin = centre.origin[c];
          const auto [scale, shift] = statistics(c, view, k, in);
          for (int64_t n = 0; n < view.batch; ++n) {
            const int64_t first = view.start(n, k);
            const auto* added = add ? add + first : nullptr;
            if (buffered) {
              normalize_plane<false>(in + first, added, pre.data() + n * size, size, origin,
                                     scale, shift, [](float p) { return p; });
              continue;
            }
            write_plane(to + first, size, stream, [&](int64_t from, int64_t upto, O* dst) {
              normalize_plane<decltype(memory_bound)::value>(
                  in + first + from, added ? added + from : nullptr, dst, upto - from, origin,
                  scale, shift, act);
            });
          }
          if (!buffered) return;
          activate_in_place(pre.data(), count, act);
          for (int64_t n = 0; n < view.batch; ++n) {
            O* dst = to + view.start(n, k);
            for (int64_t i = 0; i < size; ++i) dst[i] = store<O>(pre[n * size + i]);
          }
        };
        // channel c's statistics (as statistics' `in`), its output from the planes
        // themselves in AVX-512's loops (half precision: normalize_channel_halves)
        auto normalize_channel_in_halves = [&](int64_t c, const PlaneShape& view, int64_t k,
                                               const auto* in) {
          const auto [scale, shift] = statistics(c, view, k, in);
          normalize_channel_halves(shape, c, xs, z, y, centre.origin[c], scale, shift,
                                   activation, static_cast<float>(slope));
        };
        if constexpr (kBufferedPlanes<T>) {
          // the statistics from a float32 copy of the channel; the output in AVX-512's loops
          // from x, or (SiLU) from the copy into float32, then converted
          const ChannelBuffers buffers(shape);
          const bool halves = memory_bound;
          std::vector<float> values(count), added(z && !halves ? count : 0),
              results(halves ? 0 : count);
          for (int64_t c = begin; c < end; ++c) {
            buffers.gather(xs, c, values.data());
            if (halves) {
              normalize_channel_in_halves(c, buffers.shape, 0, values.data());
              continue;
            }
            if (z) buffers.gather(z, c, added.data());
            normalize_channel(c, buffers.shape, 0, values.data(), z ? added.data() : nullptr,
                              results.data());
            buffers.scatter(results.data(), c, y);
          }
        } else {
          for (int64_t c = begin; c < end; ++c) {
            // bfloat16 with a memory-bound activation: the output in AVX-512's loops (the
            // same bits as normalize_plane's; its rounding vcvtneps2bf16, see narrow_bf16).
            // Raw training forwards taking turns with normalize_plane's, time / its, two
            // threads (one), 2026-12-08: (8, 128, 16, 16) 0.89 (0.91), (8, 256, 12, 12)
            // 0.93 (0.90), (8, 512, 7, 7) 0.96 (0.96), (16, 64, 28, 28) 0.88 (0.89), (32,
            // 128, 32, 32) 0.88 (0.96); forward + backward with a fused ReLU (planes_fused)
            // (32, 128, 32, 32) 0.97 (1.04), (8, 64, 56, 56) 1.01 (0.98).
            if constexpr (kHalfLoops && std::is_same_v<T, BF16> &&
                          decltype(memory_bound)::value) {
              normalize_channel_in_halves(c, shape, c, xs);
            } else {
              normalize_channel(c, shape, c, xs, z, y);
            }
          }
        }
        if (stream) fence_streams();
      });
    });
  });
  if (training && running.mean.defined())
    update_running(running.mean, running.var, mean.data(), var.data(), count, channels,
                   momentum);
  return out;
}

// A Gradient's arrays for channel c of planes as ChannelBuffers' (see input_gradients'
// float16 planes): gathered into `values` (and `added`, a residual's), float32.
template <typename G>
GivenGradient<float> channel_gradient(const GivenGradient<G>& gradient,
                                      const ChannelBuffers& buffers, int64_t c, float* values,
                                      float*) {
  buffers.gather(gradient.g, c, values);
  return {values};
}
template <typename T, bool kResidual, typename Derivative>
ActivationGradient<float, kResidual, Derivative> channel_gradient(
    const ActivationGradient<T, kResidual, Derivative>& gradient, const ChannelBuffers& buffers,
    int64_t c, float* values, float* added) {
  buffers.gather(gradient.dy, c, values);
  if constexpr (kResidual) buffers.gather(gradient.z, c, added);
  return {values, kResidual ? added : nullptr, gradient.scale, gradient.shift,
          gradient.derivative};
}

// The input gradients of NCHW inputs, as input_gradients' of rows, channel by channel: its
// sums, then its dx. float16's sums from float32 copies of each channel, as forward_planes'
// statistics.
template <bool kMemoryBound, typename T, typename Gradient>
void input_gradients(const Planes<T>& in, const Gradient& gradient, const float* invstd,
                     const float* weight, bool training, T* dx, float* dweight, float* dbias) {
  const int64_t count = in.batch * in.size;
  const bool stream = dx && streams_planes(dx, in.batch * in.channels * in.size, in.size);
  for_rows(in.channels, count, [&](int64_t begin, int64_t end) {
    const Gradient local(gradient);  // a local copy: see Rows::each_pre's
    std::vector<double> scratch;
    // channel c, whose values xs and g read as channel k of planes `view` (the input's, or
    // a ChannelBuffers' of one channel): its constants, and its dx into `out` (alike; none
    // where null)
    auto channel_gradients_of = [&](int64_t c, const PlaneShape& view, int64_t k,
                                    const auto* __restrict xs, const auto& g, auto* out) {
      using O = std::remove_pointer_t<decltype(out)>;
      const float origin = in.centre.origin[c], offset = in.centre.offset[c];
      std::array<double, 2> sums{0.0, 0.0};
      if (training || dweight || dbias)
        sums = view.channel_sums(k, [=](int64_t i) {
          const float d = load(xs[i]) - origin, gi = g(i, c, d);
          return std::array<float, 2>{gi, gi * (d - offset)};
        }, scratch);
      const ChannelGradients kc = channel_gradients(c, sums, invstd[c], weight, offset, count,
                                                    training, dweight, dbias);
      if (!out) return kc;
      for (int64_t n = 0; n < view.batch; ++n) {
        const int64_t start = view.start(n, k);
        // values [from, to) of plane n's dx into `plane`
        auto dx_values = [&](int64_t from, int64_t to, O* __restrict plane) {
          const int64_t first = start + from;
          if (!training) {  // x enters through the activation only (see input_gradients)
            for_channels<kMemoryBound, O>(to - from, [&](int64_t j) {
              plane[j] = store<O>(kc.k * g(first + j, c, load(xs[first + j]) - origin));
            });
            return;
          }
          for_channels<kMemoryBound, O>(to - from, [&](int64_t j) {
            const float d = load(xs[first + j]) - origin;
            plane[j] = store<O>(dx_of(kc.k, kc.a, kc.b, g(first + j, c, d), d));
          });
        };
        write_plane(out + start, view.size, stream, dx_values);
      }
      return kc;
    };
    // half precision: a training dx from given values (dy, or dpre) in AVX-512's loop
    // (dx_halves), from the planes themselves, with channel c's constants kc. bfloat16 as
    // float16 (the same bits as the generic loop's): raw forward + backward, two threads
    // (one), time / the generic loop's, (8, 256, 12, 12) 0.93 (0.92-0.93), (8, 64, 24, 24)
    // 0.94-0.95 (0.91-0.94), (32, 64, 16, 16) 0.94-0.95; with SiLU 0.95-0.99.
    constexpr bool kHalvesDx = kHalfLoops && !std::is_same_v<T, float> && given_values<Gradient>;
    const bool halves = kHalvesDx && dx && training;
    auto dx_in_halves = [&](int64_t c, const ChannelGradients& kc) {
      if constexpr (kHalvesDx) {
        const float origin = in.centre.origin[c];
        for (int64_t n = 0; n < in.batch; ++n) {
          const int64_t first = in.start(n, c);
          dx_halves<true, false>(local, in.x, first, c, dx + first, in.size, &origin, &kc.k,
                                 &kc.a, &kc.b);
        }
      }
    };
    if constexpr (kBufferedPlanes<T>) {
      // the sums from float32 copies of the channel; the other dx into float32, converted
      const ChannelBuffers buffers(in);
      std::vector<float> values(count), g_values(count), added(in.z ? count : 0),
          results(dx && !halves ? count : 0);
      for (int64_t c = begin; c < end; ++c) {
        buffers.gather(in.x, c, values.data());
        const auto g = channel_gradient(local, buffers, c, g_values.data(), added.data());
        if (halves) {
          dx_in_halves(c, channel_gradients_of(c, buffers.shape, 0, values.data(), g,
                                               static_cast<float*>(nullptr)));
          continue;
        }
        channel_gradients_of(c, buffers.shape, 0, values.data(), g,
                             dx ? results.data() : nullptr);
        if (dx) buffers.scatter(results.data(), c, dx);
      }
    } else {
      for (int64_t c = begin; c < end; ++c) {
        if (halves)
          dx_in_halves(c, channel_gradients_of(c, in, c, in.x, local, static_cast<T*>(nullptr)));
        else
          channel_gradients_of(c, in, c, in.x, local, dx);
      }
    }
    if (stream) fence_streams();
  });
}

// out[i] = derivative(dy[i], pre[i]) for i < n (flattened: see normalize_plane).
template <typename T, typename Derivative>
[[gnu::flatten]] inline void derivative_values(const T* __restrict dy, const float* __restrict pre,
                                               float* __restrict out, int64_t n,
                                               Derivative derivative) {
  for (int64_t i = 0; i < n; ++i) out[i] = derivative(load(dy[i]), pre[i]);
}

// dpre = dL/d(pre-activation) of NCHW inputs (derivative: with_activation's), in float32,
// from dy and the pre-activation recomputed from x (and z), channel by channel;
// SiLU's on planes shorter than kShortPlane in blocks of planes in memory order instead,
// their pre-activations first (as eval_planes'): on one short plane its loop ran scalar,
// (8, 1152, 3, 3) module forward + backward 528 -> 478 µs, (8, 480, 6, 6) 516 -> 444 (one
// thread; torch.nn's BN and F.silu 518-553 and 646-676).
template <bool kMemoryBound, typename T, typename Derivative>
void pre_gradient(const Planes<T>& in, const T* dy, Derivative derivative, float* dpre) {
  const float *scale = in.affine.scale.data(), *shift = in.affine.shift.data();
  const int64_t size = in.size, planes = in.batch * in.channels;
  if (!kMemoryBound && size < kShortPlane) {
    const int64_t block = std::clamp<int64_t>(kBlockValues / size, 1, planes);  // planes
    for_rows((planes + block - 1) / block, block * size, [&](int64_t begin, int64_t end) {
      std::vector<float> pre(block * size);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t first = b * block, last = std::min(planes, first + block);
        for (int64_t p = first; p < last; ++p) {
          const int64_t c = p % in.channels;
          normalize_plane<false>(in.x + p * size, in.z ? in.z + p * size : nullptr,
                                 pre.data() + (p - first) * size, size, in.centre.origin[c],
                                 scale[c], shift[c], [](float v) { return v; });
        }
        derivative_values(dy + first * size, pre.data(), dpre + first * size,
                          (last - first) * size, derivative);
      }
    });
    return;
  }
  auto write = [&](const auto& gradient) {
    for_rows(in.channels, in.batch * in.size, [&](int64_t begin, int64_t end) {
      const auto g(gradient);  // a local copy: see Rows::each_pre's
      const T* __restrict xs = in.x;
      float* __restrict out = dpre;
      for (int64_t c = begin; c < end; ++c) {
        const float origin = in.centre.origin[c];
        for (int64_t n = 0; n < in.batch; ++n) {
          const int64_t first = in.start(n, c);
          for_channels<kMemoryBound, T>(in.size, [&](int64_t j) {
            out[first + j] = g(first + j, c, load(xs[first + j]) - origin);
          });
        }
      }
    });
  };
  if (in.z) return write(ActivationGradient<T, true, Derivative>{dy, in.z, scale, shift,
                                                                  derivative});
  write(ActivationGradient<T, false, Derivative>{dy, nullptr, scale, shift, derivative});
}

// Float16 and bfloat16 inputs in inference (eval without a graph; float32 parameters and
// statistics, as under torch.autocast), on CPUs with AVX-512 (F, BW, VL): y = act((x -
// running mean) * invstd * weight + bias [+ z]) in float32 (the mean folded into the shift:
// eval_halves), rounded to nearest, ties to even (as torch's .to()); and the half-precision
// training forward and dx of rows (normalize_units from forward_rows, dx_halves from
// input_gradients). GCC 12 converts _Float16 one value at a time, and exact integer
// conversions cost 15-20 vector instructions per 16 values (both slower than ATen's float16
// loops: docs/performance.md, "Tried and left out"), so these loops are written in
// AVX-512's instructions, 16 values at a time (float16: one conversion each way; bfloat16: a
// shift, and narrow_bf16's rounding): each value stays in a register from its load to its
// store, SiLU's too (until 2026-12-07 afternoon SiLU converted blocks of 256 values to
// float32 in L1 for GCC's vectorized loop, and normalized and converted them back; see
// one_plus_exp for what the registers gained). Raw float16 eval calls, µs, one thread,
// ATen's time -> ours (blocks for every activation at 8 lanes -> registers at 8 -> at 16,
// before the fold): (8, 256, 12, 12) 31.3 -> 52.5, 39.0, 29.4; (32, 64, 28, 28) 146 ->
// 277, 139, 146; channels_last (8, 128, 24, 24) 76 -> 121, 73, 83
// (the runs' ATen times varied by 10 %). bfloat16, the loops of eval_planes and
// forward_rows -> these, µs, one thread: (100, 128) 4.5 -> 3.5, (512, 256) 23.8 -> 18.0,
// (8, 256, 12, 12) 50.7 -> 42.0, (8, 512, 7, 7) 48.3 -> 42.0, (32, 64, 28, 28) 232 -> 213,
// channels_last (8, 128, 24, 24) 94 -> 74 and (32, 128, 32, 32) 710 -> 584, (4096, 1024)
// 622 -> 599. Elsewhere (no AVX-512) float16 stays on ATen and the Numba kernels, and
// bfloat16 on those loops. The same loops write the output and training dx of float32 rows
// of kStreamFrom bytes or more (see load_halves of float).
#if BATCHNORM_HALF_LOOPS
// Lanes of float32 converted from and to float16 and bfloat16 (the stores 256-bit wide: see
// for_channels). Each load and store also takes a Mask of the first lanes (first_lanes(n),
// n <= kLanes), for the last values of a row or plane.
using Mask = __mmask16;
inline Mask first_lanes(int64_t n) { return static_cast<Mask>((1u << n) - 1); }
inline Lanes load_halves(const F16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Lanes load_halves(const F16* p, Mask m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline __m256i narrow_f16(Lanes v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
inline void store_halves(F16* p, Lanes v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_f16(v));
}
inline void store_halves(F16* p, Lanes v, Mask m) { _mm256_mask_storeu_epi16(p, m, narrow_f16(v)); }
inline void stream_halves(F16* p, Lanes v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow_f16(v));
}
// bfloat16: the upper half of a float32 (see narrow_bf16 for the way back)
inline Lanes widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline Lanes load_halves(const BF16* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Lanes load_halves(const BF16* p, Mask m) {
  return widen_bf16(_mm256_maskz_loadu_epi16(m, p));
}
// v rounded to bfloat16 as store<BF16> rounds, in integer instructions ...
inline __m256i narrow_bf16_exactly(Lanes v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lowest = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lowest), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}
// ... and where the CPU has AVX512_BF16, by its conversion, vcvtneps2bf16, whose bits are
// those (NaN included) but for subnormal values, which it flushes to zero and torch's
// rounding does not: a vector with one (fpclass: the subnormal lanes) takes the integer
// rounding. Raw bfloat16 eval calls taking turns, time / before, one thread (two): (4096,
// 1024) 0.74-0.76 (0.78-0.80), channels_last (32, 128, 32, 32) 0.74 (0.75), (512, 1024)
// 0.75 (0.78), (100, 128) 0.90 (0.91); the training forward of rows: see forward_rows.
constexpr int kSubnormalClass = 0x20;
inline __m256i narrow_bf16(Lanes v) {
#ifdef __AVX512BF16__
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, kSubnormalClass) == 0, 1))
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#endif
  return narrow_bf16_exactly(v);
}
inline void store_halves(BF16* p, Lanes v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(v));
}
inline void store_halves(BF16* p, Lanes v, Mask m) {
  _mm256_mask_storeu_epi16(p, m, narrow_bf16(v));
}
inline void stream_halves(BF16* p, Lanes v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(v));
}
// float32 lanes: constants, and values stored with plain stores (read again soon: kept in the
// caches)
inline Lanes lanes_at(const float* p) { return _mm512_loadu_ps(p); }
inline Lanes lanes_at(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
inline void store_lanes(float* p, Lanes v) { _mm512_storeu_ps(p, v); }
inline void store_lanes(float* p, Lanes v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
// and as the loops' values: the float32 rows of kStreamFrom bytes or more (their output in
// forward_rows, their training dx in input_gradients; see forward_rows for what streaming
// them from the registers gained over stream_rows' blocks through L1), a float32 dy or
// dpre, and SiLU's float32 output under kStreamFrom
inline Lanes load_halves(const float* p) { return lanes_at(p); }
inline Lanes load_halves(const float* p, Mask m) { return lanes_at(p, m); }
inline void store_halves(float* p, Lanes v) { store_lanes(p, v); }
inline void store_halves(float* p, Lanes v, Mask m) { store_lanes(p, v, m); }
inline void stream_halves(float* p, Lanes v) { _mm512_stream_ps(p, v); }
// Stores the lanes v (the first ones: mask) at p as T: kStream (streams_lanes), with a
// non-temporal store where all the lanes are stored (a whole cache line of float32, which
// for_lanes aligns p to; half of one of float16 or bfloat16, whose units streams_lanes
// starts on 32-byte boundaries: the line's other half follows in the next store), else a
// plain one.
template <bool kStream, typename T, typename... M>
inline void store_out(T* p, Lanes v, M... mask) {
  if constexpr (kStream && sizeof...(M) == 0) stream_halves(p, v);
  else store_halves(p, v, mask...);
}
inline Lanes lanes_of(float v) { return _mm512_set1_ps(v); }
inline Lanes fma_lanes(Lanes a, Lanes b, Lanes c) { return _mm512_fmadd_ps(a, b, c); }
inline Lanes add_lanes(Lanes a, Lanes b) { return _mm512_add_ps(a, b); }
inline Lanes sub_lanes(Lanes a, Lanes b) { return _mm512_sub_ps(a, b); }
inline Lanes mul_lanes(Lanes a, Lanes b) { return _mm512_mul_ps(a, b); }
// below where p < 0 (not where it is NaN), elsewhere p
inline Lanes below_zero(Lanes p, Lanes below) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_LT_OQ), p, below);
}

// with_activation's activations on lanes: the same values (ReLU and leaky ReLU: where p <
// 0, 0 or p * slope; elsewhere, NaN included, p).
template <int64_t kCode>
inline Lanes activate_lanes(Lanes p, Lanes slope) {
  if constexpr (kCode == kIdentity)
    return p;
  else if constexpr (kCode == kSilu)
    return silu_of(p);
  else
    return below_zero(p, kCode == kRelu ? lanes_of(0.0f) : mul_lanes(p, slope));
}

// Calls lanes(i) for the values [i, i + kLanes) of [0, n), and lanes(i, mask) for fewer (a
// Mask of the first ones): for a float32 dst (non-temporal stores of whole cache lines), first
// those up to dst's next 64-byte boundary, so that every full kLanes after them fills a line.
// (A float16 or bfloat16 dst that store_out streams to starts on a 32-byte boundary, and n
// is whole lanes: see streams_lanes.)
template <typename T, typename F>
[[gnu::always_inline]] inline void for_lanes(const T* dst, int64_t n, F&& lanes) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    const auto misaligned = reinterpret_cast<std::uintptr_t>(dst) % 64;
    i = std::min<int64_t>(n, misaligned ? (64 - misaligned) / sizeof(float) : 0);
    if (i) lanes(int64_t{0}, first_lanes(i));
  }
  for (; i + kLanes <= n; i += kLanes) lanes(i);
  if (i < n) lanes(i, first_lanes(n - i));
}

// Calls out(i, p) with the pre-activations p = fma(src[i] [- origin[i]], scale[i],
// shift[i]) [+ add[i]] of the values [i, i + kLanes) of [0, n), and out(i, p, mask) for
// fewer (for_lanes, its stores aligned to `dst`'s cache lines); kPlane: one channel's values
// (origin, scale and shift point to its constants). kCentred: with the origin, Rows::each_pre's
// very bits (the training forward, the backward's dpre); without (origin unread), its values
// with the origin folded into the shift (eval_halves). (A test of origin in the loop made
// float16 eval 1-7 % slower.) period (not kPlane): where not 0, the constants are
// PeriodicTables' of that period.
template <bool kPlane, bool kCentred, typename T, typename D, typename Out>
[[gnu::always_inline]] inline void each_pre_lanes(const T* src, const T* add, const D* dst,
                                                  int64_t n, const float* origin,
                                                  const float* scale, const float* shift,
                                                  int64_t period, Out&& out) {
  with_positions(period, [&](auto constants_at) {
    auto lanes = [&](int64_t i, auto... mask) {
      Lanes v = load_halves(src + i, mask...);
      Lanes p;
      if constexpr (kPlane) {
        if constexpr (kCentred) v = sub_lanes(v, lanes_of(*origin));
        p = fma_lanes(v, lanes_of(*scale), lanes_of(*shift));
      } else {
        const int64_t c = constants_at(i);
        if constexpr (kCentred) v = sub_lanes(v, lanes_at(origin + c, mask...));
        p = fma_lanes(v, lanes_at(scale + c, mask...), lanes_at(shift + c, mask...));
      }
      if (add) p = add_lanes(p, load_halves(add + i, mask...));
      out(i, p, mask...);
    };
    for_lanes(dst, n, lanes);
  });
}

// dst[i] = act(pre-activation) for i < n (each_pre_lanes' values), act kCode's, stored by
// store_out<kStream>.
template <int64_t kCode, bool kPlane, bool kCentred, bool kStream = false, typename T>
void normalize_halves(const T* src, const T* add, T* dst, int64_t n, const float* origin,
                      const float* scale, const float* shift, float slope,
                      int64_t period = 0) {
  const Lanes slopes = lanes_of(slope);
  each_pre_lanes<kPlane, kCentred>(
      src, add, dst, n, origin, scale, shift, period, [&](int64_t i, Lanes p, auto... mask) {
        store_out<kStream>(dst + i, activate_lanes<kCode>(p, slopes), mask...);
      });
}

// dx[i] = k[i] (g[i] - a[i] - (x[i] - origin[i]) b[i]) for i < n, kLanes values at a time:
// input_gradients' training dx of a row's values (dx_of's very bits: GCC contracts its
// g - a - d b to a fused negative multiply-add), its loads and stores F16C's or
// narrow_bf16's; kPlane: of a plane's values, every one of them taking its channel's
// constants (*origin, *k, *a, *b). Raw forward + backward, time / the generic loop's,
// bfloat16, one thread (two): (4096, 1024) 0.99-1.00 (0.97-0.99), channels_last (32, 128,
// 32, 32) 0.97-0.98 (0.97-0.99), (512, 256) 0.95 (0.96-0.97); float16's generic loop rounds
// in 16 integer operations per 16 values (store<F16>), F16C in one. Stored by
// store_out<kStream>.
template <bool kPlane, bool kStream, typename T, typename GradientAt>
void dx_lanes(const T* x, const GradientAt& g_at, T* dx, int64_t n, const float* origin,
              const float* k, const float* a, const float* b, int64_t period) {
  with_positions(period, [&](auto constants_at) {
    auto lanes = [&](int64_t i, auto... mask) {
      const int64_t c = kPlane ? 0 : constants_at(i);
      auto constant = [&](const float* values) {
        if constexpr (kPlane) return lanes_of(*values);
        else return lanes_at(values + c, mask...);
      };
      const Lanes d = sub_lanes(load_halves(x + i, mask...), constant(origin));
      const Lanes t = sub_lanes(g_at(i, c, d, mask...), constant(a));
      const Lanes u = _mm512_fnmadd_ps(d, constant(b), t);
      store_out<kStream>(dx + i, mul_lanes(constant(k), u), mask...);
    };
    for_lanes(dx, n, lanes);
  });
}
// input_gradients' g on lanes: its values [i, i + kLanes) (fewer: mask), of channels from c
// on, where d = x - origin: the same bits as the Gradient's operator(). Given values, dpre,
// or the activation's derivative at dy and the pre-activation computed again from d
// (fma(d, scale, shift) [+ z]; the derivative on lanes: see relu_gradient).
template <typename G, typename... M>
Lanes gradient_lanes(const GivenGradient<G>& g, int64_t i, int64_t, Lanes, M... mask) {
  return load_halves(g.g + i, mask...);
}
template <typename T, typename... M>
Lanes gradient_lanes(const PreparedGradient<T>& g, int64_t i, int64_t, Lanes, M... mask) {
  return load_halves(g.dpre + i, mask...);
}
template <typename T, bool kResidual, typename Derivative, typename... M>
Lanes gradient_lanes(const ActivationGradient<T, kResidual, Derivative>& g, int64_t i,
                     int64_t c, Lanes d, M... mask) {
  Lanes pre = fma_lanes(d, lanes_at(g.scale + c, mask...), lanes_at(g.shift + c, mask...));
  if constexpr (kResidual) pre = add_lanes(pre, load_halves(g.z + i, mask...));
  return g.derivative(load_halves(g.dy + i, mask...), pre);
}

// input_gradients' training dx in half precision (and of float32 rows of kStreamFrom bytes or
// more, given values only) on lanes (dx_lanes): n values from value `first` of x (and of
// g's arrays) on, whose channels start at `channel` (origin, k, a and b start there too;
// kPlane: one channel's, as dx_lanes'; period: PeriodicTables', as dx_lanes'), g on lanes
// (gradient_lanes, a copy of the Gradient: see Rows::each_pre's): given values, dpre, or an
// activation's derivative (leaky ReLU's dx one rounding off at most, where the generic
// loop let GCC fuse g's product into g - a). The activations' derivatives on lanes, raw
// forward + backward, time / the generic loop's (which rounds float16 in 16 integer
// operations per 16 values: store<F16>), two threads (one), 2026-12-07: float16 with ReLU
// (512, 256) 0.82-0.83 (0.78-0.79), channels_last (8, 96, 16, 16) 0.79-0.82 (0.77-0.78);
// bfloat16 with ReLU (512, 256) 0.97-0.99 (0.95-0.98), channels_last (8, 96, 24, 24) 0.98
// (0.96-0.99), (4096, 1024) and channels_last (32, 128, 32, 32), bound by memory,
// 0.97-1.01 (0.99-1.00); with leaky ReLU 0.95-0.97 (0.95-0.97) and 0.98-1.02 (0.97-1.00).
template <bool kPlane, bool kStream, typename T, typename Gradient>
void dx_halves(const Gradient& g, const T* x, int64_t first, int64_t channel, T* dx, int64_t n,
               const float* origin, const float* k, const float* a, const float* b,
               int64_t period) {
  auto g_at = [g, first, channel](int64_t i, int64_t c, Lanes d, auto... mask) {
    return gradient_lanes(g, first + i, channel + c, d, mask...);
  };
  dx_lanes<kPlane, kStream>(x + first, g_at, dx, n, origin, k, a, b, period);
}

// The terms of half-precision rows on lanes (see add_lanes_to), defined here, after
// gradient_lanes: CentredTerms' {d, d, d} and GradientTerms' {g, g, x - mean}. The latter,
// raw forward + backward, time / the generic loop's (with the statistics' lanes), float16,
// two threads (one), 2026-12-07: (512, 256) 0.87-0.89 (0.82-0.83), (1024, 256) 0.84-0.86
// (0.79-0.80), channels_last (8, 96, 16, 16) 0.86-0.88 (0.81-0.82); with ReLU 0.88-0.90
// (0.81-0.92), with SiLU 0.92-0.96 (0.88-0.94). The training forward alone (the statistics'
// lanes): 0.81-0.84 (0.75-0.77).
template <typename T, typename... M>
std::array<Lanes, 3> terms_lanes(const CentredTerms<T, float>& term, int64_t i, int64_t c,
                                 M... mask) {
  const Lanes d = sub_lanes(load_halves(term.x + i, mask...), lanes_at(term.centre + c, mask...));
  return {d, d, d};
}
template <typename T, typename Gradient, typename... M>
std::array<Lanes, 3> terms_lanes(const GradientTerms<T, Gradient>& term, int64_t i,
                                 int64_t c, M... mask) {
  const Lanes d = sub_lanes(load_halves(term.x + i, mask...), lanes_at(term.origin + c, mask...));
  const Lanes g = gradient_lanes(term.gradient, i, c, d, mask...);
  return {g, g, sub_lanes(d, lanes_at(term.offset + c, mask...))};
}

// dpre[i] = derivative(dy[i], pre-activation) over rows [first, first + count) of `in`
// (each_pre_lanes' pre-activations, a row at a time), stored in float32 with plain stores
// (the backward's sums read them back from L1 at once): the backward's dpre of SiLU, whose
// exp bounds its loop by arithmetic, in AVX-512's instructions (GCC's vectorized loop
// compares and blends where these take a min and a max), derivative with_activation's (on
// lanes: the same bits). Rows narrower than kDpreRunsBelow as one run of values, on
// PeriodicTables (`tables`; period 0: a row at a time).
template <typename T, typename Derivative>
void pre_gradient_lanes(const Rows<T>& in, const T* dy, float* dpre, int64_t first,
                        int64_t count, const Derivative& derivative,
                        const PeriodicTables& tables) {
  // values [base, base + n) on the constants at origin, scale and shift (PeriodicTables'
  // where period is not 0)
  auto dpre_of = [&](int64_t base, int64_t n, const float* origin, const float* scale,
                     const float* shift, int64_t period) {
    each_pre_lanes<false, true>(in.x + base, in.z ? in.z + base : nullptr, dpre + base, n,
                                origin, scale, shift, period,
                                [&](int64_t i, Lanes p, auto... mask) {
                                  const Lanes g = load_halves(dy + base + i, mask...);
                                  store_lanes(dpre + base + i, derivative(g, p), mask...);
                                });
  };
  if (tables.period)  // the rows as one run
    return dpre_of(first * in.channels, count * in.channels, tables[0], tables[1], tables[2],
                   tables.period);
  for (int64_t r = first; r < first + count; ++r)
    dpre_of(r * in.channels, in.channels, in.centre.origin.data(), in.affine.scale.data(),
            in.affine.shift.data(), 0);
}

// dst[0, n) = src[0, n) in float32, and back (ChannelBuffers').
template <typename T>
void halves_to_floats(const T* src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const Mask m = first_lanes(std::min(kLanes, n - i));
    _mm512_mask_storeu_ps(dst + i, m, load_halves(src + i, m));
  }
}
template <typename T>
void floats_to_halves(const float* __restrict src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const Mask m = first_lanes(std::min(kLanes, n - i));
    store_halves(dst + i, lanes_at(src + i, m), m);
  }
}

// Calls f(code), the activation's code as a std::integral_constant: normalize_halves'
// activations (ReLU, leaky ReLU, SiLU, else the identity).
template <typename F>
void with_lanes_activation(int64_t activation, F&& f) {
  if (activation == kRelu) return f(std::integral_constant<int64_t, kRelu>{});
  if (activation == kLeakyRelu) return f(std::integral_constant<int64_t, kLeakyRelu>{});
  if (activation == kSilu) return f(std::integral_constant<int64_t, kSilu>{});
  f(std::integral_constant<int64_t, kIdentity>{});
}

// y = act((x [- origin]) * scale + shift [+ z]) in registers (normalize_halves), act the
// plain, ReLU, leaky ReLU or SiLU (activation's code), over `units` rows or (planes) NCHW
// planes of `width` values each. The constants are per channel: a row's value c takes
// channel c's, a plane's values those of its channel (unit u's: u % channels). origin: null
// where the shift holds it. A y of kStreamFrom bytes or more is written with non-temporal
// stores (streams_lanes), a smaller one with plain ones.
template <typename T>
void normalize_units(const T* x, const T* z, T* y, int64_t units, int64_t width,
                     int64_t channels, bool planes, const float* origin, const float* scale,
                     const float* shift, int64_t activation, float slope) {
  const bool stream = streams_lanes(y, units, width);
  // rows: a thread's rows as one run of values where their width calls for it
  const PeriodicTables tables =
      planes ? PeriodicTables() : periodic_tables<T>(width, {origin, scale, shift});
  auto each_unit = [&](auto code, auto centred, auto streaming) {
    constexpr int64_t kCode = decltype(code)::value;
    constexpr bool kCentred = decltype(centred)::value, kStream = decltype(streaming)::value;
    for_rows(units, width, [&](int64_t begin, int64_t end) {
      if (tables.period) {  // the rows as one run
        const int64_t first = begin * width;
        normalize_halves<kCode, false, kCentred, kStream>(
            x + first, z ? z + first : nullptr, y + first, (end - begin) * width, tables[0],
            tables[1], tables[2], slope, tables.period);
      } else {
        for (int64_t u = begin, channel = begin % channels; u < end; ++u) {
          const int64_t c = planes ? channel : 0;  // the unit's first constants
          channel = channel + 1 == channels ? 0 : channel + 1;  // (a division costs more)
          const int64_t first = u * width;
          const T* add = z ? z + first : nullptr;
          if (planes)
            normalize_halves<kCode, true, kCentred, kStream>(
                x + first, add, y + first, width, kCentred ? origin + c : nullptr, scale + c,
                shift + c, slope);
          else
            normalize_halves<kCode, false, kCentred, kStream>(x + first, add, y + first, width,
                                                              origin, scale, shift, slope);
        }
      }
      if (kStream) fence_streams();
    });
  };
  auto with_code = [&](auto centred, auto streaming) {
    with_lanes_activation(activation, [&](auto code) { each_unit(code, centred, streaming); });
  };
  auto with_stores = [&](auto centred) {
    if (stream) return with_code(centred, std::true_type{});
    with_code(centred, std::false_type{});
  };
  if (origin) return with_stores(std::true_type{});
  with_stores(std::false_type{});
}

// y = act((x - origin) * scale + shift [+ z]) over channel c's planes of an NCHW input, in
// registers (normalize_halves; act plain, ReLU or leaky ReLU): forward_planes' output of
// float16 planes (kBufferedPlanes) and bfloat16 ones.
template <typename T>
void normalize_channel_halves(const PlaneShape& shape, int64_t c, const T* x, const T* z, T* y,
                              float origin, float scale, float shift, int64_t activation,
                              float slope) {
  with_lanes_activation(activation, [&](auto code) {
    for (int64_t n = 0; n < shape.batch; ++n) {
      const int64_t first = shape.start(n, c);
      normalize_halves<decltype(code)::value, true, true>(
          x + first, z ? z + first : nullptr, y + first, shape.size, &origin, &scale, &shift,
          slope);
    }
  });
}

// Eval without a graph of a float16 or bfloat16 input whose channels are innermost (rows)
// or of an NCHW-contiguous one (planes: every value of plane p is of channel p % C). The
// running mean folds into the shift (x * scale + shift, the shift bias - mean * scale
// rounded once from float64), as ATen's eval does: a subtraction and a stream of constants
// fewer. The fold's rounding, 2^-24 |mean * scale|, is 2^-13 (bfloat16: 2^-16) of what
// rounding x to the dtype has already cost there (up to 2^-11 |x * scale|, x near the
// mean), so the outputs stay within their rounding of the float64 result (the tests: means
// 3 and 1000).
// (Rows of 1024 channels, (4096, 1024), took 1.1-1.2x ATen's time with the subtraction.)
Tensor eval_halves(const Tensor& x, const Tensor& weight, const Tensor& bias,
                   const Tensor& residual, const Running& running, double eps,
                   int64_t activation, double slope, bool planes) {
  const int64_t channels = x.size(1);
  const int64_t units = planes ? x.size(0) * channels : x.numel() / channels;
  const int64_t width = units ? x.numel() / units : 0;
  Tensor y = at::empty_like(x);
  const Affine affine = eval_affine(weight, bias, running, eps, channels, true);
  auto run = [&](auto element) {  // the element type: F16 or BF16
    using T = decltype(element);
    normalize_units(values_or_null<T>(x), values_or_null<T>(residual), mutable_values<T>(y),
                    units, width, channels, planes, nullptr, affine.scale.data(),
                    affine.shift.data(), activation, static_cast<float>(slope));
  };
  if (x.scalar_type() == at::kHalf)
    run(F16{});
  else
    run(BF16{});
  return y;
}
#else
Tensor eval_halves(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Running&,
                   double, int64_t, double, bool) {
  TORCH_CHECK(false, "rows_batch_norm: float16 inputs need a CPU with AVX-512");
}
#endif

// The forward of either layout: forward_rows, or forward_planes (NCHW).
Normalized forward_of(const Tensor& x, const Tensor& weight, const Tensor& bias,
                      const Tensor& residual, Running& running, bool training, double momentum,
                      double eps, int64_t activation, double slope) {
  if (rows_layout(x))
    return forward_rows(x, weight, bias, residual, running, training, momentum, eps,
                        activation, slope);
  return forward_planes(x, weight, bias, residual, running, training, momentum, eps,
                        activation, slope);
}

// The optional inputs are std::optional: autograd takes one that is not given for no input.
using Optional = std::optional<Tensor>;

struct RowsBatchNorm : public torch::autograd::Function<RowsBatchNorm> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Optional& weight,
                        const Optional& bias, const Optional& residual, Running running,
                        bool training, double momentum, double eps, int64_t activation,
                        double slope) {
    const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor()),
                 z = residual.value_or(Tensor());
    Normalized out = forward_of(x, w, b, z, running, training, momentum, eps, activation, slope);
    ctx->save_for_backward({x, w, b, z, out.offset, out.invstd});
    // the options in two entries (each costs a hash-map insert): activation and training
    // in one code, then eps and the slope
    ctx->saved_data["code"] = activation * 2 + training;
    ctx->saved_data["eps, slope"] = c10::ivalue::Tuple::create(eps, slope);
    ctx->set_materialize_grads(false);  // no gradient of y: none of the inputs', as torch
    return out.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& dy_given = grads[0];
    variable_list out(kArguments);
    if (!dy_given.defined()) return out;
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &residual = saved[3],
                 &offset = saved[4], &invstd = saved[5];
    const int64_t code = ctx->saved_data["code"].toInt();
    const bool training = code % 2;
    const int64_t activation = code / 2;
    const auto options = ctx->saved_data["eps, slope"].toTuple();
    const double eps = options->elements()[0].toDouble();
    const double slope = options->elements()[1].toDouble();
    // needs_input_grad counts the inputs autograd took: the given ones
    const int positions[4] = {kX, kWeight, kBias, kResidual};
    const bool given[4] = {true, weight.defined(), bias.defined(), residual.defined()};
    bool need[4];
    for (int i = 0, input = 0; i < 4; ++i) need[i] = given[i] && ctx->needs_input_grad(input++);
    if (at::GradMode::is_enabled() || !dy_given.has_storage()) {
      // A gradient that will be differentiated again (create_graph=True), or one that
      // torch.func batches: the reference's backward in torch ops, in Python.
      pybind11::gil_scoped_acquire gil;
      auto or_none = [](const Tensor& t) {
        return t.defined() ? pybind11::cast(t) : pybind11::none();
      };
      auto result = pybind11::module_::import("batchnorm.backends.cpp_cpu")
                        .attr("differentiable_backward")(
                            dy_given, x, or_none(weight), or_none(bias), or_none(residual),
                            training, eps, offset, invstd,
                            activation, slope)
                        .cast<pybind11::tuple>();
      for (int i = 0; i < 4; ++i)
        if (need[i] && !result[i].is_none()) out[positions[i]] = result[i].cast<Tensor>();
      return out;
    }
    // the kernels read dy as rows of x's layout and dtype
    Tensor dy = dy_given.strides() == x.strides() && dy_given.dtype() == x.dtype()
                    ? dy_given
                    : at::empty_like(x).copy_(dy_given);
    const int64_t channels = x.size(1), rows = x.numel() / channels;
    if (need[0]) out[kX] = at::empty_like(x);
    if (need[1]) out[kWeight] = at::empty({channels}, weight.options());
    if (need[2]) out[kBias] = at::empty({channels}, bias.options());
    // dpre = dL/d(pre-activation): dy itself without an activation. With ReLU or leaky
    // ReLU (memory_bound) and no dL/dresidual asked for, computed again from x (and z) in
    // both passes (ActivationGradient): the same values, without a pass that writes dpre
    // and two that read it back. Raw forward + backward, ms, one thread (two), written out ->
    // computed again: ReLU (4096, 1024) 5.38 -> 5.04 (3.41 -> 3.04), channels_last
    // (32, 128, 32, 32) 4.31 -> 4.03 (2.16 -> 2.00), (8, 96, 48, 48) 1.66 -> 1.47 (0.80 ->
    // 0.65); leaky ReLU 6.9 -> 6.2, 4.5 -> 4.1, 1.67 -> 1.49 on one thread. SiLU's exp
    // costs more than the passes saved (5.9 -> 6.7 and 5.5 -> 6.8 ms on the first two),
    // and dL/dresidual is dpre: both are written out, to dL/dresidual when that is asked
    // for, else to a buffer (torch's allocator's, not zero-filled as a std::vector's). For
    // rows, where the pass of the sums runs (training, or dweight or dbias asked for), dpre
    // is written in that pass, a group of rows at a time just before the group's terms read
    // it back from L1 (column_sums' prepare; input_gradients runs it alone where no sums
    // run); before, a pass of its own (still NCHW planes' pre_gradient) read x and dy, and
    // the sums read x and dpre again. Raw forward + backward with SiLU, ms, its own pass ->
    // in the sums', one thread (two), medians of three rounds taking turns (2026-12-07):
    // (4096, 1024) 10.11 -> 9.03 (7.66 -> 6.78), bfloat16 9.42 -> 8.82 (6.83 -> 6.16),
    // (32768, 128) 10.47 -> 9.70 (5.06 -> 4.60); channels_last (32, 128, 32, 32) 10.35 ->
    // 9.39 (5.26 -> 4.75), bfloat16 8.61 -> 7.88 (4.67 -> 4.46), (64, 256, 28, 28) 27.6 ->
    // 25.5 (17.2 -> 15.1); the same bits. So for ReLU and leaky ReLU where dL/dresidual is
    // asked for: ReLU, (4096, 1024) 9.42 -> 8.79 (7.44 -> 6.92), channels_last (32, 128,
    // 32, 32) 10.53 -> 10.27 (6.00 -> 5.47).
    // A half-precision input's dpre is written in float32 (rounded to its dtype, it would
    // cost the parameters' gradients, summed from it, their float32 accuracy), and
    // dL/dresidual is it rounded.
    with_storage(x, [&](auto element) {
      using T = decltype(element);
      const T *x_values = values_or_null<T>(x), *z = values_or_null<T>(residual);
      const float *inv = values_or_null(invstd), *saved = values_or_null(offset);
      const float *w = values_or_null(weight), *b = values_or_null(bias);
      const T* dy_values = values_or_null<T>(dy);
      // the passes over `in`: Rows<T>, or Planes<T> (NCHW)
      auto gradients = [&](const auto& in) {
        auto writable = [](Tensor& t, auto type) {  // t's values as decltype(type), or null
          return t.defined() ? mutable_values<decltype(type)>(t) : nullptr;
        };
        auto gradients_from = [&](auto memory_bound, const auto& gradient,
                                  const auto&... prepare) {
          input_gradients<memory_bound>(in, gradient, inv, w, training,
                                        writable(out[kX], T{}), writable(out[kWeight], float{}),
                                        writable(out[kBias], float{}), prepare...);
        };
        if (activation == kIdentity) {
          if (need[3]) out[kResidual] = dy.clone();  // dL/dresidual is dy
          return gradients_from(std::true_type{}, GivenGradient<T>{dy_values});
        }
        with_activation(activation, static_cast<float>(slope), [&](auto, auto derivative,
                                                                   auto memory_bound) {
          using Derivative = decltype(derivative);
          if constexpr (decltype(memory_bound)::value) {
            if (!need[3]) {  // no dL/dresidual asked for (none without a residual)
              const float *scale = in.affine.scale.data(), *shift = in.affine.shift.data();
              if (in.z)
                return gradients_from(memory_bound, ActivationGradient<T, true, Derivative>{
                                                        dy_values, in.z, scale, shift, derivative});
              return gradients_from(memory_bound,
                                    ActivationGradient<T, false, Derivative>{
                                        dy_values, nullptr, scale, shift, derivative});
            }
          }
          constexpr bool kFloat = std::is_same_v<T, float>;
          Tensor dpre = need[3] && kFloat ? (out[kResidual] = at::empty_like(x))
                                          : at::empty_like(x, x.options().dtype(at::kFloat));
          float* dpre_values = mutable_values<float>(dpre);
          if constexpr (std::is_same_v<std::decay_t<decltype(in)>, Rows<T>>) {
            constexpr bool kLanesDpre = kHalfLoops && !decltype(memory_bound)::value;  // SiLU
            const PeriodicTables tables =
                kLanesDpre && in.channels < kDpreRunsBelow
                    ? PeriodicTables(in.channels, {in.centre.origin.data(),
                                                   in.affine.scale.data(),
                                                   in.affine.shift.data()})
                    : PeriodicTables();
            auto prepare = [&](int64_t first, int64_t count) {  // dpre of these rows
              if constexpr (kLanesDpre)
                return pre_gradient_lanes(in, dy_values, dpre_values, first, count, derivative,
                                          tables);
              in.template each_pre<decltype(memory_bound)::value>(
                  first, first + count, [=](int64_t i, float pre) {
                    dpre_values[i] = derivative(load(dy_values[i]), pre);
                  });
            };
            gradients_from(std::true_type{}, PreparedGradient<T>{dpre_values, dy_values, in.z},
                           prepare);
          } else {
            pre_gradient<memory_bound>(in, dy_values, derivative, dpre_values);
            gradients_from(std::true_type{}, GivenGradient<float>{dpre_values});
          }
          if (need[3] && !kFloat) out[kResidual] = dpre.to(x.scalar_type());
        });
      };
      if (rows_layout(x))
        return gradients(Rows<T>(x_values, z, rows, channels,
                                 centre_of(x_values, 1, saved, channels, training), inv, w, b));
      gradients(Planes<T>(x, z, saved, training, inv, w, b));
    });
    return out;
  }
};

// The checks of whether a call is one for these kernels, in C++: written in Python they
// cost 2 µs, as much as the kernels of a small eval call save.

// Whether t's memory holds its values, of `dtype` on the CPU (not a torch.func wrapper,
// nor a fake tensor, nor a lazily negated view).
bool holds_values(const Tensor& t, at::ScalarType dtype) {
  return t.layout() == at::kStrided && !t.is_nested() && t.device().is_cpu() &&
         t.scalar_type() == dtype && t.has_storage() && !t.is_neg() &&
         !t.key_set().has(c10::DispatchKey::Python);
}

// A tensor the kernels can read: a torch.Tensor or Parameter (not a subclass, whose
// methods could mean something else) that holds its values.
bool readable(pybind11::handle obj, at::ScalarType dtype) {
  return THPVariable_CheckExact(obj.ptr()) && holds_values(THPVariable_Unpack(obj.ptr()), dtype);
}

// None, or a readable contiguous float32 (C,) tensor (running statistics: not requiring
// grad).
bool per_channel(pybind11::handle obj, int64_t channels, bool statistic) {
  if (obj.is_none()) return true;
  if (!readable(obj, at::kFloat)) return false;
  const Tensor& t = THPVariable_Unpack(obj.ptr());
  return t.dim() == 1 && t.size(0) == channels && t.is_contiguous() &&
         !(statistic && t.requires_grad());
}

// Whether autograd records a graph of a call on these inputs (undefined: not given).
bool records_graph(const Tensor& x, const Tensor& weight, const Tensor& bias,
                   const Tensor& residual) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : {&x, &weight, &bias, &residual})
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

// What takes says of a call (cpp_cpu's UNCHECKED, USUAL, TAKES): kTakes, rows_batch_norm
// computes it; kUsual, it does not, but the call's tensors pass the checks of
// functional._layer_call, which then need not make them (these are stricter: a float32,
// bfloat16 or float16 CPU input of 2 or more dimensions, float32 parameters and statistics
// of its channels, contiguous, a residual of its dtype, sizes and strides); kUnchecked, the
// Python checks decide.
enum Kind : int64_t { kUnchecked = 0, kUsual = 1, kTakes = 2 };

int64_t takes(pybind11::handle x, pybind11::handle weight, pybind11::handle bias,
              pybind11::handle running_mean, pybind11::handle running_var,
              pybind11::handle residual, bool training, int64_t activation) {
  const bool half = readable(x, at::kHalf);
  if (!(half || readable(x, at::kFloat) || readable(x, at::kBFloat16))) return kUnchecked;
  const Tensor& t = THPVariable_Unpack(x.ptr());
  if (t.dim() < 2) return kUnchecked;
  const int64_t channels = t.size(1), values = t.numel();
  if (running_mean.is_none() != running_var.is_none()) return kUnchecked;
  if (training ? values <= channels : running_mean.is_none() || values == 0) return kUnchecked;
  if (!residual.is_none()) {  // read as rows of x's layout
    if (!readable(residual, t.scalar_type())) return kUnchecked;
    const Tensor& z = THPVariable_Unpack(residual.ptr());
    if (z.sizes() != t.sizes() || z.strides() != t.strides()) return kUnchecked;
  }
  if (!(per_channel(weight, channels, false) && per_channel(bias, channels, false) &&
        per_channel(running_mean, channels, true) && per_channel(running_var, channels, true)))
    return kUnchecked;
  const bool rows = rows_layout(t);
  if (half && !kHalfLoops) return kUsual;  // float16 only where the CPU has AVX-512
  if (!rows && !planes_layout(t)) return kUsual;
  auto tensor = [](pybind11::handle obj) {  // a checked tensor, or None
    return obj.is_none() ? Tensor() : THPVariable_Unpack(obj.ptr());
  };
  if (rows) return kTakes;  // float16 too: see the note on its rows before kFloat16PlanesUpTo
  if (!training && !records_graph(t, tensor(weight), tensor(bias), tensor(residual)))
    return kTakes;
  const int64_t size = values / (t.size(0) * channels);  // a plane's values
  // float16 NCHW in training or with a graph: batches of short planes (see
  // kFloat16PlanesUpTo)
  if (half)
    return values <= kPlanesUpTo && t.size(0) >= kRowsAtOnce && size <= kFloat16PlanesUpTo
               ? kTakes
               : kUsual;
  // NCHW in training or with a graph: up to kPlanesUpTo values (see planes_fused and
  // planes_streamed)
  const bool fused = training && planes_fused(t.scalar_type(), activation, !residual.is_none());
  const bool residual_gradient = at::GradMode::is_enabled() && !residual.is_none() &&
                                 tensor(residual).requires_grad();
  const bool streamed =
      planes_streamed(t.scalar_type(), values, size, activation, residual_gradient);
  return values <= kPlanesUpTo || fused || streamed ? kTakes : kUsual;
}

// steps += 1 (a layer's num_batches_tracked, as torch.nn's training step counts it):
// torch's add_ called from Python cost 4-5 µs, a sixth of a small layer's call; here the
// value and its version counter (as an in-place op bumps it) are set directly where steps
// is an int64 scalar that holds its value, outside inference mode, else by ATen's add_.
void count_step(Tensor& steps) {
  if (holds_values(steps, at::kLong) && steps.numel() == 1 && !steps.is_inference()) {
    ++*steps.data_ptr<int64_t>();
    steps.unsafeGetTensorImpl()->bump_version();
  } else {
    steps.add_(1);
  }
}

Tensor rows_batch_norm(const Tensor& x, const Optional& weight, const Optional& bias,
                       const Optional& running_mean, const Optional& running_var,
                       const Optional& residual, bool training, double momentum, double eps,
                       int64_t activation, double slope, Optional steps) {
  if (steps) count_step(*steps);  // first, as torch.nn counts before it normalizes
  Running running{running_mean.value_or(Tensor()), running_var.value_or(Tensor())};
  const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor()),
               z = residual.value_or(Tensor());
  // The loops read the tensors' memory as these types (takes checks them in full). (One
  // check: with one per tensor, in a loop, a small call took 0.4 µs longer.)
  auto floats = [](const Tensor& t) { return !t.defined() || t.scalar_type() == at::kFloat; };
  const bool half = x.scalar_type() == at::kHalf;
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || half) &&
                  (!z.defined() || z.scalar_type() == x.scalar_type()) && floats(w) &&
                  floats(b) && floats(running.mean) && floats(running.var),
              "rows_batch_norm: expected a float32, bfloat16 or float16 input (and residual of "
              "its dtype), float32 parameters and running statistics");
  const bool graph = records_graph(x, w, b, z), rows = rows_layout(x);
  TORCH_CHECK(rows || planes_layout(x),
              "rows_batch_norm: expected an input whose channels are innermost or an "
              "NCHW-contiguous one, got strides ", x.strides());
  TORCH_CHECK(!half || kHalfLoops, "rows_batch_norm: float16 inputs need a CPU with AVX-512");
  // float16 and bfloat16 in inference: eval_halves
  if (kHalfLoops && x.scalar_type() != at::kFloat && !training && !graph)
    return eval_halves(x, w, b, z, running, eps, activation, slope, !rows);
  if (!rows && !training && !graph)  // NCHW inference: no centre to save for a backward
    return eval_planes(x, w, b, z, running, eps, activation, slope);
  if (!graph)  // the forward alone, without the node autograd would make anyway
    return forward_of(x, w, b, z, running, training, momentum, eps, activation, slope).y;
  return RowsBatchNorm::apply(x, weight, bias, residual, running, training, momentum, eps,
                              activation, slope);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("takes", &takes,
        "Whether rows_batch_norm computes this call (2), or not but its tensors pass the usual "
        "call's checks (1), or neither is known (0): (x, weight, bias, running_mean, "
        "running_var, residual, training, activation code) -> int");
  m.attr("planes_up_to") = kPlanesUpTo;
  m.attr("float16_planes_up_to") = kFloat16PlanesUpTo;
  m.def("rows_batch_norm", &rows_batch_norm,
        "Batch norm of a float32, bfloat16 or float16 (N, C), channels_last or NCHW input "
        "with the fused epilogue, the running update included in training, and "
        "num_batches_tracked (steps, or None) counted: (x, weight, bias, running_mean, "
        "running_var, residual, training, momentum, eps, activation code, negative slope, "
        "steps) -> y");
}
