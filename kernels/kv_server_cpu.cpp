// The KV server's loop on the CPU (megakv.distkv.remote_attention.KVServer), built into the same module as the
// paged-attention op, after it. A remote micro-attention is a round trip on the asking instance's critical path
// at every layer; in Python, reading a request and storing and attending took the creditor 330 us per layer of a
// 2K decode step, against 130 us for the attention itself. Here the whole loop runs without the GIL, so it also
// never waits for the creditor's own step to let go of it.
//
// Wire format (megakv.distkv.remote_attention): a request is a header of 4 int64 (kind, layer, metadata bytes,
// payload bytes), the metadata as int64, then the payload. A query's metadata, sent with the first layer of each
// of the debtor's steps, is [num_seqs, num_writes, width, window (-1: none)], the write slots, query_start_loc,
// context_lens and the block tables [num_seqs x width] (-1 where a block lives elsewhere); its payload is the
// queries [Q, Hq, D], then the new keys and values [num_writes, Hkv, D], in the cache's dtype. The answer is out
// [Q, Hq, D] then lse [Q, Hq], in fp32. A fetch's metadata is the block ids; its answer the blocks
// [2, layers, n, Hkv, block_size, D]. A stop has neither, and ends what that link asks. A link that ends
// without a stop means its rank died, and one that stalls mid-message or mid-answer for the peer timeout
// means it hung or was cut off: either way the link is shut and the other links go on (a cluster's members
// fail alone). kv_serve returns the names of the ranks it lost that way; the asking side reports which
// creditors failed to answer, and merges the partials of those that did.
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>

namespace {

constexpr int64_t kQuery = 0, kFetch = 1, kStop = 2;
constexpr int64_t kNoWindow = int64_t{1} << 30;
// How long the asking side polls for an answer before it blocks. Waking a blocked thread costs 20-50 us on a
// virtual machine, a third of what a remote layer may add to a small model's decode step; an answer is due
// within about the creditor's micro-attention after the local one, and a poll bounded this short costs an
// idle instance nothing (nothing is asked of it). Each round yields the core, to the creditor itself when
// the two share one.
constexpr auto kAnswerPoll = std::chrono::microseconds(200);

using Clock = std::chrono::steady_clock;

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

// Wait until ``fd`` is ready for ``events`` (or has hung up: the next call says so); false once ``deadline``
// passes.
bool wait_ready(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd ready{fd, events, 0};
    const int result = ::poll(&ready, 1, static_cast<int>(std::max<int64_t>(0, left)));
    if (result > 0) return true;
    if (result == 0 || errno != EINTR) return false;
  }
}

// One debtor's link, and the plan of its current step.
struct Debtor {
  int fd;
  std::string name;
  bool open = true;
  bool has_plan = false;
  int64_t num_queries = 0, num_writes = 0, max_visible = 0, window = kNoWindow;
  torch::Tensor tables, query_seq, query_visible, slots;
};

// Fill ``data`` from the link; false if it ends, fails, or stalls past ``deadline``.
bool receive_all(int fd, char* data, size_t size, Clock::time_point deadline) {
  while (size > 0) {
    const ssize_t received = ::recv(fd, data, size, MSG_DONTWAIT);
    if (received > 0) {
      data += received;
      size -= static_cast<size_t>(received);
    } else if (received == 0) {
      return false;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (!wait_ready(fd, POLLIN, deadline)) return false;
    } else if (errno != EINTR) {
      return false;
    }
  }
  return true;
}

// Send the parts back to back; false if the link fails, or its peer stops reading until ``deadline``.
bool send_all(int fd, std::vector<iovec> parts, Clock::time_point deadline) {
  size_t first = 0;
  while (first < parts.size()) {
    msghdr message{};
    message.msg_iov = parts.data() + first;
    message.msg_iovlen = parts.size() - first;
    ssize_t sent = ::sendmsg(fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (!wait_ready(fd, POLLOUT, deadline)) return false;
      } else if (errno != EINTR) {
        return false;
      }
      continue;
    }
    while (first < parts.size() && static_cast<size_t>(sent) >= parts[first].iov_len) {
      sent -= static_cast<ssize_t>(parts[first].iov_len);
      ++first;
    }
    if (first < parts.size()) {
      parts[first].iov_base = static_cast<char*>(parts[first].iov_base) + sent;
      parts[first].iov_len -= static_cast<size_t>(sent);
    }
  }
  return true;
}

