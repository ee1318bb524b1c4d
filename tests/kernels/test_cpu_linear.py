"""The C++ linear op for few rows against torch's linear, on every instruction set this CPU runs."""
from __future__ import annotations

import pytest
import torch

from megakv.kernels import cpu_attention, cpu_linear
from megakv.kernels.cpu_linear import linear_cpu, linear_ref, max_op_rows, op_takes

FP32_EPS = torch.finfo(torch.float32).eps
BF16_EPS = torch.finfo(torch.bfloat16).eps
# (N, K): SmolLM2's QKV, output projection, fused gate-up and down projection; a LLaMA-7B down projection's
# tensor-parallel shard (TP 4); odd sizes that leave a row tile and a vector partly filled.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (4096, 2752), (7, 13), (33, 100),
          (5, 16), (1, 1)]


def assert_linear_close(actual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
    """``actual`` is x @ weight^T (+ bias) up to the rounding of a K-term fp32 sum in any order.

    The reference is computed in fp64 from the same (possibly bf16) inputs. A dot product of K terms summed in
    fp32 in any order is within K * eps32 * sum |x_k w_k| of the exact one (the standard bound, gamma_K);
    a bf16 output adds one rounding, eps_bf16 of the value.
    """
    exact = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    bound = weight.shape[1] * FP32_EPS * torch.nn.functional.linear(x.double().abs(), weight.double().abs())
    if actual.dtype == torch.bfloat16:
        bound = bound + BF16_EPS * exact.abs()
    bound = bound + FP32_EPS * exact.abs()
    assert actual.dtype == x.dtype and actual.shape == exact.shape
    excess = ((actual.double() - exact).abs() - bound).max().item()
    assert excess <= 0, f"off by {excess:.3g} beyond the rounding bound"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_rows", [1, 2, 3, 5, 8, 24, 33, 65])
@pytest.mark.parametrize("weight_dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_linear_cpu_matches_torch(isa, shape, num_rows, weight_dtype, x_dtype):
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(out_features * 1000 + in_features + num_rows)
    weight = torch.randn(out_features, in_features, generator=gen).to(weight_dtype)
    x = torch.randn(num_rows, in_features, generator=gen).to(x_dtype)
    bias = torch.randn(out_features, generator=gen).to(weight_dtype) if out_features % 2 else None
    # The op itself, also past the row count the layers hand it (where torch's GEMM is faster, not wrong).
    assert_linear_close(cpu_attention.load_extension().linear(x, weight, bias), x, weight, bias)
    assert op_takes(x, weight, bias) == (num_rows <= max_op_rows(weight_dtype))


def test_linear_cpu_keeps_leading_dimensions(isa):
    weight = torch.randn(24, 40)
    x = torch.randn(2, 3, 40)
    out = linear_cpu(x, weight)
    assert out.shape == (2, 3, 24)
    assert_linear_close(out.view(6, 24), x.view(6, 40), weight, None)


def test_linear_cpu_leaves_training_and_large_batches_to_torch(isa):
    weight = torch.nn.Parameter(torch.randn(8, 16))
    x = torch.randn(2, 16)
    assert not op_takes(x, weight, None)
    out = linear_cpu(x, weight)
    assert out.grad_fn is not None  # torch's linear, which training differentiates
    out.sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(0).expand(8, 16))
    with torch.inference_mode():
        assert op_takes(x, weight, None)
    assert not op_takes(torch.randn(max_op_rows(torch.float32) + 1, 16), weight.detach(), None)
    assert not op_takes(x.half(), weight.detach().half(), None)
    assert not op_takes(x, weight.detach().t(), None)  # a transposed weight is not contiguous


def test_linear_cpu_without_the_op_is_torch(monkeypatch):
    monkeypatch.setattr(cpu_attention, "load_extension", lambda: None)
    x, weight = torch.randn(3, 16), torch.randn(8, 16)
    torch.testing.assert_close(linear_cpu(x, weight), linear_ref(x, weight), rtol=0, atol=0)


@pytest.mark.parametrize("vendor,isa,expected", [
    ("GenuineIntel", "avx512_bf16", {torch.float32: 24, torch.bfloat16: 32}),
    ("GenuineIntel", "avx512", {torch.float32: 24, torch.bfloat16: 8}),
    ("AuthenticAMD", "avx512_bf16", {torch.float32: 64, torch.bfloat16: 64}),
    ("AuthenticAMD", "avx2", {torch.float32: 64, torch.bfloat16: 8}),
])
def test_max_op_rows_follow_the_measured_crossovers(monkeypatch, vendor, isa, expected):
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_linear, "selected_isa", lambda: isa)
    assert {dtype: max_op_rows(dtype) for dtype in expected} == expected
    assert max_op_rows(torch.float16) == 0
