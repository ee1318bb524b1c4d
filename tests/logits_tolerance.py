"""How close the fp32 logits of two implementations of one deep model must be, and why."""
from __future__ import annotations

import torch

FP32_EPS = torch.finfo(torch.float32).eps
# Observed worst ratios sit near 1 (SmolLM2, 30 layers, 1,134 tokens, against transformers on Intel and AMD hosts);
# the margin covers other CPUs' and releases' summation orders, and is still far below what a real bug moves.
MARGIN = 8


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, num_layers: int) -> None:
    """Each row of ``actual`` is within ``MARGIN * num_layers * eps32`` of the row's largest logit of ``expected``.

    Two fp32 implementations that differ only in summation order (blocked GEMMs, tensor-parallel partial sums, a
    split softmax) round differently in every layer: each layer adds an error of about eps32 relative to the
    residual stream, so the last hidden state is off by about ``num_layers * eps32`` of its size, and every logit
    of a row, a dot product with that state, by about that fraction of the row's scale (its largest magnitude).
    An absolute bound cannot say this: it is loose for a small model and tight for a deep one with large logits.
    A wrong weight, rotary embedding or mask moves logits by a large fraction of the scale, far above this bound.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)  # [T, 1]
    bound = MARGIN * num_layers * FP32_EPS * scale
    ratio = ((actual.double() - expected.double()).abs() / bound).max().item()
    assert ratio <= 1, (f"logits differ by {ratio:.3g} times the fp32 bound {MARGIN} * {num_layers} layers * "
                        f"eps32 * row scale (largest row scale {scale.max().item():.3g})")
