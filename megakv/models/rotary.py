"""Rotary position embeddings (RoPE) with rope_theta and linear, LLaMA 3 or YaRN frequency scaling.

The scaled frequencies follow transformers' ``modeling_rope_utils`` formula for formula, in
the same float32 operations, so that the cos/sin tables match Hugging Face's bit for bit.
YaRN (arXiv 2309.00071) also scales cos and sin by its attention factor.

Rotation (``megakv.kernels.norm_rotary.rotary_embedding``) is by halves, the layout of Hugging Face LLaMA and of
Megatron with ``rotary_interleaved=False``, so their q/k weights load unpermuted.
"""
from __future__ import annotations

import math

import torch

from megakv.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(scaling: dict) -> float:
    """YaRN's scale of cos and sin: given, or from factor (and mscale / mscale_all_dim when both are set)."""
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_inverse_frequencies(config: ModelConfig, scaling: dict) -> torch.Tensor:
    """YaRN: extrapolate the high frequencies, interpolate the low ones by factor, ramp linearly in between."""
    dim, base, factor = config.head_dim, config.rope_theta, scaling["factor"]
    original_context = scaling["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_context / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers does, to avoid dividing by zero
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """The per-pair rotation frequencies [head_dim // 2], after rope scaling."""
    dim = config.head_dim
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "yarn":
        return _yarn_inverse_frequencies(config, scaling)
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
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
            scaling = self.config.rope_scaling or {}
            factor = yarn_attention_factor(scaling) if scaling.get("rope_type") == "yarn" else 1.0
            self._tables[device] = (angles.cos() * factor, angles.sin() * factor)
        return self._tables[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim] of the token positions [T], in ``dtype`` (the activations', as Hugging Face
        casts them): one lookup per step, which every layer's rotation then uses."""
        cos_table, sin_table = self._cos_sin(positions.device)
        return cos_table[positions].to(dtype), sin_table[positions].to(dtype)