void set_plan(Debtor& debtor, const std::vector<int64_t>& metadata) {
  TORCH_CHECK(metadata.size() >= 4, "KV server: a query's metadata is too short");
  const int64_t num_seqs = metadata[0], num_writes = metadata[1], width = metadata[2];
  TORCH_CHECK(num_seqs >= 0 && num_writes >= 0 && width >= 0 &&
                  static_cast<int64_t>(metadata.size()) == 4 + num_writes + 2 * num_seqs + 1 + num_seqs * width,
              "KV server: a query's metadata does not hold what its header says");
  const int64_t* slots = metadata.data() + 4;
  const int64_t* query_start_loc = slots + num_writes;
  const int64_t* context_lens = query_start_loc + num_seqs + 1;
  const int64_t* tables = context_lens + num_seqs;
  debtor.num_writes = num_writes;
  debtor.num_queries = query_start_loc[num_seqs];
  debtor.window = metadata[3] < 0 ? kNoWindow : metadata[3];
  debtor.slots = torch::from_blob(const_cast<int64_t*>(slots), {num_writes}, torch::kLong).clone();
  debtor.tables = torch::from_blob(const_cast<int64_t*>(tables), {num_seqs, width}, torch::kLong).to(torch::kInt);
  // Per query, its sequence and how many context tokens it sees: the last query of a sequence sees the whole
  // context, each earlier one a token less (megakv.kernels.micro_attention.query_layout_lists).
  debtor.query_seq = torch::empty({debtor.num_queries}, torch::kInt);
  debtor.query_visible = torch::empty({debtor.num_queries}, torch::kInt);
  int32_t* seq_of = debtor.query_seq.data_ptr<int32_t>();
  int32_t* visible = debtor.query_visible.data_ptr<int32_t>();
  debtor.max_visible = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t num_seq_queries = query_start_loc[s + 1] - query_start_loc[s];
    for (int64_t j = 0; j < num_seq_queries; ++j) {
      const int64_t q = query_start_loc[s] + j;
      seq_of[q] = static_cast<int32_t>(s);
      visible[q] = static_cast<int32_t>(context_lens[s] - num_seq_queries + 1 + j);
      debtor.max_visible = std::max<int64_t>(debtor.max_visible, visible[q]);
    }
  }
  debtor.has_plan = true;
}

