"""Rotary position embeddings (RoPE) with rope_theta and LLaMA 3 / linear frequency scaling.

Rotation is by halves (``rotate_half``), the layout of Hugging Face LLaMA and of
Megatron with ``rotary_interleaved=False``, so their q/k weights load unpermuted.
"""
from __future__ import annotations

import math

import torch

from megakv.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """The per-pair rotation frequencies [head_dim // 2], after rope scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type != "llama3":
        return inv_freq
    # LLaMA 3.1: keep high frequencies, divide low ones by factor, interpolate in between.
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    original_context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding:
    """cos/sin tables up to max_position_embeddings, built once per device on first use."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            inv_freq = inverse_frequencies(self.config).to(device)
            positions = torch.arange(self.config.max_position_embeddings, device=device).float()
            freqs = positions[:, None] * inv_freq[None, :]  # [max_pos, head_dim // 2]
            angles = torch.cat((freqs, freqs), dim=-1)  # [max_pos, head_dim]
            self._tables[device] = (angles.cos(), angles.sin())
        return self._tables[device]

    def __call__(self, query: torch.Tensor, key: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate query [T, Hq, D] and key [T, Hkv, D] by their token positions [T]."""
        cos_table, sin_table = self._cos_sin(query.device)
        cos = cos_table[positions][:, None, :].to(query.dtype)  # [T, 1, D]
        sin = sin_table[positions][:, None, :].to(query.dtype)
        return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin
