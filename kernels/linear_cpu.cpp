// Linear layers over a few rows on CPU (megakv.kernels.cpu_linear): y [M, N] = x [M, K] w [N, K]^T (+ b) with
// x and w each in fp32 or bf16 (widened to fp32 in registers), all arithmetic in fp32, y in x's dtype, so a bf16
// model converts nothing. A decode step runs every linear layer on as many rows as it has sequences, so it is
// bound by reading the weights: the op reads each weight once per call and keeps the whole batch's products in
// registers while it does, whatever the CPU's vendor (BLAS libraries pick their fast paths by vendor, and their
// GEMV for bf16 goes through a packing GEMM). Threads split the output rows, each streaming a contiguous band of
// the weight.
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

// One call's operands: x [M, K] and y [M, N] in the activations' type X, the weight [N, K] in T.
template <typename X, typename T>
struct LinearArgs {
  const X* x;
  const T* w;
  const float* bias;  // [N] in fp32, or null
  X* y;
  int64_t M, N, K;
};

// y[b, r] for r < R, b < B: the dot products of R weight rows (from w) with B input rows (from x).
template <int R, int B, typename X, typename T>
static inline void dot_tile(const LinearArgs<X, T>& args, const X* x, const T* w, X* y, const float* bias) {
  const int64_t K = args.K;
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
      const vecf xv = loadw(x + b * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][b] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) {
      float total = hsum(acc[r][b]);
      for (int64_t k = k_vec; k < K; ++k) total += widen(w[r * K + k]) * widen(x[b * K + k]);
      y[b * args.N + r] = static_cast<X>(total + (bias ? bias[r] : 0.f));
    }
  }
}

// R weight rows from row n on against every input row, LINEAR_BATCH rows at a time while the R rows stay in L1.
template <int R, typename X, typename T>
static void rows_times_batch(const LinearArgs<X, T>& args, int64_t n) {
  const T* w = args.w + n * args.K;
  const float* bias = args.bias ? args.bias + n : nullptr;
  int64_t m = 0;
  for (; m + LINEAR_BATCH <= args.M; m += LINEAR_BATCH)
    dot_tile<R, LINEAR_BATCH>(args, args.x + m * args.K, w, args.y + m * args.N + n, bias);
  const X* x = args.x + m * args.K;
  X* y = args.y + m * args.N + n;
  switch (args.M - m) {
    case 0: break;
    case 1: dot_tile<R, 1>(args, x, w, y, bias); break;
#if MEGAKV_VEC_WIDTH == 16
    case 2: dot_tile<R, 2>(args, x, w, y, bias); break;
    case 3: dot_tile<R, 3>(args, x, w, y, bias); break;
#endif
    default: TORCH_CHECK(false, "unreachable batch remainder");
  }
}

template <typename X, typename T>
static void linear_rows(const LinearArgs<X, T>& args) {
  const int64_t num_tiles = (args.N + LINEAR_ROWS - 1) / LINEAR_ROWS;
  // A grain of 16 tiles (64 rows) keeps each thread's band long enough to stream.
  at::parallel_for(0, num_tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile * LINEAR_ROWS;
      if (n + LINEAR_ROWS <= args.N) {
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