// Store a debtor's new K/V, attend its queries and send the partials; false if the answer could not leave by
// ``deadline``.
bool answer_query(Debtor& debtor, int64_t layer, const std::vector<char>& payload, const torch::Tensor& key_cache,
                  const torch::Tensor& value_cache, int64_t num_q_heads, double scale, Clock::time_point deadline) {
  TORCH_CHECK(debtor.has_plan, "KV server: ", debtor.name, " asked before sending its step's plan");
  const int64_t num_kv_heads = key_cache.size(2), block_size = key_cache.size(3), head_dim = key_cache.size(4);
  const int64_t query_size = debtor.num_queries * num_q_heads * head_dim;
  const int64_t kv_size = debtor.num_writes * num_kv_heads * head_dim;
  const int64_t element = key_cache.element_size();
  TORCH_CHECK(static_cast<int64_t>(payload.size()) == (query_size + 2 * kv_size) * element,
              "KV server: a query's payload does not fit its plan");
  const auto options = key_cache.options();
  char* data = const_cast<char*>(payload.data());
  auto query = torch::from_blob(data, {debtor.num_queries, num_q_heads, head_dim}, options);
  auto key = torch::from_blob(data + query_size * element, {debtor.num_writes, num_kv_heads, head_dim}, options);
  auto value = torch::from_blob(data + (query_size + kv_size) * element, {debtor.num_writes, num_kv_heads, head_dim},
                                options);
  auto layer_keys = key_cache.select(0, layer);
  auto layer_values = value_cache.select(0, layer);
  store_kv(key, value, layer_keys, layer_values, debtor.slots);
  torch::Tensor out, lse;
  if (debtor.num_queries == 0 || debtor.max_visible <= 0) {
    out = torch::zeros({debtor.num_queries, num_q_heads, head_dim}, torch::kFloat);
    lse = torch::full({debtor.num_queries, num_q_heads}, -std::numeric_limits<float>::infinity(), torch::kFloat);
  } else {
    // The split of the blocks over threads that megakv.kernels.cpu_attention._decode_extension makes.
    int64_t max_blocks = (debtor.max_visible + block_size - 1) / block_size;
    if (debtor.window != kNoWindow)
      max_blocks = std::min(max_blocks, (debtor.window + block_size - 1) / block_size + 1);
    const int64_t num_items = debtor.num_queries * num_kv_heads;
    int64_t num_splits = std::max<int64_t>(
        1, std::min<int64_t>((4 * at::get_num_threads() + num_items - 1) / num_items, max_blocks / 32));
    const int64_t blocks_per_split = std::max<int64_t>(1, (max_blocks + num_splits - 1) / num_splits);
    num_splits = std::max<int64_t>(1, (max_blocks + blocks_per_split - 1) / blocks_per_split);
    auto partials = paged_attention(query.to(torch::kFloat).contiguous(), layer_keys, layer_values, debtor.tables,
                                    debtor.query_seq, debtor.query_visible, scale, blocks_per_split, num_splits,
                                    debtor.window);
    out = partials[0];
    lse = partials[1];
  }
  return send_all(debtor.fd, {{out.data_ptr(), static_cast<size_t>(out.numel()) * sizeof(float)},
                              {lse.data_ptr(), static_cast<size_t>(lse.numel()) * sizeof(float)}},
                  deadline);
}

bool answer_fetch(const Debtor& debtor, const std::vector<int64_t>& block_ids, const torch::Tensor& key_cache,
                  const torch::Tensor& value_cache, Clock::time_point deadline) {
  auto ids = torch::from_blob(const_cast<int64_t*>(block_ids.data()), {static_cast<int64_t>(block_ids.size())},
                              torch::kLong);
  auto blocks = torch::stack({key_cache.index_select(1, ids), value_cache.index_select(1, ids)}).contiguous();
  return send_all(debtor.fd, {{blocks.data_ptr(), static_cast<size_t>(blocks.numel() * blocks.element_size())}},
                  deadline);
}

}  // namespace

