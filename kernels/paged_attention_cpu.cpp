// Paged decode attention on CPU (megakv.kernels.cpu_attention): K/V in fp32, bf16 or fp16, queries and all
// arithmetic in fp32, head_dim 64 or 128; and the log-sum-exp merge of partial (out, lse) pairs.
// One work item = (query, KV head, split of its blocks): an online softmax over the split's blocks for the
// query heads of that KV head, reading each K/V tile of a block in place; the splits are merged by
// log-sum-exp at the end. Slots past a query's visible length and absent blocks (id < 0) are never read, nor
// are the blocks wholly before a query's sliding window (its last `window` tokens); the block the window starts
// in is read, and its tokens before the window are left out of the softmax.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// Blocks sit in random pool order, out of the hardware prefetcher's sight, so the op prefetches into L2
// (L1's few miss buffers cap what can be in flight) the K/V tiles of blocks ahead of the one it computes.
// With several query heads per KV head the op is compute bound and whole tiles PREFETCH_AHEAD blocks on are
// fetched a slice per compute step; with one it is memory bound, and the first KICK_LINES lines of the tiles
// KICK_AHEAD blocks on start the hardware's stream, which fetches the rest faster than software can.
// (64K tokens, random order, huge pages, two threads: 0.64-0.71 of the read bandwidth at GQA 4 this way
// against 0.39-0.59 without prefetch; 0.62-0.80 at one head per KV head against 0.47-0.64 with whole tiles.)
constexpr int64_t PREFETCH_AHEAD = 8;
constexpr int64_t KICK_AHEAD = 4;
constexpr int64_t KICK_LINES = 8;

// Prefetch into L2 the first `num_lines` 64-byte lines of a block's K and V tiles.
static inline void prefetch_tiles(const void* k, const void* v, int64_t num_lines) {
  for (int64_t line = 0; line < num_lines; ++line) {
    __builtin_prefetch(static_cast<const char*>(k) + 64 * line, 0, 1);
    __builtin_prefetch(static_cast<const char*>(v) + 64 * line, 0, 1);
  }
}

// The vector width is the build's: 16 fp32 lanes (one AVX-512 register) or 8 (one AVX2 register, or a pair
// of SSE/NEON ones in the generic build). Code written for 16 lanes on an AVX2 host splits every vector in
// two and keeps 32 accumulators in 16 registers, spilling in the inner loops (5 GB/s on L3-resident KV on
// a Zen 3 host, against 80 GB/s on Zen 4); kernels/cpu_build.py picks the variant the CPU can run.
#ifndef MEGAKV_VEC_WIDTH
#error "MEGAKV_VEC_WIDTH (8 or 16) is set by kernels/cpu_build.py"
#endif
constexpr int W = MEGAKV_VEC_WIDTH;
static_assert(W == 8 || W == 16, "the lane-sum trees below exist for 8 and 16 lanes");
// Accumulators one loop keeps live: 8 vectors plus their operands fit the 16 registers of AVX2.
constexpr int MAX_ACCUMULATORS = 8;

typedef float vecf __attribute__((vector_size(4 * MEGAKV_VEC_WIDTH), aligned(4), may_alias));
typedef int veci __attribute__((vector_size(4 * MEGAKV_VEC_WIDTH)));
typedef uint16_t vecu16 __attribute__((vector_size(2 * MEGAKV_VEC_WIDTH), aligned(2), may_alias));
typedef uint32_t vecu32 __attribute__((vector_size(4 * MEGAKV_VEC_WIDTH)));

// W consecutive K/V elements widened to fp32. Half-precision caches halve the bytes a decode step reads,
// which is what bounds it.
static inline vecf loadw(const float* p) { return *reinterpret_cast<const vecf*>(p); }

