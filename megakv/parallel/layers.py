"""Megatron tensor-parallel layers: column/row-parallel linear, QKV, vocab-parallel embedding and output.

Names follow Megatron core (``output_size_per_partition``, ``vocab_start_index``).
Parameters are created with ``torch.empty`` so that a model built under
``torch.device("meta")`` allocates nothing before its checkpoint is assigned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megakv.kernels.ops import linear
from megakv.parallel.mappings import (copy_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
                                      reduce_from_tensor_model_parallel_region, scatter_to_tensor_model_parallel_region)
from megakv.parallel.state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

INIT_STD = 0.02


def _divide(numerator: int, denominator: int, what: str) -> int:
    """numerator // denominator, or a ValueError naming ``what`` when it does not divide."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


class ColumnParallelLinear(nn.Module):
    """Y = X A^T with A split by rows (output features) across TP ranks.

    ``output_size_per_partition`` overrides ``output_size // tp`` for subclasses whose
    shards overlap (QKV with replicated KV heads); ``gather_output`` then is not allowed.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, gather_output: bool = False,
                 params_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 output_size_per_partition: int | None = None) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        if output_size_per_partition is not None and gather_output:
            raise ValueError("gather_output needs output_size split evenly, not output_size_per_partition")
        self.output_size_per_partition = (output_size_per_partition if output_size_per_partition is not None
                                          else _divide(output_size, tp, "output size"))
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size, dtype=params_dtype,
                                               device=device))
        self.bias = (nn.Parameter(torch.empty(self.output_size_per_partition, dtype=params_dtype, device=device))
                     if bias else None)

    def reset_parameters(self) -> None:
        """Training init: normal(0, 0.02) weight, zero bias."""
        nn.init.normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., input_size] -> [..., output_size_per_partition], or [..., output_size] gathered."""
        out = linear(copy_to_tensor_model_parallel_region(x), self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(out) if self.gather_output else out


class RowParallelLinear(nn.Module):
    """Y = X A^T with A split by columns (input features); partial products are all-reduced."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, input_is_parallel: bool = True,
                 params_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.input_size_per_partition = _divide(input_size, get_tensor_model_parallel_world_size(), "input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition, dtype=params_dtype,
                                               device=device))
        self.bias = nn.Parameter(torch.empty(output_size, dtype=params_dtype, device=device)) if bias else None

    def reset_parameters(self) -> None:
        """Training init: normal(0, 0.02) weight, zero bias."""
        nn.init.normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., input_size_per_partition] (or [..., input_size] if not parallel) -> [..., output_size]."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        out = reduce_from_tensor_model_parallel_region(linear(x, self.weight))
        # The bias is added once, after the reduction, not once per rank.
        return out + self.bias if self.bias is not None else out


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q/K/V projection; each rank holds [its query heads; its key heads; its value heads].

    With grouped-query attention the KV heads split across ranks; when there are
    fewer KV heads than ranks (MQA, say) each rank holds a replica of the one its
    query heads use.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, *, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        tp = get_tensor_model_parallel_world_size()
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) and the tensor-parallel size {tp} must divide "
                             f"one another")
        self.head_dim = head_dim
        self.num_heads_per_partition = _divide(num_heads, tp, "num_attention_heads")
        self.num_kv_heads_per_partition = max(1, num_kv_heads // tp)
        per_partition = (self.num_heads_per_partition + 2 * self.num_kv_heads_per_partition) * head_dim
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias,
                         params_dtype=params_dtype, device=device, output_size_per_partition=per_partition)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., (Hq + 2 Hkv) * D] -> q [..., Hq, D], k [..., Hkv, D], v [..., Hkv, D] (this rank's heads)."""
        q_size = self.num_heads_per_partition * self.head_dim
        kv_size = self.num_kv_heads_per_partition * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (q.unflatten(-1, (self.num_heads_per_partition, self.head_dim)),
                k.unflatten(-1, (self.num_kv_heads_per_partition, self.head_dim)),
                v.unflatten(-1, (self.num_kv_heads_per_partition, self.head_dim)))


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; the vocabulary is padded to a multiple of the TP size."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_padded = -(-num_embeddings // tp) * tp
        self.num_embeddings_per_partition = self.num_embeddings_padded // tp
        self.vocab_start_index = get_tensor_model_parallel_rank() * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype,
                                               device=device))

    def reset_parameters(self) -> None:
        """Training init: normal(0, 0.02)."""
        nn.init.normal_(self.weight, std=INIT_STD)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [...] -> embeddings [..., embedding_dim]."""
        if get_tensor_model_parallel_world_size() == 1:
            return F.embedding(input_ids, self.weight)
        # Ids owned by another rank look up local row 0 and are zeroed; the all-reduce then
        # adds the one rank that owns each id.
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        embedded = F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tensor_model_parallel_region(embedded)


class VocabParallelOutput(nn.Module):
    """The output layer: logits over the vocabulary, column-parallel, optionally tied to the embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None,
                 tied_embedding: VocabParallelEmbedding | None = None) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = -(-num_embeddings // tp)
        if tied_embedding is not None and (tied_embedding.num_embeddings, tied_embedding.embedding_dim) != (
                num_embeddings, embedding_dim):
            raise ValueError(f"tied embedding is {tied_embedding.num_embeddings} x {tied_embedding.embedding_dim}, "
                             f"the output layer {num_embeddings} x {embedding_dim}")
        # In a list, not a submodule: the tied weight is owned (and saved) by the embedding alone.
        self._tied_embedding = [tied_embedding] if tied_embedding is not None else None
        if tied_embedding is not None:
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim,
                                                   dtype=params_dtype, device=device))

    def reset_parameters(self) -> None:
        """Training init: normal(0, 0.02) for an untied weight; a tied one is the embedding's to init."""
        if self.weight is not None:
            nn.init.normal_(self.weight, std=INIT_STD)

    @property
    def output_weight(self) -> torch.Tensor:
        """This rank's [num_embeddings_per_partition, embedding_dim] rows: its own or the tied embedding's."""
        return self._tied_embedding[0].weight if self._tied_embedding is not None else self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., num_embeddings] (padding columns dropped)."""
        logits = linear(copy_to_tensor_model_parallel_region(hidden), self.output_weight)
        return gather_from_tensor_model_parallel_region(logits)[..., :self.num_embeddings]
