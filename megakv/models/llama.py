"""LLaMA-family decoder over Megatron tensor-parallel layers and DistAttention.

RMSNorm, gated MLP (SwiGLU, or GELU/ReLU gates), RoPE (rope_theta; linear, LLaMA 3 or
YaRN scaling), grouped-query attention with optional Q/K/V, output and MLP biases (Qwen2,
LLaMA's attention_bias/mlp_bias) and Mistral's sliding window, tied or untied embeddings.
Parameter names follow Megatron core (``embedding.word_embeddings``,
``decoder.layers.N.self_attention.linear_qkv``, ...) so that checkpoints map one to one. The attention core reads and writes the
rBlock KV pool; the MLP keeps standard tensor parallelism.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from megakv.attention.dist_attention import DistAttention
from megakv.attention.metadata import AttentionMetadata
from megakv.config import ModelConfig
from megakv.kernels.norm_rotary import rms_norm, rotary_embedding
from megakv.kvcache.kv_cache import KVCache
from megakv.models.rotary import RotaryEmbedding
from megakv.parallel.layers import (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                    VocabParallelEmbedding, VocabParallelOutput)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference implementation, with the residual
    add before it (vLLM's fused form): one call per norm instead of an add and a norm."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] (+ residual [T, H]) -> (the sum normalised, the sum: the next residual)."""
        return rms_norm(x, self.weight, self.eps, residual)


class SelfAttention(nn.Module):
    """QKV projection, RoPE, DistAttention over the rBlocks, output projection."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        dtype = config.torch_dtype
        self.linear_qkv = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                                            config.num_kv_heads, bias=config.qkv_bias, params_dtype=dtype)
        self.core_attention = DistAttention(layer_index, config.head_dim)
        self.linear_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                             bias=config.proj_bias, input_is_parallel=True, params_dtype=dtype)

    def forward(self, hidden: torch.Tensor, rotary_pos_emb: tuple[torch.Tensor, torch.Tensor], kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """hidden [T, H], rotary_pos_emb (cos, sin) [T, D] of the tokens' positions -> [T, H]."""
        query, key, value = self.linear_qkv.split_qkv(self.linear_qkv(hidden))  # [T, heads, D] each
        query, key = rotary_embedding(query, key, *rotary_pos_emb)
        key_cache, value_cache = kv_cache.layer(self.layer_index)
        out = self.core_attention(query, key, value, key_cache, value_cache, metadata)  # [T, Hq_r, D]
        return self.linear_proj(out.flatten(1))  # [T, Hq_r * D] -> [T, H]


# Hugging Face's ACT2FN entries for config.ACTIVATIONS, as the same torch functions.
ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


class MLP(nn.Module):
    """Gated MLP act(gate) * up (SwiGLU for silu): fc1 holds this rank's [gate; up] rows, fc2 is row parallel."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dtype = config.torch_dtype
        self.activation = ACTIVATION_FUNCTIONS[config.hidden_act]
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias,
                                               params_dtype=dtype)
        self.linear_fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias,
                                            input_is_parallel=True, params_dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(hidden).chunk(2, dim=-1)
        return self.linear_fc2(self.activation(gate) * up)


class TransformerLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)); each residual add is left to the next
    norm, which fuses it."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        dtype = config.torch_dtype
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attention = SelfAttention(config, layer_index)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                rotary_pos_emb: tuple[torch.Tensor, torch.Tensor], kv_cache: KVCache,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): their sum is the layer's output."""
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attention(hidden, rotary_pos_emb, kv_cache, metadata)
        hidden, residual = self.pre_mlp_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LanguageModelEmbedding(nn.Module):
    """Holds the vocab-parallel word embeddings (LLaMA has no learned position embedding)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                      params_dtype=config.torch_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class TransformerBlock(nn.Module):
    """The stack of decoder layers and the final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.torch_dtype)

    def forward(self, hidden: torch.Tensor, rotary_pos_emb: tuple[torch.Tensor, torch.Tensor], kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rotary_pos_emb, kv_cache, metadata)
        return self.final_layernorm(hidden, residual)[0]


class LlamaModel(nn.Module):
    """A LLaMA causal LM whose forward runs one engine step over the paged KV cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config)
        self.embedding = LanguageModelEmbedding(config)
        self.decoder = TransformerBlock(config)
        tied = self.embedding.word_embeddings if config.tie_word_embeddings else None
        self.output_layer = VocabParallelOutput(config.vocab_size, config.hidden_size,
                                                params_dtype=config.torch_dtype, tied_embedding=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Run the new tokens input_ids [T] at positions [T]; logits [N, vocab] of rows logits_indices."""
        hidden = self.embedding(input_ids)  # [T, H]
        hidden = self.decoder(hidden, self.rotary.cos_sin(positions, hidden.dtype), kv_cache, metadata)
        if logits_indices is not None:
            hidden = hidden[logits_indices]
        return self.output_layer(hidden).float()
