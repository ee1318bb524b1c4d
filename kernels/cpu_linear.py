"""Linear layers over a few rows on CPU: the C++ op of ``linear_cpu.cpp`` (reads each weight once per call,
fp32 or bf16 weights, any CPU vendor), and torch's GEMM above the row count where that wins.

A decode step multiplies every weight by as many rows as the batch has sequences. Up to a few rows that is a
read of the weights, which BLAS libraries do below the memory's speed (MKL's fp32 path on AMD CPUs, oneDNN's
bf16 GEMM on any); with more rows it is compute bound and torch's blocked GEMM catches up.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megakv.kernels import cpu_attention
from megakv.kernels.cpu_build import cpu_vendor, selected_isa

# The most rows the op takes; torch's GEMM runs larger ones. These are the crossovers that tools/bench_decode.py
# measures (linear_crossover_rows; docs/benchmarks.md has the figures): by weight dtype,
MAX_OP_ROWS = {torch.float32: 24, torch.bfloat16: 8}
# bf16 weights on the build with bf16 dot products (avx512_bf16), which halve the op's arithmetic,
MAX_OP_ROWS_BF16_DOT_PRODUCTS = 32
# and both of these on AMD CPUs, where the op stayed ahead of torch's GEMM at 64 rows (in fp32 that GEMM is MKL's,
# which takes a slow path on AMD CPUs).
MAX_OP_ROWS_AMD = 64


@functools.cache
def max_op_rows(dtype: torch.dtype) -> int:
    """The most rows the op takes for weights of ``dtype`` on this CPU and the build this process selects (0:
    none). Resolved once per process, like the op itself; tests that change MEGAKV_CPU_ISA clear the cache."""
    if dtype not in MAX_OP_ROWS:
        return 0
    if dtype == torch.bfloat16 and selected_isa() != "avx512_bf16":
        return MAX_OP_ROWS[dtype]
    if cpu_vendor() == "AuthenticAMD":
        return MAX_OP_ROWS_AMD
    return MAX_OP_ROWS_BF16_DOT_PRODUCTS if dtype == torch.bfloat16 else MAX_OP_ROWS[dtype]


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N]: torch's linear, the op's reference."""
    return F.linear(x, weight, bias)


def op_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the C++ op can compute this linear: CPU tensors of its dtypes, few rows, nothing to differentiate
    (it has no backward, so training keeps torch's linear)."""
    max_rows = max_op_rows(weight.dtype)
    if x.device.type != "cpu" or x.dtype not in MAX_OP_ROWS or not max_rows:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return x.numel() <= max_rows * x.shape[-1] and weight.is_contiguous()


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The C++ op where it can take these tensors (see :func:`op_takes`) and is built, else torch's linear."""
    extension = cpu_attention.load_extension() if op_takes(x, weight, bias) else None
    if extension is None:
        return linear_ref(x, weight, bias)
    # The layers hand it [M, K] already, and a reshape and a view around each of a decode step's hundred-odd
    # calls are a measurable part of a batch-1 step (docs/benchmarks.md).
    if x.dim() == 2:
        return extension.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]
    return extension.linear(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])
