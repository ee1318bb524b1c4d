// The per-token ops of a decoder layer on CPU (megakv.kernels.norm_rotary): RMSNorm with the residual add
// before it, and the rotary embedding of queries and keys in place. A decode step runs them on a handful of
// tokens per layer, where torch spends its time dispatching and allocating for each of the half dozen ops
// each takes (casts, powers, means, halves rotated and concatenated), not computing. Both follow Hugging Face's
// arithmetic, rounding to the activations' dtype where it does, so that bf16 results match its bf16 ones.
// This file follows paged_attention_cpu.cpp in one translation unit and uses its widening loads.

static inline float widen_value(float value) { return value; }
static inline float widen_value(at::BFloat16 value) { return static_cast<float>(value); }

// One row of rms_norm: sum = x (+ residual) rounded to X, out = weight * X(sum * rsqrt(mean(sum^2) + eps)).
template <typename X>
static void rms_norm_row(const X* x, const X* residual, const X* weight, X* out, X* sum_out, int64_t hidden,
                         float eps) {
  float sum_squares = 0.f;
  for (int64_t i = 0; i < hidden; ++i) {
    // Hugging Face adds the residual in the activations' dtype, then normalises that rounded sum in fp32.
    const float value = widen_value(residual ? static_cast<X>(widen_value(x[i]) + widen_value(residual[i])) : x[i]);
    if (sum_out) sum_out[i] = static_cast<X>(value);
    sum_squares += value * value;
  }
  const float scale = 1.f / std::sqrt(sum_squares / static_cast<float>(hidden) + eps);
  for (int64_t i = 0; i < hidden; ++i) {
    const float value = widen_value(residual ? sum_out[i] : x[i]);
    out[i] = static_cast<X>(widen_value(weight[i]) * widen_value(static_cast<X>(value * scale)));
  }
}

template <typename X>
static void rms_norm_typed(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                           const torch::Tensor& weight, torch::Tensor& out, torch::Tensor& sum, float eps) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  const X* residual_ptr = residual.has_value() ? residual->data_ptr<X>() : nullptr;
  X* sum_ptr = residual.has_value() ? sum.data_ptr<X>() : nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      rms_norm_row(x.data_ptr<X>() + row * hidden, residual_ptr ? residual_ptr + row * hidden : nullptr,
                   weight.data_ptr<X>(), out.data_ptr<X>() + row * hidden, sum_ptr ? sum_ptr + row * hidden : nullptr,
                   hidden, eps);
  });
}

// x [T, H] (+ residual [T, H]) -> (RMSNorm of the sum scaled by weight [H], the sum); without a residual the
// second tensor is x itself. fp32 or bf16, all in one dtype.
std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                    c10::optional<torch::Tensor> residual) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1),
              "rms_norm: x [T, H] and weight [H] expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rms_norm: float32 or bfloat16 expected, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight ", weight.scalar_type(), " and x ",
              x.scalar_type(), " differ");
  TORCH_CHECK(!residual.has_value() || (residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type()),
              "rms_norm: the residual must match x");
  x = x.contiguous();
  weight = weight.contiguous();
  if (residual.has_value()) residual = residual->contiguous();
  torch::Tensor out = torch::empty_like(x);
  torch::Tensor sum = residual.has_value() ? torch::empty_like(x) : x;
  if (x.scalar_type() == at::kFloat) rms_norm_typed<float>(x, residual, weight, out, sum, static_cast<float>(eps));
  else rms_norm_typed<at::BFloat16>(x, residual, weight, out, sum, static_cast<float>(eps));
  return {out, sum};
}

// Rotates, in place, the first `rotary_dim` dims of each head of `heads` ([T, H, D], rows of one token may be
// strided) by cos/sin [T, rotary_dim] (the halves of a head rotated as Hugging Face's rotate_half does):
// out = X(X(x * cos) + X(rotate_half(x) * sin)), each product rounded to X as torch's elementwise ops round.
template <typename X>
static void rotate_typed(torch::Tensor& heads, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t tokens = heads.size(0), num_heads = heads.size(1), half = cos.size(1) / 2;
  const int64_t token_stride = heads.stride(0), head_stride = heads.stride(1);
  X* base = heads.data_ptr<X>();
  const X* cos_ptr = cos.data_ptr<X>();
  const X* sin_ptr = sin.data_ptr<X>();
  at::parallel_for(0, tokens * num_heads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t token = item / num_heads;
      X* head = base + token * token_stride + (item % num_heads) * head_stride;
      const X* c = cos_ptr + token * 2 * half;
      const X* s = sin_ptr + token * 2 * half;
      for (int64_t i = 0; i < half; ++i) {
        const float first = widen_value(head[i]), second = widen_value(head[i + half]);
        const float first_cos = widen_value(static_cast<X>(first * widen_value(c[i])));
        const float second_sin = widen_value(static_cast<X>(-second * widen_value(s[i])));
        const float second_cos = widen_value(static_cast<X>(second * widen_value(c[i + half])));
        const float first_sin = widen_value(static_cast<X>(first * widen_value(s[i + half])));
        head[i] = static_cast<X>(first_cos + second_sin);
        head[i + half] = static_cast<X>(second_cos + first_sin);
      }
    }
  });
}

// query [T, Hq, D] and key [T, Hkv, D] (views of one QKV row are fine: the last dim must be contiguous),
// cos/sin [T, D] in their dtype; rotated in place.
void rotary_embedding(torch::Tensor query, torch::Tensor key, torch::Tensor cos, torch::Tensor sin) {
  for (const torch::Tensor* heads : {&query, &key}) {
    TORCH_CHECK(heads->dim() == 3 && heads->stride(2) == 1 && heads->size(0) == cos.size(0) &&
                    heads->size(2) == cos.size(1) && heads->scalar_type() == cos.scalar_type(),
                "rotary_embedding: query/key [T, H, D] with contiguous heads and cos [T, D] of their dtype "
                "expected, got ", heads->sizes(), " ", heads->scalar_type(), " and ", cos.sizes(), " ",
                cos.scalar_type());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(1) % 2 == 0 && cos.is_contiguous() && sin.is_contiguous() &&
                  sin.scalar_type() == cos.scalar_type(),
              "rotary_embedding: contiguous cos and sin [T, D] with even D expected");
  TORCH_CHECK(cos.scalar_type() == at::kFloat || cos.scalar_type() == at::kBFloat16,
              "rotary_embedding: float32 or bfloat16 expected, got ", cos.scalar_type());
  for (torch::Tensor* heads : {&query, &key}) {
    if (cos.scalar_type() == at::kFloat) rotate_typed<float>(*heads, cos, sin);
    else rotate_typed<at::BFloat16>(*heads, cos, sin);
  }
}
