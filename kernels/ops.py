"""The ops the engine calls: attention by Triton kernels on CUDA tensors, and on CPU the fastest torch/C++ path
for attention and for the linear layers of a decode step."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megakv.kernels.cpu_attention import merge_partials_cpu, micro_attention_cpu, store_kv_cpu
from megakv.kernels.cpu_linear import linear_cpu
from megakv.kernels.kv_store import store_kv_ref, store_kv_triton
from megakv.kernels.merge import merge_partials_ref, merge_partials_triton
from megakv.kernels.micro_attention import micro_attention_ref, micro_attention_triton, triton


def _on_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and triton is not None


def micro_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over the blocks in ``block_tables``; see :func:`micro_attention_ref`."""
    if _on_triton(query):
        return micro_attention_triton(query, key_cache, value_cache, block_tables.to(query.device),
                                      query_start_loc, context_lens, scale, sliding_window)
    if query.is_cuda:
        return micro_attention_ref(query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale,
                                   sliding_window)
    return micro_attention_cpu(query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale,
                               sliding_window)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials outs [P, N, H, D], lses [P, N, H] by log-sum-exp; see :func:`merge_partials_ref`."""
    if _on_triton(outs):
        return merge_partials_triton(outs, lses.float())
    merged = merge_partials_cpu(outs, lses) if outs.device.type == "cpu" else None
    return merged if merged is not None else merge_partials_ref(outs, lses)


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into the pool at ``slot_mapping`` (< 0 skips); see :func:`store_kv_ref`."""
    if _on_triton(key):
        store_kv_triton(key, value, key_cache, value_cache, slot_mapping.to(key.device))
    elif key.is_cuda or not store_kv_cpu(key, value, key_cache, value_cache, slot_mapping):
        store_kv_ref(key, value, key_cache, value_cache, slot_mapping)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias): the C++ op for few rows on CPU, else torch's linear."""
    if x.device.type == "cpu":
        return linear_cpu(x, weight, bias)
    return F.linear(x, weight, bias)