static inline vecf loadw(const at::BFloat16* p) {
  // A bf16 is the upper half of the fp32 with the same value.
  const vecu32 bits = __builtin_convertvector(*reinterpret_cast<const vecu16*>(p), vecu32) << 16;
  vecf out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

#if defined(__FLT16_MAX__)
typedef _Float16 vecf16 __attribute__((vector_size(2 * MEGAKV_VEC_WIDTH), aligned(2), may_alias));
static inline vecf loadw(const at::Half* p) {
  return __builtin_convertvector(*reinterpret_cast<const vecf16*>(p), vecf);
}
#else  // compilers without _Float16 (GCC < 12 on x86): one conversion per element
static inline vecf loadw(const at::Half* p) {
  vecf out;
  for (int i = 0; i < W; ++i) out[i] = static_cast<float>(p[i]);
  return out;
}
#endif

static inline float hsum(vecf x) {
  float total = 0.f;
  for (int i = 0; i < W; ++i) total += x[i];
  return total;
}

// scores[t] = scale * q . k[t] for the block's tokens; q [D], k [num_tokens, D].
template <int D, typename T>
static inline void block_scores(const float* q, const T* k, float* scores, int64_t num_tokens, float scale) {
  constexpr int C = D / W;
  int64_t t = 0;
  for (; t + 4 <= num_tokens; t += 4) {
    vecf a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const T* k0 = k + t * D;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const vecf qc = loadw(q + W * c);
      a0 += qc * loadw(k0 + W * c);
      a1 += qc * loadw(k0 + D + W * c);
      a2 += qc * loadw(k0 + 2 * D + W * c);
      a3 += qc * loadw(k0 + 3 * D + W * c);
    }
    scores[t] = hsum(a0) * scale;
    scores[t + 1] = hsum(a1) * scale;
    scores[t + 2] = hsum(a2) * scale;
    scores[t + 3] = hsum(a3) * scale;
  }
  for (; t < num_tokens; ++t) {
    vecf a0 = {};
    for (int c = 0; c < C; ++c) a0 += loadw(q + W * c) * loadw(k + t * D + W * c);
    scores[t] = hsum(a0) * scale;
  }
}

// Lanes i of x and y -> lanes of the result by the mask (0..W-1 pick from x, W..2W-1 from y).
#define SHUFFLE(x, y, ...) __builtin_shuffle(x, y, (veci){__VA_ARGS__})

