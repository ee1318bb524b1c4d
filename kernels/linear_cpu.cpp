// Linear layers over a few rows on CPU (megakv.kernels.cpu_linear): y [M, N] = x [M, K] w [N, K]^T (+ b) with
// x and w each in fp32 or bf16 (widened to fp32 in registers, or multiplied by bf16 dot products where the CPU
// has them), fp32 sums, y in x's dtype, so a bf16 model converts nothing. A decode step runs every linear layer
// on as many rows as it has sequences, so it is bound by reading the weights: the op reads each weight once per
// call while the products of a group of input rows stay in registers, whatever the CPU's vendor (BLAS libraries
// pick their fast paths by vendor, and their GEMV for bf16 goes through a packing GEMM). Threads split the
// output rows, each streaming a contiguous band of the weight.
// This file follows paged_attention_cpu.cpp in one translation unit and uses its vector type and loads.

// Input rows computed together: their accumulators, the weight vectors and an x vector fit the register file
// (32 vectors on AVX-512, 16 on AVX2).
constexpr int LINEAR_BATCH = W == 16 ? 4 : 2;
// Past a few input rows the op is bound by its loads and FMAs, not the memory, so LINEAR_ROWS weight rows are read
// in step and each x vector loaded serves all of them. Below that (Lanes::STREAMED_BELOW input rows) each thread
// streams one weight row at a time, front to back, with the k loop unrolled LINEAR_UNROLL times for independent
// FMA chains: rows read in step came far below the memory's speed on an AMD EPYC, whose prefetchers lose
// interleaved streams (docs/benchmarks.md).
constexpr int LINEAR_ROWS = 4;
constexpr int LINEAR_UNROLL = 2;
// Rows read in step are prefetched this far ahead besides the hardware's stream, which alone left the memory
// idle while a core widened and multiplied bf16 weights on an Intel Xeon; a single streamed row is not (a
// prefetch there only cost bandwidth on the AMD EPYC).
constexpr int64_t LINEAR_PREFETCH_BYTES = 16384;

static inline float widen(float value) { return value; }
static inline float widen(at::BFloat16 value) { return static_cast<float>(value); }

// How a tile multiplies an x of type X by a weight of type T: fp32 FMAs on W lanes after widening.
template <typename X, typename T>
struct Lanes {
  using acc_t = vecf;
  using w_t = vecf;
  static constexpr int STEP = W;
  // A bf16 x vector is widened at each load, which makes reusing it across weight rows pay off sooner.
  static constexpr int STREAMED_BELOW = std::is_same_v<X, float> ? 2 * LINEAR_BATCH : LINEAR_BATCH;
  static acc_t zero() { return vecf{}; }
  static w_t load_w(const T* p) { return loadw(p); }
  static acc_t madd(acc_t acc, w_t w, const X* x) { return acc + w * loadw(x); }
  static acc_t add(acc_t a, acc_t b) { return a + b; }
  static float sum(acc_t acc) { return hsum(acc); }
};

#if defined(__AVX512BF16__)
#include <immintrin.h>
// bf16 against bf16 where the CPU has avx512_bf16 (the avx512_bf16 build): vdpbf16ps multiplies 32 pairs and adds
// each two products to one of 16 fp32 lanes, twice the products of an fp32 FMA and no widening, which is what
// bounds the op above a few rows.
template <>
struct Lanes<at::BFloat16, at::BFloat16> {
  using acc_t = __m512;
  using w_t = __m512bh;
  static constexpr int STEP = 32;
  static constexpr int STREAMED_BELOW = 2 * LINEAR_BATCH;
  static acc_t zero() { return _mm512_setzero_ps(); }
  static w_t load_w(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static acc_t madd(acc_t acc, w_t w, const at::BFloat16* x) {
    return _mm512_dpbf16_ps(acc, w, (__m512bh)_mm512_loadu_si512(x));
  }
  static acc_t add(acc_t a, acc_t b) { return _mm512_add_ps(a, b); }
  static float sum(acc_t acc) { return _mm512_reduce_add_ps(acc); }
};
#endif

// One call's operands: x [M, K] and y [M, N] in the activations' type X, the weight [N, K] in T.
template <typename X, typename T>
struct LinearArgs {
  const X* x;
  const T* w;
  const float* bias;  // [N] in fp32, or null
  X* y;
  int64_t M, N, K;
};

// y[b, r] for r < R, b < B: the dot products of R weight rows (from w) with B input rows (from x), the k loop
// unrolled U times.
template <int R, int B, int U, typename X, typename T>
static inline void dot_tile(const LinearArgs<X, T>& args, const X* x, const T* w, X* y, const float* bias) {
  using L = Lanes<X, T>;
  const int64_t K = args.K;
  typename L::acc_t acc[R][B][U];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b)
      for (int u = 0; u < U; ++u) acc[r][b][u] = L::zero();
  constexpr int STEP = L::STEP * U;
  const int64_t k_vec = K - K % STEP;
  for (int64_t k = 0; k < k_vec; k += STEP) {
    typename L::w_t wv[R][U];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if constexpr (R > 1) __builtin_prefetch(w + r * K + k + LINEAR_PREFETCH_BYTES / sizeof(T), 0, 3);
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) wv[r][u] = L::load_w(w + r * K + k + L::STEP * u);
    }
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[r][b][u] = L::madd(acc[r][b][u], wv[r][u], x + b * K + k + L::STEP * u);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) {
      typename L::acc_t lanes = acc[r][b][0];
      for (int u = 1; u < U; ++u) lanes = L::add(lanes, acc[r][b][u]);
      float total = L::sum(lanes);
      for (int64_t k = k_vec; k < K; ++k) total += widen(w[r * K + k]) * widen(x[b * K + k]);
      y[b * args.N + r] = static_cast<X>(total + (bias ? bias[r] : 0.f));
    }
  }
}

