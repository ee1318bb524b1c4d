"""When each request of a serving benchmark is sent: Poisson or gamma arrivals, as ``vllm bench serve`` draws them.

The gaps between requests are gamma distributed with shape ``burstiness`` and mean
``1 / request_rate``: burstiness 1 is a Poisson process, below 1 burstier, above 1
more regular. The first request goes at time 0. A rate of infinity sends every
request at once.
"""
from __future__ import annotations

import math

import numpy as np


def check_rate(request_rate: float, burstiness: float) -> None:
    """Raise ValueError naming the flag whose value cannot describe arrivals."""
    if math.isnan(request_rate) or request_rate <= 0:
        raise ValueError(f"--request-rate must be a positive number of requests per second or inf, "
                         f"got {request_rate}")
    if not math.isfinite(burstiness) or burstiness <= 0:
        raise ValueError(f"--burstiness must be a positive finite number (1: Poisson), got {burstiness}")


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0,
                    seed: int = 0) -> list[float]:
    """Seconds after the start at which each request is sent, non-decreasing, the first at 0."""
    check_rate(request_rate, burstiness)
    if math.isinf(request_rate) or num_requests == 0:
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