// Answer every link in ``fds`` (the debtor rank of each named in ``names``) until each has sent its stop or is
// lost: its link ended without a stop, or stalled mid-request for ``timeout`` seconds (the link is then shut).
// Returns the names of the lost ones. key_cache/value_cache: [layers, num_blocks, Hkv, block_size, D],
// contiguous; head_dim 64 or 128.
std::vector<std::string> kv_serve(std::vector<int64_t> fds, std::vector<std::string> names, torch::Tensor key_cache,
                                  torch::Tensor value_cache, int64_t num_q_heads, double scale, double timeout) {
  TORCH_CHECK(fds.size() == names.size(), "kv_serve: one name per link");
  TORCH_CHECK(key_cache.dim() == 5 && value_cache.sizes() == key_cache.sizes() && key_cache.is_contiguous() &&
                  value_cache.is_contiguous() && value_cache.scalar_type() == key_cache.scalar_type(),
              "kv_serve: the caches must be contiguous [layers, num_blocks, Hkv, block_size, D] of one dtype");
  pybind11::gil_scoped_release no_gil;
  std::vector<Debtor> debtors;
  for (size_t i = 0; i < fds.size(); ++i) debtors.push_back({static_cast<int>(fds[i]), names[i]});
  size_t num_open = debtors.size();
  std::vector<std::string> lost;
  std::vector<char> payload;
  std::vector<int64_t> metadata;
  std::vector<pollfd> waiting;
  std::vector<Debtor*> waiting_debtors;
  const auto close = [&](Debtor& debtor, bool is_lost) {
    debtor.open = false;
    --num_open;
    if (is_lost) {
      ::shutdown(debtor.fd, SHUT_RDWR);
      lost.push_back(debtor.name);
    }
  };
  while (num_open > 0) {
    waiting.clear();
    waiting_debtors.clear();
    for (auto& debtor : debtors) {
      if (!debtor.open) continue;
      waiting.push_back({debtor.fd, POLLIN, 0});
      waiting_debtors.push_back(&debtor);
    }
    if (::poll(waiting.data(), waiting.size(), -1) < 0) {
      TORCH_CHECK(errno == EINTR, "KV server: poll failed: ", std::strerror(errno));
      continue;
    }
    for (size_t i = 0; i < waiting.size(); ++i) {
      if (waiting[i].revents == 0) continue;
      Debtor& debtor = *waiting_debtors[i];
      const auto deadline = deadline_after(timeout);
      int64_t header[4];
      if (!receive_all(debtor.fd, reinterpret_cast<char*>(header), sizeof(header), deadline)) {
        close(debtor, true);
        continue;
      }
      const int64_t kind = header[0], layer = header[1], metadata_size = header[2], payload_size = header[3];
      if (kind == kStop) {
        close(debtor, false);
        continue;
      }
      TORCH_CHECK((kind == kQuery || kind == kFetch) && metadata_size % 8 == 0 && metadata_size >= 0 &&
                      payload_size >= 0 && layer >= 0 && layer < key_cache.size(0),
                  "KV server: ", debtor.name, " sent a request this server does not know");
      metadata.resize(metadata_size / 8);
      payload.resize(payload_size);
      bool answered = receive_all(debtor.fd, reinterpret_cast<char*>(metadata.data()), metadata_size, deadline) &&
                      receive_all(debtor.fd, payload.data(), payload_size, deadline);
      if (answered && kind == kFetch) {
        answered = answer_fetch(debtor, metadata, key_cache, value_cache, deadline);
      } else if (answered) {
        if (metadata_size > 0) set_plan(debtor, metadata);
        answered = answer_query(debtor, layer, payload, key_cache, value_cache, num_q_heads, scale, deadline);
      }
      if (!answered) close(debtor, true);
    }
  }
  return lost;
}

