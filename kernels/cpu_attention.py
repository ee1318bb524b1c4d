"""The CPU attention ops: a C++/OpenMP paged decode op and merge, and torch paths for prefill and fallback.

Decode on CPU is bound by memory bandwidth, and a torch gather (``key_cache[table]``) copies every block
before it is read. The C++ op (``paged_attention_cpu.cpp``, built once with
``torch.utils.cpp_extension.load_inline`` and cached) reads each block's K/V tiles in place (fp32, bf16 or
fp16, computing in fp32), split-KV across threads, flash-decoding style; ``cpu_build`` compiles the variant
for the host's instruction set (AVX-512, AVX2 or generic) and caches it. Sequences with many queries
(chunked prefill) are compute bound: they gather their context once and run torch's flash attention for
CPU, which returns the log-sum-exp too. Without a compiler, or with ``MEGAKV_CPU_EXTENSION=0``, the torch
path serves every sequence.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from megakv.kernels.cpu_build import load_variant, selected_isa
from megakv.kernels.micro_attention import (MAX_DECODE_QUERIES, NO_WINDOW, check_micro_attention_args,
                                            max_window_blocks, queries_per_sequence, query_layout,
                                            query_layout_lists)


@functools.cache
def load_extension():
    """The compiled C++ op module for the selected instruction set (``cpu_build.selected_isa``), or None when
    disabled or when the build fails (a warning says why).

    Resolved once per process: a decode step calls the ops about ten times per layer, and reading the two
    environment variables each time cost a few percent of a step. Code that changes them later (tests) calls
    ``load_extension.cache_clear()``.
    """
    if os.environ.get("MEGAKV_CPU_EXTENSION", "1") == "0":
        return None
    return _load_variant(selected_isa())


@functools.cache
def _load_variant(isa: str):
    try:
        return load_variant(isa)
    except Exception as error:  # no compiler, no headers, read-only cache, lock held: the torch path still works
        warnings.warn(f"megakv: CPU paged-attention op ({isa}) unavailable ({error}); using the slower torch path")
        return None


def _op_reads(cache: torch.Tensor) -> bool:
    """Whether the C++ op can read this cache: its dtypes and head dims, laid out contiguously."""
    return (cache.dtype in (torch.float32, torch.bfloat16, torch.float16) and cache.shape[-1] in (64, 128)
            and cache.is_contiguous())


def _extension_for(query: torch.Tensor, key_cache: torch.Tensor):
    """The C++ op module when it can attend these tensors, else None."""
    return load_extension() if query.dtype == key_cache.dtype and _op_reads(key_cache) else None


def _decode_extension(extension, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_seq: torch.Tensor, query_visible: torch.Tensor,
                      max_visible: int, scale: float, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ op over any queries; splits the blocks so that every thread has work."""
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    max_blocks = max_window_blocks(max_visible, block_size, sliding_window)
    num_items = query.shape[0] * num_kv_heads
    num_splits = max(1, min(-(-4 * torch.get_num_threads() // num_items), max_blocks // 32))
    blocks_per_split = max(1, -(-max_blocks // num_splits))
    num_splits = max(1, -(-max_blocks // blocks_per_split))
    # The op computes in fp32 over K/V in their own dtype; only the small query and output are converted.
    out, lse = extension.paged_attention(query.float().contiguous(), key_cache, value_cache.contiguous(),
                                                block_tables.to(torch.int32).contiguous(), query_seq,
                                                query_visible, scale, blocks_per_split, num_splits,
                                                NO_WINDOW if sliding_window is None else sliding_window)
    return out.to(query.dtype), lse


def _sequence_torch(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, table: torch.Tensor,
                    visible: torch.Tensor, scale: float,
                    sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: gather its context once, then flash attention for CPU with a causal/presence/window mask.

    query [n, Hq, D], table [num_blocks] (< 0 = absent), visible [n] -> out [n, Hq, D], lse [n, Hq].
    Only the blocks from the first query's window on are gathered.
    """
    num_queries, num_q_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    first_block = 0 if sliding_window is None else max(0, int(visible.min()) - sliding_window) // block_size
    # Positions are counted from the first gathered block's first token on.
    offset = first_block * block_size
    visible = visible - offset
    context_len = int(visible.max())
    table = table[first_block:first_block + -(-context_len // block_size)].long()
    present = table >= 0
    # [nb, Hkv, bs, D] -> [1, Hkv, ctx, D]; reshape after transpose copies, so the fills below are safe.
    keys = key_cache.index_select(0, table.clamp(min=0)).transpose(0, 1).reshape(num_kv_heads, -1, head_dim)
    values = value_cache.index_select(0, table.clamp(min=0)).transpose(0, 1).reshape(num_kv_heads, -1, head_dim)
    keys, values = keys[None, :, :context_len], values[None, :, :context_len]
    token_present = present.repeat_interleave(block_size)[:context_len]  # [ctx]
    if not bool(token_present.all()):
        # Absent blocks' slots hold another micro-attention's data or garbage (even NaN): zero them.
        keys.masked_fill_(~token_present[None, None, :, None], 0.0)
        values.masked_fill_(~token_present[None, None, :, None], 0.0)
    positions = torch.arange(context_len)[None, :]
    allowed = token_present[None, :] & (positions < visible[:, None].long())  # [n, ctx]
    if sliding_window is not None:
        allowed &= positions >= visible[:, None].long() - sliding_window
    # Each query row repeats for the `group` query heads of a KV head: [n, Hkv, g, D] -> [1, Hkv, n*g, D].
    rows = query.view(num_queries, num_kv_heads, group, head_dim).transpose(0, 1)
    rows = rows.reshape(1, num_kv_heads, num_queries * group, head_dim)
    mask = torch.zeros(num_queries, context_len, dtype=query.dtype).masked_fill_(~allowed, float("-inf"))
    mask = mask.repeat_interleave(group, dim=0)[None, None]  # [1, 1, n*g, ctx]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        rows, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask, scale=scale)
    out = out[0].view(num_kv_heads, num_queries, group, head_dim).transpose(0, 1).reshape(num_queries, num_q_heads,
                                                                                          head_dim)
    lse = lse[0].view(num_kv_heads, num_queries, group).transpose(0, 1).reshape(num_queries, num_q_heads)
    # Flash attention reports out 0, lse 0 for a row that sees no key; the contract says lse -inf.
    lse = lse.masked_fill(~allowed.any(dim=1)[:, None], float("-inf"))
    return out, lse


def micro_attention_cpu(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fastest CPU micro-attention; same contract as :func:`micro_attention_ref`."""
    check_micro_attention_args(query, key_cache, value_cache, block_tables, query_start_loc, context_lens)
    num_seq_queries = queries_per_sequence(query_start_loc)
    extension = _extension_for(query, key_cache)
    use_extension = extension is not None
    if use_extension and all(n <= MAX_DECODE_QUERIES for n in num_seq_queries):
        # A decode batch: one call over every query, with no scatter of partial results.
        query_seq, query_visible = query_layout_lists(query_start_loc, context_lens)
        if not query_seq:
            return torch.zeros_like(query), torch.full(query.shape[:2], float("-inf"), dtype=torch.float32)
        return _decode_extension(extension, query, key_cache, value_cache, block_tables,
                                 torch.tensor(query_seq, dtype=torch.int32),
                                 torch.tensor(query_visible, dtype=torch.int32), max(query_visible), scale,
                                 sliding_window)
    num_queries, num_q_heads, head_dim = query.shape
    out = torch.zeros_like(query)
    lse = torch.full((num_queries, num_q_heads), float("-inf"), dtype=torch.float32)
    query_seq, query_visible = query_layout(query_start_loc, context_lens)
    decode_seq = torch.tensor([0 < n <= MAX_DECODE_QUERIES and use_extension for n in num_seq_queries],
                              dtype=torch.bool)
    decode_rows = (decode_seq[query_seq.long()] & (query_visible > 0)).nonzero().flatten()  # [num_decode]
    if len(decode_rows) > 0:
        out[decode_rows], lse[decode_rows] = _decode_extension(
            extension, query[decode_rows], key_cache, value_cache, block_tables, query_seq[decode_rows],
            query_visible[decode_rows], int(query_visible[decode_rows].max()), scale, sliding_window)
    for seq_index, num_seq in enumerate(num_seq_queries):
        start = query_start_loc[seq_index]
        if num_seq == 0 or bool(decode_seq[seq_index]) or context_lens[seq_index] <= 0:
            continue
        visible = query_visible[start:start + num_seq]
        if int(visible.max()) <= 0:
            continue
        out[start:start + num_seq], lse[start:start + num_seq] = _sequence_torch(
            query[start:start + num_seq], key_cache, value_cache, block_tables[seq_index], visible, scale,
            sliding_window)
    return out, lse


def merge_partials_cpu(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The C++ merge for fp32 partials (see merge_partials_ref); None when the op cannot take them."""
    extension = load_extension()
    if outs.dtype != torch.float32 or outs.dim() != 4 or lses.shape != outs.shape[:3] or extension is None:
        return None
    return tuple(extension.merge_partials(outs.contiguous(), lses.float().contiguous()))


def store_kv_cpu(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> bool:
    """The C++ KV store (see store_kv_ref); False when the op cannot take these tensors."""
    extension = load_extension()
    if (key.dtype != key_cache.dtype or value.dtype != key_cache.dtype or value_cache.dtype != key_cache.dtype
            or not (key_cache.is_contiguous() and value_cache.is_contiguous()) or extension is None):
        return False
    extension.store_kv(key.contiguous(), value.contiguous(), key_cache, value_cache,
                              slot_mapping.long().contiguous())
    return True


def native_kv_server(key_cache: torch.Tensor, value_cache: torch.Tensor):
    """The C++ module whose ``kv_serve`` runs the KV server's loop over these caches ([layers, num_blocks, Hkv,
    block_size, D]), or None when the op cannot attend them."""
    if key_cache.device.type != "cpu" or not (_op_reads(key_cache) and value_cache.is_contiguous()):
        return None
    return load_extension()