// R weight rows from row n on against every input row, LINEAR_BATCH rows at a time while the R rows stay in L1.
template <int R, typename X, typename T>
static void rows_times_batch(const LinearArgs<X, T>& args, int64_t n) {
  constexpr int U = R == 1 ? LINEAR_UNROLL : 1;
  const T* w = args.w + n * args.K;
  const float* bias = args.bias ? args.bias + n : nullptr;
  int64_t m = 0;
  for (; m + LINEAR_BATCH <= args.M; m += LINEAR_BATCH)
    dot_tile<R, LINEAR_BATCH, 1>(args, args.x + m * args.K, w, args.y + m * args.N + n, bias);
  const X* x = args.x + m * args.K;
  X* y = args.y + m * args.N + n;
  switch (args.M - m) {
    case 0: break;
    case 1: dot_tile<R, 1, U>(args, x, w, y, bias); break;
#if MEGAKV_VEC_WIDTH == 16
    case 2: dot_tile<R, 2, U>(args, x, w, y, bias); break;
    case 3: dot_tile<R, 3, U>(args, x, w, y, bias); break;
#endif
    default: TORCH_CHECK(false, "unreachable batch remainder");
  }
}

template <typename X, typename T>
static void linear_rows(const LinearArgs<X, T>& args) {
  const int R = args.M < Lanes<X, T>::STREAMED_BELOW ? 1 : LINEAR_ROWS;
  const int64_t num_tiles = (args.N + R - 1) / R;
  // A thread's tasks are bands of 64 weight rows: long enough to stream.
  at::parallel_for(0, num_tiles, 64 / R, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile * R;
      if (R == 1) {
        rows_times_batch<1>(args, n);
      } else if (n + LINEAR_ROWS <= args.N) {
        rows_times_batch<LINEAR_ROWS>(args, n);
      } else {
        for (int64_t row = n; row < args.N; ++row) rows_times_batch<1>(args, row);
      }
    }
  });
}

template <typename X, typename T>
static void linear_typed(const torch::Tensor& x, const torch::Tensor& weight, const float* bias, torch::Tensor& y) {
  linear_rows(LinearArgs<X, T>{x.data_ptr<X>(), weight.data_ptr<T>(), bias, y.data_ptr<X>(), x.size(0),
                               weight.size(0), x.size(1)});
}

// x [M, K] and weight [N, K] (each fp32 or bf16), bias [N] or None -> y [M, N] in x's dtype.
torch::Tensor linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear: x [M, K] and weight [N, K] expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "linear: the weight must be contiguous");
  const auto is_op_dtype = [](const torch::Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
  };
  TORCH_CHECK(is_op_dtype(x) && is_op_dtype(weight), "linear: float32 or bfloat16 expected, got x ",
              x.scalar_type(), " and weight ", weight.scalar_type());
  const torch::Tensor rows = x.contiguous();
  torch::Tensor bias32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "linear: bias [", weight.size(0),
                "] expected, got ", bias->sizes());
    bias32 = bias->to(at::kFloat).contiguous();
  }
  const float* bias_ptr = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  torch::Tensor y = torch::empty({x.size(0), weight.size(0)}, x.options());
  const bool x_bf16 = x.scalar_type() == at::kBFloat16, w_bf16 = weight.scalar_type() == at::kBFloat16;
  if (x_bf16 && w_bf16) linear_typed<at::BFloat16, at::BFloat16>(rows, weight, bias_ptr, y);
  else if (x_bf16) linear_typed<at::BFloat16, float>(rows, weight, bias_ptr, y);
  else if (w_bf16) linear_typed<float, at::BFloat16>(rows, weight, bias_ptr, y);
  else linear_typed<float, float>(rows, weight, bias_ptr, y);
  return y;
}