// The asking side's end of a layer: receive each creditor's answer on ``fds`` (the creditor ranks named in
// ``names``) for the batch rows in ``rows`` (ascending), and merge them with the local partial local_out
// [N, Hq, D] and local_lse [N, Hq] (fp32, contiguous) by log-sum-exp, local first and then the creditors in
// order, exactly as merge_partials does over the stacked partials (a row a creditor did not see weighs 0).
// A creditor whose answer has not come ``timeout`` seconds after the call, or whose link ended, is left out of
// the merge; the third tensor says which answered (bool [num_creditors]). Waiting and merging hold no GIL: the
// instance's own KV server thread may answer meanwhile.
std::vector<torch::Tensor> kv_merge_answers(std::vector<int64_t> fds, std::vector<std::string> names,
                                            std::vector<std::vector<int64_t>> rows, torch::Tensor local_out,
                                            torch::Tensor local_lse, double timeout) {
  TORCH_CHECK(fds.size() == names.size() && fds.size() == rows.size(),
              "kv_merge_answers: one name and rows per link");
  TORCH_CHECK(local_out.dim() == 3 && local_lse.dim() == 2 && local_lse.size(0) == local_out.size(0) &&
                  local_lse.size(1) == local_out.size(1) && local_out.is_contiguous() && local_lse.is_contiguous() &&
                  local_out.scalar_type() == torch::kFloat && local_lse.scalar_type() == torch::kFloat,
              "kv_merge_answers: local_out [N, Hq, D] and local_lse [N, Hq] must be contiguous float32");
  const int64_t num_rows = local_out.size(0), num_heads = local_out.size(1), head_dim = local_out.size(2);
  for (const auto& creditor_rows : rows)
    for (int64_t row : creditor_rows)
      TORCH_CHECK(0 <= row && row < num_rows, "kv_merge_answers: row ", row, " is out of range");
  auto answered = torch::zeros({static_cast<int64_t>(fds.size())}, torch::kBool);
  bool* answered_base = answered.data_ptr<bool>();
  pybind11::gil_scoped_release no_gil;
  const auto deadline = deadline_after(timeout);
  std::vector<std::vector<float>> answers(fds.size());
  for (size_t i = 0; i < fds.size(); ++i) {
    const int64_t num_answered = static_cast<int64_t>(rows[i].size());
    answers[i].resize(num_answered * num_heads * (head_dim + 1));
    const int fd = static_cast<int>(fds[i]);
    const auto poll_until = Clock::now() + kAnswerPoll;
    pollfd answer{fd, POLLIN, 0};
    while (::poll(&answer, 1, 0) == 0 && Clock::now() < poll_until) sched_yield();
    answered_base[i] = receive_all(fd, reinterpret_cast<char*>(answers[i].data()), answers[i].size() * sizeof(float),
                                   deadline);
  }
  // Per creditor that answered, per batch row: the index of that row in its answer, or -1.
  std::vector<std::vector<int64_t>> slot(fds.size(), std::vector<int64_t>(num_rows, -1));
  for (size_t i = 0; i < fds.size(); ++i)
    if (answered_base[i])
      for (size_t j = 0; j < rows[i].size(); ++j) slot[i][rows[i][j]] = static_cast<int64_t>(j);
  auto out = torch::empty_like(local_out);
  auto lse = torch::empty_like(local_lse);
  const float* local_out_base = local_out.data_ptr<float>();
  const float* local_lse_base = local_lse.data_ptr<float>();
  float* out_base = out.data_ptr<float>();
  float* lse_base = lse.data_ptr<float>();
  std::vector<const float*> partial_outs(fds.size() + 1);
  std::vector<float> partial_lses(fds.size() + 1);
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t row = r * num_heads + h;
      size_t num_partials = 0;
      partial_outs[num_partials] = local_out_base + row * head_dim;
      partial_lses[num_partials++] = local_lse_base[row];
      for (size_t i = 0; i < fds.size(); ++i) {
        const int64_t j = slot[i][r];
        if (j < 0) continue;
        const int64_t num_answered = static_cast<int64_t>(rows[i].size());
        partial_outs[num_partials] = answers[i].data() + (j * num_heads + h) * head_dim;
        partial_lses[num_partials++] = answers[i][num_answered * num_heads * head_dim + j * num_heads + h];
      }
      merge_row(partial_outs.data(), partial_lses.data(), static_cast<int64_t>(num_partials), head_dim,
                out_base + row * head_dim, lse_base + row);
    }
  }
  return {out, lse, answered};
}

// The asking side's request for one layer: the header, the metadata (the step's plan on its first layer, else
// empty) and the payload tensors, in one sendmsg from their memory. False if the link failed, or its creditor
// stopped reading for ``timeout`` seconds.
bool kv_send_query(int64_t fd, int64_t layer, std::string metadata, std::vector<torch::Tensor> payload,
                   double timeout) {
  std::vector<torch::Tensor> parts;
  int64_t payload_size = 0;
  for (const auto& tensor : payload) {
    TORCH_CHECK(tensor.device().is_cpu(), "kv_send_query: the payload must be on the CPU");
    parts.push_back(tensor.contiguous());
    payload_size += parts.back().numel() * parts.back().element_size();
  }
  int64_t header[4] = {kQuery, layer, static_cast<int64_t>(metadata.size()), payload_size};
  std::vector<iovec> message{{header, sizeof(header)}};
  if (!metadata.empty()) message.push_back({metadata.data(), metadata.size()});
  for (const auto& part : parts)
    if (part.numel() > 0) message.push_back({part.data_ptr(), static_cast<size_t>(part.numel() * part.element_size())});
  pybind11::gil_scoped_release no_gil;
  return send_all(static_cast<int>(fd), std::move(message), deadline_after(timeout));
}