// The W lane sums of a[0..W-1] as one vector (lane t = sum of a[t]), by a transpose-and-add tree:
// log2(W) levels of shuffles and adds instead of W separate horizontal sums.
static inline vecf lane_sums(const vecf* a) {
#if MEGAKV_VEC_WIDTH == 16
  vecf c[8], d[4], e[2];
  for (int t = 0; t < 8; ++t)
    c[t] = SHUFFLE(a[t], a[t + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE(a[t], a[t + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int t = 0; t < 4; ++t)
    d[t] = SHUFFLE(c[t], c[t + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           SHUFFLE(c[t], c[t + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int t = 0; t < 2; ++t)
    e[t] = SHUFFLE(d[t], d[t + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           SHUFFLE(d[t], d[t + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return SHUFFLE(e[0], e[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         SHUFFLE(e[0], e[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
#else
  // Lanes 0-3 of c[t] hold partial sums of a[t], lanes 4-7 those of a[t + 4]; d[t] pairs of lanes of
  // a[t], a[t + 2], a[t + 4], a[t + 6]; the last level leaves a[t]'s sum in lane t.
  vecf c[4], d[2];
  for (int t = 0; t < 4; ++t)
    c[t] = SHUFFLE(a[t], a[t + 4], 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(a[t], a[t + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int t = 0; t < 2; ++t)
    d[t] = SHUFFLE(c[t], c[t + 2], 0, 1, 8, 9, 4, 5, 12, 13) + SHUFFLE(c[t], c[t + 2], 2, 3, 10, 11, 6, 7, 14, 15);
  return SHUFFLE(d[0], d[1], 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE(d[0], d[1], 1, 9, 3, 11, 5, 13, 7, 15);
#endif
}

// scores[0..W-1] = scale * q . k[t] for W consecutive tokens; q [D], k [W, D]. Tokens past the visible
// length still lie inside the block and only fill lanes nobody reads.
template <int D, typename T>
static inline void block_scores_run(const float* q, const T* k, float* scores, float scale) {
  constexpr int C = D / W;
  vecf acc[W];
  for (int t = 0; t < W; ++t) acc[t] = vecf{};
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    const vecf qc = loadw(q + W * c);
#pragma GCC unroll 16
    for (int t = 0; t < W; ++t) acc[t] += qc * loadw(k + t * D + W * c);
  }
  *reinterpret_cast<vecf*>(scores) = lane_sums(acc) * scale;
}

// acc[D] = acc * correction + sum_t p[t] * v[t]; v [num_tokens, D]. A row wider than MAX_ACCUMULATORS
// vectors (D 128 at 8 lanes) is done in column passes; the later passes read the tile from L1.
template <int D, typename T>
static inline void block_accumulate(const float* p, const T* v, float* acc, float correction, int64_t num_tokens) {
  constexpr int C = D / W;
  constexpr int P = C < MAX_ACCUMULATORS ? C : MAX_ACCUMULATORS;
  static_assert(C % P == 0, "column passes must tile the row");
  for (int first = 0; first < C; first += P) {
    vecf a[P];
    for (int c = 0; c < P; ++c) a[c] = loadw(acc + W * (first + c)) * correction;
    for (int64_t t = 0; t < num_tokens; ++t) {
      const float weight = p[t];
#pragma GCC unroll 8
      for (int c = 0; c < P; ++c) a[c] += weight * loadw(v + t * D + W * (first + c));
    }
    for (int c = 0; c < P; ++c) *reinterpret_cast<vecf*>(acc + W * (first + c)) = a[c];
  }
}

template <int D, typename T>
std::vector<torch::Tensor> paged_attention_impl(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                                           torch::Tensor block_tables, torch::Tensor query_seq,
                                           torch::Tensor query_visible, double scale, int64_t blocks_per_split,
                                           int64_t num_splits, int64_t window) {
  const int64_t num_queries = query.size(0), num_q_heads = query.size(1), head_dim = D;
  const int64_t num_kv_heads = key_cache.size(1), block_size = key_cache.size(2);
  const int64_t group = num_q_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const float* q_ptr = query.data_ptr<float>();
  const T* k_ptr = key_cache.data_ptr<T>();
  const T* v_ptr = value_cache.data_ptr<T>();
  const int32_t* table_ptr = block_tables.data_ptr<int32_t>();
  const int32_t* seq_ptr = query_seq.data_ptr<int32_t>();
  const int32_t* visible_ptr = query_visible.data_ptr<int32_t>();
  auto options = query.options();
  // Unnormalised partial outputs, running maxima and sums per split.
  auto acc_all = torch::empty({num_splits, num_queries, num_q_heads, head_dim}, options);
  auto max_all = torch::empty({num_splits, num_queries, num_q_heads}, options);
  auto sum_all = torch::empty({num_splits, num_queries, num_q_heads}, options);
  float* acc_base = acc_all.data_ptr<float>();
  float* max_base = max_all.data_ptr<float>();
  float* sum_base = sum_all.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, num_queries * num_kv_heads * num_splits, 1, [&](int64_t begin, int64_t end) {
    // The running state lives in this thread's buffers and is written out once per work item: the rows of
    // neighbouring items share cache lines, and updating them in place every block ping-pongs those lines
    // between cores (it made two threads slower than one).
    std::vector<float> scores(group * block_size), acc(group * head_dim), run_max(group), run_sum(group);
    for (int64_t work = begin; work < end; ++work) {
      const int64_t split = work % num_splits, kv_head = (work / num_splits) % num_kv_heads;
      const int64_t q_index = work / (num_splits * num_kv_heads);
      const int64_t seq = seq_ptr[q_index], visible = visible_ptr[q_index];
      const int64_t num_blocks = std::min<int64_t>((visible + block_size - 1) / block_size, max_blocks);
      // Splits cover the blocks from the window's first on: those before it are never read.
      const int64_t window_start = std::max<int64_t>(0, visible - window);
      const int64_t first = window_start / block_size + split * blocks_per_split;
      const int64_t last = std::min(num_blocks, first + blocks_per_split);
      const int64_t row = (split * num_queries + q_index) * num_q_heads + kv_head * group;
      const float* q = q_ptr + (q_index * num_q_heads + kv_head * group) * head_dim;
      for (int64_t g = 0; g < group; ++g) {
        run_max[g] = -1e30f;
        run_sum[g] = 0.f;
        for (int64_t d = 0; d < head_dim; ++d) acc[g * head_dim + d] = 0.f;
      }
      const int64_t tile_elements = block_size * head_dim;
      const int64_t tile_lines = tile_elements * static_cast<int64_t>(sizeof(T)) / 64;
      const bool stream = group == 1;
      const int64_t kick_lines = std::min(KICK_LINES, tile_lines);
      const int64_t ahead = stream ? KICK_AHEAD : PREFETCH_AHEAD;
      auto tile_of = [&](const T* base, int64_t block_id) {
        return base + (block_id * num_kv_heads + kv_head) * tile_elements;
      };
      // The loop below fetches `ahead` blocks on; the first ones are requested now, at once: a stall here is
      // paid once per work item, and costs less than computing those blocks from cold memory.
      for (int64_t b = first; b < std::min(last, first + ahead); ++b) {
        const int64_t block_id = table_ptr[seq * max_blocks + b];
        if (block_id >= 0)
          prefetch_tiles(tile_of(k_ptr, block_id), tile_of(v_ptr, block_id), stream ? kick_lines : tile_lines);
      }
      for (int64_t b = first; b < last; ++b) {
        const int64_t block_id = table_ptr[seq * max_blocks + b];
        const int64_t next_id = b + ahead < last ? table_ptr[seq * max_blocks + b + ahead] : -1;
        if (stream && next_id >= 0) prefetch_tiles(tile_of(k_ptr, next_id), tile_of(v_ptr, next_id), kick_lines);
        if (block_id < 0) continue;
        const int64_t num_tokens = std::min(block_size, visible - b * block_size);
        // Tokens [skip, num_tokens) of the block are in the window; skip > 0 only in the block it starts in.
        const int64_t skip = std::max<int64_t>(0, window_start - b * block_size);
        const T* k = tile_of(k_ptr, block_id);
        const T* v = tile_of(v_ptr, block_id);
        const char* next_k = !stream && next_id >= 0 ? reinterpret_cast<const char*>(tile_of(k_ptr, next_id)) : nullptr;
        const char* next_v = next_k != nullptr ? reinterpret_cast<const char*>(tile_of(v_ptr, next_id)) : nullptr;
        const int64_t slice_lines = (tile_lines + group - 1) / group;
        int64_t fetched = 0;
        // A slice of the whole-tile prefetch per compute step (2 x group of them per block): issued at once it
        // would stall on the miss buffers.
        auto prefetch_slice = [&]() {
          if (next_k == nullptr) return;
          const int64_t stop = std::min(fetched + slice_lines, 2 * tile_lines);
          for (; fetched < stop; ++fetched)
            __builtin_prefetch(fetched < tile_lines ? next_k + 64 * fetched : next_v + 64 * (fetched - tile_lines), 0,
                               1);
        };
        // Whole W-token runs through the lane-sum tree; a block size that is no multiple of W ends token by token.
        const int64_t num_runs = std::min((num_tokens + W - 1) / W, block_size / W);
        for (int64_t g = 0; g < group; ++g) {
          prefetch_slice();
          float* s = scores.data() + g * block_size;
          for (int64_t run = 0; run < num_runs; ++run)
            block_scores_run<D, T>(q + g * D, k + run * W * D, s + run * W, fscale);
          if (num_tokens > num_runs * W)
            block_scores<D, T>(q + g * D, k + num_runs * W * D, s + num_runs * W, num_tokens - num_runs * W, fscale);
        }
        for (int64_t g = 0; g < group; ++g) {
          prefetch_slice();
          float* s = scores.data() + g * block_size;
          float block_max = run_max[g];
          for (int64_t t = skip; t < num_tokens; ++t) block_max = std::max(block_max, s[t]);
          const float correction = std::exp(run_max[g] - block_max);
          float block_sum = 0.f;
          for (int64_t t = skip; t < num_tokens; ++t) {
            s[t] = std::exp(s[t] - block_max);
            block_sum += s[t];
          }
          run_sum[g] = run_sum[g] * correction + block_sum;
          run_max[g] = block_max;
          block_accumulate<D, T>(s + skip, v + skip * D, acc.data() + g * D, correction, num_tokens - skip);
        }
      }
      std::copy(acc.begin(), acc.end(), acc_base + row * head_dim);
      std::copy(run_max.begin(), run_max.end(), max_base + row);
      std::copy(run_sum.begin(), run_sum.end(), sum_base + row);
    }
  });
  auto out = torch::empty({num_queries, num_q_heads, head_dim}, options);
  auto lse = torch::empty({num_queries, num_q_heads}, options);
  float* out_base = out.data_ptr<float>();
  float* lse_base = lse.data_ptr<float>();
  const int64_t num_rows = num_queries * num_q_heads;
  at::parallel_for(0, num_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float merged_max = -1e30f;
      for (int64_t j = 0; j < num_splits; ++j)
        if (sum_base[j * num_rows + r] > 0.f) merged_max = std::max(merged_max, max_base[j * num_rows + r]);
      float total = 0.f;
      float* out_row = out_base + r * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) out_row[d] = 0.f;
      for (int64_t j = 0; j < num_splits; ++j) {
        const float partial_sum = sum_base[j * num_rows + r];
        if (!(partial_sum > 0.f)) continue;
        const float weight = std::exp(max_base[j * num_rows + r] - merged_max);
        total += partial_sum * weight;
        const float* acc_row = acc_base + (j * num_rows + r) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) out_row[d] += weight * acc_row[d];
      }
      if (total > 0.f) {
        const float inv = 1.f / total;
        for (int64_t d = 0; d < head_dim; ++d) out_row[d] *= inv;
        lse_base[r] = merged_max + std::log(total);
      } else {
        lse_base[r] = -std::numeric_limits<float>::infinity();
      }
    }
  });
  return {out, lse};
}

template <typename T>
std::vector<torch::Tensor> paged_attention_typed(torch::Tensor query, torch::Tensor key_cache,
                                                 torch::Tensor value_cache, torch::Tensor block_tables,
                                                 torch::Tensor query_seq, torch::Tensor query_visible, double scale,
                                                 int64_t blocks_per_split, int64_t num_splits, int64_t window) {
  if (query.size(2) == 64)
    return paged_attention_impl<64, T>(query, key_cache, value_cache, block_tables, query_seq, query_visible, scale,
                                       blocks_per_split, num_splits, window);
  TORCH_CHECK(query.size(2) == 128, "paged_attention: head_dim must be 64 or 128");
  return paged_attention_impl<128, T>(query, key_cache, value_cache, block_tables, query_seq, query_visible, scale,
                                      blocks_per_split, num_splits, window);
}

std::vector<torch::Tensor> paged_attention(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                                           torch::Tensor block_tables, torch::Tensor query_seq,
                                           torch::Tensor query_visible, double scale, int64_t blocks_per_split,
                                           int64_t num_splits, int64_t window) {
  TORCH_CHECK(window > 0, "paged_attention: the window must be positive");
  TORCH_CHECK(query.scalar_type() == torch::kFloat, "paged_attention: the query must be float32");
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), "paged_attention: K and V dtypes differ");
  switch (key_cache.scalar_type()) {
    case torch::kFloat:
      return paged_attention_typed<float>(query, key_cache, value_cache, block_tables, query_seq, query_visible,
                                          scale, blocks_per_split, num_splits, window);
    case torch::kBFloat16:
      return paged_attention_typed<at::BFloat16>(query, key_cache, value_cache, block_tables, query_seq,
                                                 query_visible, scale, blocks_per_split, num_splits, window);
    case torch::kHalf:
      return paged_attention_typed<at::Half>(query, key_cache, value_cache, block_tables, query_seq, query_visible,
                                             scale, blocks_per_split, num_splits, window);
    default:
      TORCH_CHECK(false, "paged_attention: K/V must be float32, bfloat16 or float16");
  }
}

// One row's merge of partials by log-sum-exp: out_row = sum_j w_j outs[j] / sum_j w_j with w_j = exp(lses[j] - max),
// lse = max + log(sum_j w_j). An empty partial has lse -inf and weight 0; a row no partial saw gets out 0 and
// lse -inf. The order of the partials is the order of the sums, so merge_partials and kv_merge_answers
// (kv_server_cpu.cpp) agree to the bit over the same partials.
static inline void merge_row(const float* const* outs, const float* lses, int64_t num_partials, int64_t head_dim,
                             float* out_row, float* lse) {
  // A finite floor rather than -inf: -ffast-math lets the compiler assume no infinities in comparisons.
  float merged_max = -1e30f;
  for (int64_t j = 0; j < num_partials; ++j) merged_max = std::max(merged_max, lses[j]);
  for (int64_t d = 0; d < head_dim; ++d) out_row[d] = 0.f;
  if (!(merged_max > -1e30f)) {
    *lse = -std::numeric_limits<float>::infinity();
    return;
  }
  float total = 0.f;
  for (int64_t j = 0; j < num_partials; ++j) {
    const float weight = std::exp(lses[j] - merged_max);
    if (weight == 0.f) continue;
    total += weight;
    for (int64_t d = 0; d < head_dim; ++d) out_row[d] += weight * outs[j][d];
  }
  const float inv = 1.f / total;
  for (int64_t d = 0; d < head_dim; ++d) out_row[d] *= inv;
  *lse = merged_max + std::log(total);
}

// outs [P, N, H, D], lses [P, N, H] (fp32, contiguous) -> out [N, H, D], lse [N, H]. One call instead of the ten
// small torch ops of the reference: a remote decode step merges every layer on its critical path.
std::vector<torch::Tensor> merge_partials(torch::Tensor outs, torch::Tensor lses) {
  TORCH_CHECK(outs.dim() == 4 && lses.dim() == 3 && lses.size(0) == outs.size(0) && lses.size(1) == outs.size(1) &&
                  lses.size(2) == outs.size(2) && outs.is_contiguous() && lses.is_contiguous() &&
                  outs.scalar_type() == torch::kFloat && lses.scalar_type() == torch::kFloat,
              "merge_partials: outs [P, N, H, D] and lses [P, N, H] must be contiguous float32");
  const int64_t num_partials = outs.size(0), num_rows = outs.size(1) * outs.size(2), head_dim = outs.size(3);
  auto out = torch::empty({outs.size(1), outs.size(2), head_dim}, outs.options());
  auto lse = torch::empty({outs.size(1), outs.size(2)}, lses.options());
  const float* outs_base = outs.data_ptr<float>();
  const float* lses_base = lses.data_ptr<float>();
  float* out_base = out.data_ptr<float>();
  float* lse_base = lse.data_ptr<float>();
  std::vector<const float*> row_outs(num_partials);
  std::vector<float> row_lses(num_partials);
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t j = 0; j < num_partials; ++j) {
      row_outs[j] = outs_base + (j * num_rows + r) * head_dim;
      row_lses[j] = lses_base[j * num_rows + r];
    }
    merge_row(row_outs.data(), row_lses.data(), num_partials, head_dim, out_base + r * head_dim, lse_base + r);
  }
  return {out, lse};
}

// key/value [T, Hkv, D] -> the caches [num_blocks, Hkv, block_size, D] at slot_mapping [T] (block * block_size +
// offset; < 0 skips the token). One call instead of the eight small torch ops of the reference: every layer of
// every step stores its new tokens, and a KV server stores a debtor's on the debtor's critical path.
void store_kv(torch::Tensor key, torch::Tensor value, torch::Tensor key_cache, torch::Tensor value_cache,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key_cache.dim() == 4 &&
                  value_cache.sizes() == key_cache.sizes() && key.size(1) == key_cache.size(1) &&
                  key.size(2) == key_cache.size(3) && slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0),
              "store_kv: key/value [T, Hkv, D], caches [num_blocks, Hkv, block_size, D] and slot_mapping [T]");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == key_cache.scalar_type() &&
                  value_cache.scalar_type() == key_cache.scalar_type() && slot_mapping.scalar_type() == torch::kLong,
              "store_kv: key, value and caches share one dtype, and slot_mapping is int64");
  TORCH_CHECK(key.is_contiguous() && value.is_contiguous() && key_cache.is_contiguous() &&
                  value_cache.is_contiguous() && slot_mapping.is_contiguous(),
              "store_kv: every tensor must be contiguous");
  const int64_t num_tokens = key.size(0), num_heads = key.size(1), head_dim = key.size(2);
  const int64_t block_size = key_cache.size(2), num_slots = key_cache.size(0) * block_size;
  const int64_t row_bytes = head_dim * key.element_size();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const char* key_base = static_cast<const char*>(key.data_ptr());
  const char* value_base = static_cast<const char*>(value.data_ptr());
  char* key_cache_base = static_cast<char*>(key_cache.data_ptr());
  char* value_cache_base = static_cast<char*>(value_cache.data_ptr());
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK(slots[t] < num_slots, "store_kv: slot ", slots[t], " is beyond the cache's ", num_slots, " slots");
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slots[t] < 0) continue;
    const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t src = (t * num_heads + h) * row_bytes;
      const int64_t dst = ((block * num_heads + h) * block_size + offset) * row_bytes;
      std::memcpy(key_cache_base + dst, key_base + src, row_bytes);
      std::memcpy(value_cache_base + dst, value_base + src, row_bytes);
    }
  }
}
