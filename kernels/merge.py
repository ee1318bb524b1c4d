"""Exact log-sum-exp merge of partial attention results (DistKV-LLM section 4.2).

Given partials ``(out_j, lse_j)`` over disjoint key sets,
``lse = logsumexp_j(lse_j)`` and ``out = sum_j exp(lse_j - lse) * out_j`` equal
attention over the union of the key sets. A partial that saw no key has
``lse_j = -inf`` and weight zero.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path and the references need no triton
    triton = None


def merge_partials_ref(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge stacked partials: outs [P, N, H, D], lses [P, N, H] -> (out [N, H, D], lse [N, H])."""
    lse = torch.logsumexp(lses.float(), dim=0)  # [N, H]
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lses.float() - finite_lse[None])  # [P, N, H]; 0 for empty partials
    out = (weights[..., None] * outs.float()).sum(dim=0)
    return out.to(outs.dtype), lse


if triton is not None:

    @triton.jit
    def _merge_partials_kernel(
        outs_ptr, lses_ptr, out_ptr, lse_ptr, num_partials, num_heads, head_dim,
        stride_op, stride_on, stride_oh, stride_lp, stride_ln, stride_lh,
        stride_mn, stride_mh, stride_sn, stride_sh,
        BLOCK_DIM: tl.constexpr,
    ):
        """One program: one (query, head) row, merged over all partials."""
        row = tl.program_id(0)
        n = row // num_heads
        h = row % num_heads
        dims = tl.arange(0, BLOCK_DIM)
        dim_ok = dims < head_dim
        merged_max = float("-inf")
        for p in range(num_partials):
            merged_max = tl.maximum(merged_max, tl.load(lses_ptr + p * stride_lp + n * stride_ln + h * stride_lh))
        # All partials empty: shift by 0 so that every weight is exp(-inf) = 0, never NaN.
        shift = tl.where(merged_max == float("-inf"), 0.0, merged_max)
        total = 0.0
        acc = tl.zeros([BLOCK_DIM], tl.float32)
        for p in range(num_partials):
            weight = tl.exp(tl.load(lses_ptr + p * stride_lp + n * stride_ln + h * stride_lh) - shift)
            partial = tl.load(outs_ptr + p * stride_op + n * stride_on + h * stride_oh + dims, mask=dim_ok, other=0.0)
            acc += weight * partial.to(tl.float32)
            total += weight
        seen = total > 0
        safe_total = tl.where(seen, total, 1.0)
        out = tl.where(seen, acc / safe_total, 0.0)
        tl.store(out_ptr + n * stride_mn + h * stride_mh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)
        tl.store(lse_ptr + n * stride_sn + h * stride_sh, tl.where(seen, shift + tl.log(safe_total), float("-inf")))


def merge_partials_triton(outs: torch.Tensor, lses: torch.Tensor,
                          out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton merge; same contract as :func:`merge_partials_ref` (out in ``out_dtype``, default outs' dtype)."""
    if triton is None:
        raise RuntimeError("merge_partials_triton needs triton; install it or use merge_partials_ref")
    if outs.dim() != 4 or lses.shape != outs.shape[:3]:
        raise ValueError(f"outs must be [P, N, H, D] and lses [P, N, H]; got {tuple(outs.shape)} and "
                         f"{tuple(lses.shape)}")
    if outs.shape[0] == 0:
        raise ValueError("merge_partials needs at least one partial")
    if lses.dtype != torch.float32 or outs.stride(3) != 1:
        raise ValueError(f"lses must be float32 (got {lses.dtype}) and outs contiguous in head_dim")
    num_partials, num_queries, num_heads, head_dim = outs.shape
    out = torch.empty(num_queries, num_heads, head_dim, dtype=out_dtype or outs.dtype, device=outs.device)
    lse = torch.empty(num_queries, num_heads, dtype=torch.float32, device=outs.device)
    if num_queries * num_heads > 0:
        _merge_partials_kernel[(num_queries * num_heads,)](
            outs, lses, out, lse, num_partials, num_heads, head_dim,
            outs.stride(0), outs.stride(1), outs.stride(2), lses.stride(0), lses.stride(1), lses.stride(2),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            BLOCK_DIM=triton.next_power_of_2(head_dim),
        )
    return out, lse
