"""Tensor-parallel collectives as autograd pairs (after Megatron core's ``mappings.py``).

Each forward collective has its adjoint in backward, so the layers built on them
train as well as serve. Every one is the identity when the TP world size is 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megakv.parallel.state import (get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                                   get_tensor_model_parallel_world_size)


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group into a new tensor."""
    # Never in place: x may be a saved activation, or a gradient autograd also hands to
    # another branch (an add passes one gradient tensor to both of its inputs).
    summed = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(summed, group=get_tensor_model_parallel_group())
    return summed


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    if x.shape[-1] % world_size:
        raise ValueError(f"last dimension {x.shape[-1]} does not split over {world_size} TP ranks")
    return x.chunk(world_size, dim=-1)[get_tensor_model_parallel_rank()].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(get_tensor_model_parallel_world_size())]
    dist.all_gather(pieces, x, group=get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)  # TP x [..., N] -> [..., TP * N]


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad)


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (input to a column-parallel layer)."""
    return x if get_tensor_model_parallel_world_size() == 1 else _CopyToRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel layer)."""
    return x if get_tensor_model_parallel_world_size() == 1 else _ReduceFromRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; gather the gradient backward."""
    return x if get_tensor_model_parallel_world_size() == 1 else _ScatterToRegion.apply(x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-gather along the last dimension; split the gradient backward."""
    return x if get_tensor_model_parallel_world_size() == 1 else _GatherFromRegion.apply(x)
