"""The C++ RMSNorm and rotary ops against Hugging Face's formulas (the torch references beside them)."""
from __future__ import annotations

import pytest
import torch

from megakv.kernels.norm_rotary import rms_norm, rms_norm_ref, rotary_embedding, rotary_embedding_ref

FP32_EPS = torch.finfo(torch.float32).eps
BF16_EPS = torch.finfo(torch.bfloat16).eps


def ulps(dtype: torch.dtype) -> float:
    # fp32: the op sums the squares in another order and may fuse a multiply and add, a few ulps in all;
    # bf16: the same fp32 differences can move a value across one bf16 rounding boundary, one bf16 ulp.
    return 8 * FP32_EPS if dtype == torch.float32 else BF16_EPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,hidden", [(1, 576), (5, 64), (3, 33), (40, 128)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_hf_formula(isa, dtype, num_tokens, hidden, with_residual):
    gen = torch.Generator().manual_seed(num_tokens * hidden)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype) if with_residual else None
    normed, summed = rms_norm(x, weight, 1e-5, residual)
    expected_normed, expected_sum = rms_norm_ref(x, weight, 1e-5, residual)
    assert normed.dtype == dtype and summed.dtype == dtype
    # The residual sum is one rounding of one add in both: equal bit for bit.
    assert torch.equal(summed, expected_sum)
    scale = expected_normed.float().abs() + weight.float().abs()
    assert ((normed.float() - expected_normed.float()).abs() <= ulps(dtype) * scale).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_q_heads,num_kv_heads,head_dim", [(1, 9, 3, 64), (7, 4, 4, 128),
                                                                          (3, 2, 1, 6)])
def test_rotary_embedding_rotates_views_of_qkv_in_place_as_hf(isa, dtype, num_tokens, num_q_heads, num_kv_heads,
                                                               head_dim):
    gen = torch.Generator().manual_seed(num_tokens + head_dim)
    # The query and key heads are views into one QKV row per token, as QKVParallelLinear.split_qkv gives them.
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    query, key, _ = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    query, key = query.unflatten(-1, (num_q_heads, head_dim)), key.unflatten(-1, (num_kv_heads, head_dim))
    angles = torch.rand(num_tokens, head_dim // 2, generator=gen) * 100
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected_query, expected_key = rotary_embedding_ref(query.clone(), key.clone(), cos, sin)
    values = qkv[:, -num_kv_heads * head_dim:].clone()
    rotated_query, rotated_key = rotary_embedding(query, key, cos, sin)
    for got, expected in ((rotated_query, expected_query), (rotated_key, expected_key)):
        bound = ulps(dtype) * (expected.float().abs() + 1)
        assert ((got.float() - expected.float()).abs() <= bound).all()
    assert torch.equal(qkv[:, -num_kv_heads * head_dim:], values)  # the value heads are left alone


def test_norm_and_rotary_leave_autograd_to_torch(isa):
    weight = torch.nn.Parameter(torch.randn(16))
    x = torch.randn(2, 16)
    normed, _ = rms_norm(x, weight, 1e-5)
    assert normed.grad_fn is not None
    query = torch.randn(2, 3, 8, requires_grad=True)
    key = torch.randn(2, 1, 8)
    rotated, _ = rotary_embedding(query, key, torch.ones(2, 8), torch.zeros(2, 8))
    assert rotated.grad_fn is not None and rotated is not query
