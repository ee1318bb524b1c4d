"""Exact log-sum-exp merge of partial attention results (DistKV-LLM section 4.2).

Given partials ``(out_j, lse_j)`` over disjoint key sets,
``lse = logsumexp_j(lse_j)`` and ``out = sum_j exp(lse_j - lse) * out_j`` equal
attention over the union of the key sets. A partial that saw no key has
``lse_j = -inf`` and weight zero.
"""
from __future__ import annotations

import torch


def merge_partials_ref(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge stacked partials: outs [P, N, H, D], lses [P, N, H] -> (out [N, H, D], lse [N, H])."""
    lse = torch.logsumexp(lses.float(), dim=0)  # [N, H]
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lses.float() - finite_lse[None])  # [P, N, H]; 0 for empty partials
    out = (weights[..., None] * outs.float()).sum(dim=0)
    return out.to(outs.dtype), lse
