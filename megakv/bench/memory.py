"""The memory read bandwidth that bandwidth-bound benchmarks (attention, decode) compare themselves with."""
from __future__ import annotations

import torch


class ReadBandwidth:
    """The device's memory read bandwidth: a sum over a 1 GiB float32 tensor.

    Benchmarks time it in turn with what they measure: on a shared machine the bandwidth swings by half within
    minutes, and a figure taken once at the start would not describe the case.
    """

    def __init__(self, device: torch.device) -> None:
        self.data = torch.rand(2**28, device=device)

    def __call__(self) -> None:
        self.data.sum()

    def gbps(self, seconds: float) -> float:
        """GB/s of one sum that took ``seconds``."""
        return self.data.numel() * 4 / seconds / 1e9
