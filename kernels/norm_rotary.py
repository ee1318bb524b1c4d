"""RMSNorm (with the residual add before it) and the rotary embedding: on CPU the C++ ops of
``norm_rotary_cpu.cpp``, elsewhere their torch references, which are Hugging Face's formulas.

A decode step runs each on a handful of tokens per layer, where torch's half dozen small ops per call cost
more in dispatch and allocation than in arithmetic; the C++ ops do each in one call. They have no backward,
so anything autograd must differentiate takes the torch path.
"""
from __future__ import annotations

import torch

from megakv.kernels import cpu_attention

OP_DTYPES = (torch.float32, torch.bfloat16)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * RMSNorm(x + residual), x + residual) as Hugging Face's LlamaRMSNorm computes it: the sum in
    x's dtype, the norm in fp32, the scaled result rounded back before the weight multiplies it."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm_ref` by the C++ op where it can take these tensors and is built."""
    extension = None
    if (x.device.type == "cpu" and x.dtype in OP_DTYPES and weight.dtype == x.dtype and x.dim() == 2
            and not _needs_grad(x, weight, residual)):
        extension = cpu_attention.load_extension()
    if extension is None:
        return rms_norm_ref(x, weight, eps, residual)
    normed, summed = extension.rms_norm(x, weight, eps, residual)
    return normed, summed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The last dim's halves swapped, the new first half negated (Hugging Face's rotate_half)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_embedding_ref(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query [T, Hq, D] and key [T, Hkv, D] rotated by cos/sin [T, D] (in their dtype), as new tensors."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D]
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


def rotary_embedding(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rotary_embedding_ref`; the C++ op rotates query and key in place (they are views of a fresh QKV
    projection that nothing else reads) where it can take them and is built."""
    extension = None
    if (query.device.type == "cpu" and query.dtype in OP_DTYPES and key.dtype == query.dtype
            and cos.dtype == query.dtype and query.stride(-1) == 1 and key.stride(-1) == 1
            and not _needs_grad(query, key)):
        extension = cpu_attention.load_extension()
    if extension is None:
        return rotary_embedding_ref(query, key, cos, sin)
    extension.rotary_embedding(query, key, cos.contiguous(), sin.contiguous())
    return query, key
