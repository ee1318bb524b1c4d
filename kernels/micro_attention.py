"""Micro-attention over rBlocks (DistKV-LLM section 4.2, DistAttention).

One micro-attention (MA) attends a batch of queries to the subset of a request's
rBlocks that live in one place, and returns the partial output together with
the log-sum-exp of the scores it saw, so that partials over disjoint block sets
merge exactly (see :mod:`megakv.kernels.merge`).

The same op serves decode (one query per request) and chunked prefill (many
queries per request, each seeing the context up to its own position).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path and the references need no triton
    triton = None

# A sequence with more queries than this is a prefill chunk: it is compute bound, so rather than the decode
# kernels, which read the K/V once per query, it takes a path that reads it once per group of queries (the
# tiled Triton kernel on GPU, a gather and torch's flash attention on CPU).
MAX_DECODE_QUERIES = 8
# Rows (queries x query heads of one KV head) of one prefill tile on the GPU.
PREFILL_TILE_ROWS = 64
# The window the kernels take for "no sliding window": longer than any context.
NO_WINDOW = 1 << 30


def visible_lengths(query_start_loc: list[int], context_lens: list[int]) -> list[torch.Tensor]:
    """Per sequence, how many context tokens each of its queries may see (causal masking)."""
    lengths = []
    for seq_index, context_len in enumerate(context_lens):
        num_queries = query_start_loc[seq_index + 1] - query_start_loc[seq_index]
        # The last query sees the whole context; each earlier one sees one token less.
        lengths.append(torch.arange(context_len - num_queries + 1, context_len + 1))
    return lengths


def micro_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over the blocks named in ``block_tables``; returns ``(out, lse)``.

    query:        [num_queries, num_q_heads, head_dim], the new tokens of every sequence, concatenated
    key_cache:    [num_blocks, num_kv_heads, block_size, head_dim] (value_cache alike)
    block_tables: [num_seqs, max_blocks] physical block ids by logical block index; an entry < 0
                  marks a block that is not part of this micro-attention (it lives elsewhere)
    query_start_loc: num_seqs + 1 offsets of each sequence's queries in ``query``
    context_lens: per sequence, the context length seen by its last query
    sliding_window: when set, a query that sees ``visible`` tokens attends only to the last
                  ``sliding_window`` of them, positions ``visible - sliding_window`` on (Mistral)
    Returns out [num_queries, num_q_heads, head_dim] in the query dtype and lse
    [num_queries, num_q_heads] in float32; a query that sees no key gets out 0 and lse -inf.
    """
    num_queries, num_q_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    group_size = num_q_heads // num_kv_heads
    out = torch.zeros(num_queries, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    lse = torch.full((num_queries, num_q_heads), float("-inf"), dtype=torch.float32, device=query.device)
    for seq_index, visible in enumerate(visible_lengths(query_start_loc, context_lens)):
        start, end = query_start_loc[seq_index], query_start_loc[seq_index + 1]
        num_seq_queries = end - start
        num_seq_blocks = -(-context_lens[seq_index] // block_size)
        if num_seq_queries == 0 or num_seq_blocks == 0:
            continue
        table = block_tables[seq_index, :num_seq_blocks].long()
        present = table >= 0
        safe_table = table.clamp(min=0)
        context_width = num_seq_blocks * block_size
        # [num_seq_blocks, Hkv, bs, D] -> [Hkv, num_seq_blocks * bs, D]
        keys = key_cache[safe_table].permute(1, 0, 2, 3).reshape(num_kv_heads, context_width, head_dim).float()
        values = value_cache[safe_table].permute(1, 0, 2, 3).reshape(num_kv_heads, context_width, head_dim).float()
        positions = torch.arange(context_width, device=query.device)
        slot_valid = present.repeat_interleave(block_size) & (positions < context_lens[seq_index])
        # Unused slots may hold garbage (even NaN): zero them so that 0 * garbage cannot leak in.
        keys = keys.masked_fill(~slot_valid[None, :, None], 0.0)
        values = values.masked_fill(~slot_valid[None, :, None], 0.0)
        # [n, Hq, D] -> [Hkv, group, n, D]
        q = query[start:end].float().view(num_seq_queries, num_kv_heads, group_size, head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(q, keys[:, None].transpose(-1, -2)) * scale  # [Hkv, group, n, ctx]
        visible = visible.to(query.device)
        allowed = slot_valid[None, :] & (positions[None, :] < visible[:, None])  # [n, ctx]
        if sliding_window is not None:
            allowed &= positions[None, :] >= visible[:, None] - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        seq_lse = torch.logsumexp(scores, dim=-1)  # [Hkv, group, n]
        finite_lse = torch.where(torch.isinf(seq_lse), torch.zeros_like(seq_lse), seq_lse)
        probs = torch.exp(scores - finite_lse[..., None])
        seq_out = torch.matmul(probs, values[:, None])  # [Hkv, group, n, D]
        out[start:end] = seq_out.permute(2, 0, 1, 3).reshape(num_seq_queries, num_q_heads, head_dim).to(query.dtype)
        lse[start:end] = seq_lse.permute(2, 0, 1).reshape(num_seq_queries, num_q_heads)
    return out, lse


def queries_per_sequence(query_start_loc: list[int]) -> list[int]:
    """How many queries each sequence has in the batch."""
    return [end - start for start, end in zip(query_start_loc[:-1], query_start_loc[1:])]


def max_window_blocks(max_visible: int, block_size: int, sliding_window: int | None) -> int:
    """The most blocks one query reads: its visible context, or the blocks its window overlaps."""
    num_blocks = -(-max_visible // block_size)
    if sliding_window is None:
        return num_blocks
    # A window that does not start on a block boundary overlaps one block more than it fills.
    return min(num_blocks, -(-sliding_window // block_size) + 1)


def query_layout_lists(query_start_loc: list[int], context_lens: list[int]) -> tuple[list[int], list[int]]:
    """Per query: the index of its sequence and how many context tokens it sees.

    Plain lists: building them costs a few microseconds, less than the tensor ops that would compute them,
    and the CPU decode path runs this per layer.
    """
    query_seq: list[int] = []
    query_visible: list[int] = []
    for seq, (context_len, num_queries) in enumerate(zip(context_lens, queries_per_sequence(query_start_loc))):
        query_seq.extend([seq] * num_queries)
        # The last query of a sequence sees the whole context; each earlier one sees one token less.
        query_visible.extend(range(context_len - num_queries + 1, context_len + 1))
    return query_seq, query_visible


def query_layout(query_start_loc: list[int], context_lens: list[int],
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`query_layout_lists` as int32 tensors [num_queries] on ``device``."""
    query_seq, query_visible = query_layout_lists(query_start_loc, context_lens)
    return (torch.tensor(query_seq, dtype=torch.int32, device=device),
            torch.tensor(query_visible, dtype=torch.int32, device=device))


def check_micro_attention_args(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, query_start_loc: list[int],
                               context_lens: list[int]) -> None:
    """Raise ValueError unless the arguments have the shapes and dtypes the kernels expect."""
    if query.dim() != 3 or key_cache.dim() != 4:
        raise ValueError(f"query must be [num_queries, Hq, D] and key_cache [num_blocks, Hkv, block_size, D]; "
                         f"got {tuple(query.shape)} and {tuple(key_cache.shape)}")
    if value_cache.shape != key_cache.shape or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"value_cache {tuple(value_cache.shape)} {value_cache.dtype} differs from key_cache "
                         f"{tuple(key_cache.shape)} {key_cache.dtype}")
    num_queries, num_q_heads, head_dim = query.shape
    _, num_kv_heads, _, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads x dim {num_q_heads}x{head_dim} do not fit KV heads x dim "
                         f"{num_kv_heads}x{cache_head_dim} (need equal dims and Hq divisible by Hkv)")
    if block_tables.dim() != 2 or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables must be a 2-D int tensor, got {tuple(block_tables.shape)} {block_tables.dtype}")
    if len(query_start_loc) != len(context_lens) + 1 or query_start_loc[-1] != num_queries:
        raise ValueError(f"query_start_loc {query_start_loc} must hold num_seqs + 1 = {len(context_lens) + 1} "
                         f"offsets ending at num_queries = {num_queries}")
    if block_tables.shape[0] < len(context_lens):
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {len(context_lens)} sequences")


if triton is not None:

    @triton.jit
    def _micro_attention_kernel(
        query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, query_seq_ptr, query_visible_ptr,
        out_ptr, lse_ptr, scale, blocks_per_split, window,
        stride_qn, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_table,
        stride_os, stride_on, stride_oh, stride_ls, stride_ln,
        GROUP: tl.constexpr, BLOCK_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        """One program: one query, one KV head (all its query heads), one split of the blocks; online softmax."""
        query_index = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq = tl.load(query_seq_ptr + query_index).to(tl.int64)
        visible = tl.load(query_visible_ptr + query_index)
        # Splits cover the blocks from the window's first on: those before it are never read.
        start = tl.maximum(visible - window, 0)
        first_block = start // BLOCK_SIZE + split * blocks_per_split
        last_block = tl.minimum(tl.cdiv(visible, BLOCK_SIZE), first_block + blocks_per_split)
        heads = tl.arange(0, BLOCK_GROUP)
        dims = tl.arange(0, HEAD_DIM)
        tokens = tl.arange(0, BLOCK_SIZE)
        head_ok = heads < GROUP
        q_heads = kv_head * GROUP + heads
        q = tl.load(query_ptr + query_index * stride_qn + q_heads[:, None] * stride_qh + dims[None, :],
                    mask=head_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_GROUP, HEAD_DIM]
        # A finite start keeps exp(m_old - m_new) defined when a whole block is masked.
        run_max = tl.full([BLOCK_GROUP], -1.0e30, tl.float32)
        run_sum = tl.zeros([BLOCK_GROUP], tl.float32)
        acc = tl.zeros([BLOCK_GROUP, HEAD_DIM], tl.float32)
        for block in range(first_block, last_block):
            block_id = tl.load(block_tables_ptr + seq * stride_table + block).to(tl.int64)
            # Masked loads never touch memory: slots past the context or in absent blocks are not read.
            positions = block * BLOCK_SIZE + tokens
            token_ok = ((positions < visible) & (positions >= start)
                        & (tl.full([BLOCK_SIZE], 0, tl.int64) <= block_id))
            safe_block = tl.maximum(block_id, 0)
            k = tl.load(key_cache_ptr + safe_block * stride_kb + kv_head * stride_kh + tokens[:, None] * stride_kt
                        + dims[None, :], mask=token_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_SIZE, HEAD_DIM]
            v = tl.load(value_cache_ptr + safe_block * stride_vb + kv_head * stride_vh + tokens[:, None] * stride_vt
                        + dims[None, :], mask=token_ok[:, None], other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_GROUP, BLOCK_SIZE]
            scores = tl.where(token_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, axis=1))
            correction = tl.exp(run_max - new_max)
            probs = tl.exp(scores - new_max[:, None])
            run_sum = run_sum * correction + tl.sum(probs, axis=1)
            acc = acc * correction[:, None] + tl.dot(probs, v, input_precision="ieee")
            run_max = new_max
        seen = run_sum > 0
        out = tl.where(seen[:, None], acc / tl.where(seen, run_sum, 1.0)[:, None], 0.0)
        lse = tl.where(seen, run_max + tl.log(tl.where(seen, run_sum, 1.0)), float("-inf"))
        tl.store(out_ptr + split * stride_os + query_index * stride_on + q_heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
        tl.store(lse_ptr + split * stride_ls + query_index * stride_ln + q_heads, lse, mask=head_ok)


    @triton.jit
    def _prefill_kernel(
        query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, tile_seq_ptr, tile_start_ptr, tile_end_ptr,
        query_visible_ptr, out_ptr, lse_ptr, scale, window,
        stride_qn, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_table,
        stride_on, stride_oh, stride_ln,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, EXACT: tl.constexpr,
    ):
        """One program: a tile of BLOCK_M queries of one sequence x the GROUP query heads of one KV head.

        The tile's rows share every K/V block they load (one pass over the context per tile, not per
        query); each row masks the keys past its own visible length. EXACT (fp32 inputs) keeps the dots in
        IEEE fp32; half inputs are widened and dotted in TF32 on the tensor cores, which keeps more mantissa
        than a bf16 dot (and Triton's interpreter mishandles bf16 dots).
        """
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = tl.load(tile_seq_ptr + tile).to(tl.int64)
        first_query = tl.load(tile_start_ptr + tile)
        end_query = tl.load(tile_end_ptr + tile)
        rows = tl.arange(0, BLOCK_M * GROUP_PAD)
        query_index = first_query + rows // GROUP_PAD
        head = rows % GROUP_PAD
        row_ok = (query_index < end_query) & (head < GROUP)
        q_heads = kv_head * GROUP + head
        dims = tl.arange(0, HEAD_DIM)
        tokens = tl.arange(0, BLOCK_SIZE)
        visible = tl.load(query_visible_ptr + query_index, mask=row_ok, other=0)
        # Queries of a sequence see one more token each: the tile's last one sees the most.
        tile_visible = tl.load(query_visible_ptr + end_query - 1)
        # ... and the first one's window starts first: blocks before it are never read.
        tile_start = tl.maximum(tl.load(query_visible_ptr + first_query) - window, 0)
        q = tl.load(query_ptr + query_index[:, None] * stride_qn + q_heads[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None], other=0.0).to(tl.float32)  # [ROWS, HEAD_DIM]
        run_max = tl.full([BLOCK_M * GROUP_PAD], -1.0e30, tl.float32)
        run_sum = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_M * GROUP_PAD, HEAD_DIM], tl.float32)
        for block in range(tile_start // BLOCK_SIZE, tl.cdiv(tile_visible, BLOCK_SIZE)):
            block_id = tl.load(block_tables_ptr + seq * stride_table + block).to(tl.int64)
            positions = block * BLOCK_SIZE + tokens
            token_ok = (positions < tile_visible) & (tl.full([BLOCK_SIZE], 0, tl.int64) <= block_id)
            safe_block = tl.maximum(block_id, 0)
            k = tl.load(key_cache_ptr + safe_block * stride_kb + kv_head * stride_kh + tokens[:, None] * stride_kt
                        + dims[None, :], mask=token_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_SIZE, HEAD_DIM]
            v = tl.load(value_cache_ptr + safe_block * stride_vb + kv_head * stride_vh + tokens[:, None] * stride_vt
                        + dims[None, :], mask=token_ok[:, None], other=0.0).to(tl.float32)
            if EXACT:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            allowed = (token_ok[None, :] & (positions[None, :] < visible[:, None])
                       & (positions[None, :] >= visible[:, None] - window))
            scores = tl.where(allowed, scores * scale, float("-inf"))  # [ROWS, BLOCK_SIZE]
            new_max = tl.maximum(run_max, tl.max(scores, axis=1))
            correction = tl.exp(run_max - new_max)
            probs = tl.exp(scores - new_max[:, None])
            run_sum = run_sum * correction + tl.sum(probs, axis=1)
            if EXACT:
                acc = acc * correction[:, None] + tl.dot(probs, v, input_precision="ieee")
            else:
                acc = acc * correction[:, None] + tl.dot(probs, v)
            run_max = new_max
        seen = run_sum > 0
        out = tl.where(seen[:, None], acc / tl.where(seen, run_sum, 1.0)[:, None], 0.0)
        lse = tl.where(seen, run_max + tl.log(tl.where(seen, run_sum, 1.0)), float("-inf"))
        tl.store(out_ptr + query_index[:, None] * stride_on + q_heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptr + query_index * stride_ln + q_heads, lse, mask=row_ok)


def _prefill_tiles(query_start_loc: list[int], prefill_seqs: list[int], block_m: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequence, first query, end query) of every tile of block_m queries of the prefill sequences."""
    tiles = [(seq, start, min(start + block_m, query_start_loc[seq + 1])) for seq in prefill_seqs
             for start in range(query_start_loc[seq], query_start_loc[seq + 1], block_m)]
    seqs, starts, ends = zip(*tiles)
    return tuple(torch.tensor(column, dtype=torch.int32, device=device) for column in (seqs, starts, ends))


def _prefill_triton(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: list[int], prefill_seqs: list[int],
                    query_visible: torch.Tensor, scale: float, window: int, out: torch.Tensor,
                    lse: torch.Tensor) -> None:
    """Write out/lse rows of the prefill sequences' queries with the tiled kernel."""
    _, num_q_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(1, PREFILL_TILE_ROWS // group_pad)
    tile_seq, tile_start, tile_end = _prefill_tiles(query_start_loc, prefill_seqs, block_m, query.device)
    _prefill_kernel[(len(tile_seq), num_kv_heads)](
        query, key_cache, value_cache, block_tables, tile_seq, tile_start, tile_end, query_visible, out, lse, scale,
        window, query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), lse.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        EXACT=query.dtype == torch.float32,
    )


def _num_splits(num_programs: int, max_blocks: int, device: torch.device) -> int:
    """Split the blocks so that about two waves of programs fill the device, each split >= 16 blocks."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(-(-target // max(num_programs, 1)), max_blocks // 16))


def micro_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton micro-attention; same contract as :func:`micro_attention_ref`.

    Decode sequences (up to MAX_DECODE_QUERIES queries) run split-KV, one program per query, KV head and
    split; longer ones (chunked prefill) run in tiles of queries that share each K/V block they load.
    """
    if triton is None:
        raise RuntimeError("micro_attention_triton needs triton; install it or use the CPU path")
    check_micro_attention_args(query, key_cache, value_cache, block_tables, query_start_loc, context_lens)
    num_queries, num_q_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton kernel, got {head_dim}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for the Triton kernel, got {block_size}")
    if query.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("query, key_cache and value_cache must be contiguous in head_dim")
    block_tables = block_tables.contiguous()
    query_seq, query_visible = query_layout(query_start_loc, context_lens, query.device)
    num_seq_queries = queries_per_sequence(query_start_loc)
    prefill_seqs = [seq for seq, n in enumerate(num_seq_queries) if n > MAX_DECODE_QUERIES]
    window = NO_WINDOW if sliding_window is None else sliding_window
    if not prefill_seqs:
        return _decode_triton(query, key_cache, value_cache, block_tables, query_seq, query_visible,
                              max(context_lens, default=0), scale, sliding_window, num_splits)
    out = torch.empty_like(query)
    lse = torch.empty(num_queries, num_q_heads, dtype=torch.float32, device=query.device)
    _prefill_triton(query, key_cache, value_cache, block_tables, query_start_loc, prefill_seqs, query_visible,
                    scale, window, out, lse)
    decode_seqs = [seq for seq, n in enumerate(num_seq_queries) if 0 < n <= MAX_DECODE_QUERIES]
    if decode_seqs:
        rows = torch.cat([torch.arange(query_start_loc[seq], query_start_loc[seq + 1]) for seq in decode_seqs])
        rows = rows.to(query.device)
        out[rows], lse[rows] = _decode_triton(query[rows], key_cache, value_cache, block_tables, query_seq[rows],
                                              query_visible[rows], max(context_lens[seq] for seq in decode_seqs),
                                              scale, sliding_window, num_splits)
    return out, lse


def _decode_triton(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   block_tables: torch.Tensor, query_seq: torch.Tensor, query_visible: torch.Tensor,
                   max_context: int, scale: float, sliding_window: int | None,
                   num_splits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One program per (query, KV head, split of the blocks), the splits merged by log-sum-exp."""
    num_queries, num_q_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    max_blocks = max_window_blocks(max_context, block_size, sliding_window)
    if num_splits is None:
        num_splits = _num_splits(num_queries * num_kv_heads, max_blocks, query.device)
    blocks_per_split = max(1, -(-max_blocks // num_splits))
    num_splits = max(1, -(-max_blocks // blocks_per_split))
    lse = torch.empty(num_queries, num_q_heads, dtype=torch.float32, device=query.device)
    if num_splits == 1:
        out = torch.empty_like(query)
        partial_out, partial_lse = out[None], lse[None]
    else:
        partial_out = torch.empty(num_splits, num_queries, num_q_heads, head_dim, dtype=torch.float32,
                                  device=query.device)
        partial_lse = torch.empty(num_splits, num_queries, num_q_heads, dtype=torch.float32, device=query.device)
    if num_queries > 0:
        _micro_attention_kernel[(num_queries, num_kv_heads, num_splits)](
            query, key_cache, value_cache, block_tables, query_seq, query_visible, partial_out, partial_lse,
            scale, blocks_per_split, NO_WINDOW if sliding_window is None else sliding_window,
            query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_tables.stride(0),
            partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
            partial_lse.stride(0), partial_lse.stride(1),
            GROUP=group, BLOCK_GROUP=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
        )
    if num_splits == 1:
        return out, lse
    from megakv.kernels.merge import merge_partials_triton

    return merge_partials_triton(partial_out, partial_lse, out_dtype=query.dtype)
