// Linear layers over a few rows on CPU (megakv.kernels.cpu_linear): y [M, N] = x [M, K] w [N, K]^T (+ b) with
// w in fp32 or bf16 (widened to fp32 in registers), x and all arithmetic in fp32. A decode step runs every
// linear layer on as many rows as it has sequences, so it is bound by reading the weights: the op reads each
// weight once per call and keeps the whole batch's products in registers while it does, whatever the CPU's
// vendor (BLAS libraries pick their fast paths by vendor, and their GEMV for bf16 goes through a packing
// GEMM). Threads split the output rows, each streaming a contiguous band of the weight.
// This file follows paged_attention_cpu.cpp in one translation unit and uses its vector type and loads.

// Output rows computed together: their weight rows stream in parallel, and each x vector loaded is used
// LINEAR_ROWS times.
constexpr int LINEAR_ROWS = 4;
// Input rows computed together: LINEAR_ROWS x LINEAR_BATCH accumulators, plus the weight and x vectors,
// fit the register file (32 vectors on AVX-512, 16 on AVX2).
constexpr int LINEAR_BATCH = W == 16 ? 4 : 2;

// The weight is prefetched this far ahead of the rows being read. The hardware's stream alone leaves the
// memory idle while a core widens and multiplies, so a bf16 weight read only half as fast as an fp32 one;
// 16 KiB ahead (a few row tiles) was the best of 1-64 KiB on an Intel Xeon with AVX-512 (docs/benchmarks.md).
constexpr int64_t LINEAR_PREFETCH_BYTES = 16384;

static inline float widen(float value) { return value; }
static inline float widen(at::BFloat16 value) { return static_cast<float>(value); }

// y[m, n0 + r] for r < R, m < B: the dot products of R weight rows with B input rows of length K.
template <int R, int B, typename T>
static inline void dot_tile(const float* x, int64_t x_stride, const T* w, int64_t K, float* y, int64_t y_stride,
                            const float* bias) {
  vecf acc[R][B] = {};
  const int64_t k_vec = K - K % W;
  for (int64_t k = 0; k < k_vec; k += W) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) __builtin_prefetch(w + r * K + k + LINEAR_PREFETCH_BYTES / sizeof(T), 0, 3);
    vecf wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) wv[r] = loadw(w + r * K + k);
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) {
      const vecf xv = loadw(x + b * x_stride + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][b] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) {
      float total = hsum(acc[r][b]);
      for (int64_t k = k_vec; k < K; ++k) total += widen(w[r * K + k]) * x[b * x_stride + k];
      y[b * y_stride + r] = total + (bias ? bias[r] : 0.f);
    }
  }
}

// R weight rows against every input row, LINEAR_BATCH rows at a time while the R rows stay in L1.
template <int R, typename T>
static void rows_times_batch(const float* x, int64_t M, const T* w, int64_t K, float* y, int64_t N,
                             const float* bias) {
  int64_t m = 0;
  for (; m + LINEAR_BATCH <= M; m += LINEAR_BATCH)
    dot_tile<R, LINEAR_BATCH>(x + m * K, K, w, K, y + m * N, N, bias);
  switch (M - m) {
    case 0: break;
    case 1: dot_tile<R, 1>(x + m * K, K, w, K, y + m * N, N, bias); break;
#if MEGAKV_VEC_WIDTH == 16
    case 2: dot_tile<R, 2>(x + m * K, K, w, K, y + m * N, N, bias); break;
    case 3: dot_tile<R, 3>(x + m * K, K, w, K, y + m * N, N, bias); break;
#endif
    default: TORCH_CHECK(false, "unreachable batch remainder");
  }
}

template <typename T>
static void linear_rows(const float* x, int64_t M, const T* w, int64_t K, float* y, int64_t N, const float* bias) {
  const int64_t num_tiles = (N + LINEAR_ROWS - 1) / LINEAR_ROWS;
  // A grain of 16 tiles (64 rows) keeps each thread's band long enough to stream.
  at::parallel_for(0, num_tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile * LINEAR_ROWS;
      const float* tile_bias = bias ? bias + n : nullptr;
      if (n + LINEAR_ROWS <= N) {
        rows_times_batch<LINEAR_ROWS>(x, M, w + n * K, K, y + n, N, tile_bias);
      } else {
        for (int64_t row = n; row < N; ++row)
          rows_times_batch<1>(x, M, w + row * K, K, y + row, N, bias ? bias + row : nullptr);
      }
    }
  });
}

// x [M, K] (fp32 or bf16), weight [N, K] (fp32 or bf16), bias [N] or None -> y [M, N] in x's dtype.
torch::Tensor linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear: x [M, K] and weight [N, K] expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "linear: the weight must be contiguous");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "linear: weight dtype float32 or bfloat16 expected, got ", weight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const torch::Tensor x32 = x.to(at::kFloat).contiguous();
  torch::Tensor bias32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "linear: bias [", N, "] expected, got ", bias->sizes());
    bias32 = bias->to(at::kFloat).contiguous();
  }
  torch::Tensor y = torch::empty({M, N}, x32.options());
  const float* bias_ptr = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  if (weight.scalar_type() == at::kFloat)
    linear_rows(x32.data_ptr<float>(), M, weight.data_ptr<float>(), K, y.data_ptr<float>(), N, bias_ptr);
  else
    linear_rows(x32.data_ptr<float>(), M, weight.data_ptr<at::BFloat16>(), K, y.data_ptr<float>(), N, bias_ptr);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}
