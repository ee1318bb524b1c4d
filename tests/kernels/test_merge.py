"""The Triton log-sum-exp merge against its reference, and against attention over the union of the splits."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from megakv.kernels.merge import merge_partials_ref, merge_partials_triton  # noqa: E402
from megakv.kernels.micro_attention import micro_attention_ref  # noqa: E402
from megakv.kernels.ops import merge_partials  # noqa: E402


@pytest.mark.parametrize("num_partials", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_partials_triton_matches_reference(random_partials, num_partials, dtype, device):
    outs, lses = random_partials(num_partials, num_partials, dtype)
    expected_out, expected_lse = merge_partials_ref(outs, lses)
    out, lse = merge_partials_triton(outs.to(device), lses.to(device))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.cpu(), expected_out, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse.cpu(), expected_lse)
    assert torch.isneginf(lse[0, 0]) and (out[0, 0] == 0).all() and not torch.isnan(out).any()


@pytest.mark.parametrize("seed", range(3))
def test_merge_partials_of_random_block_splits_equal_whole_attention(paged_batch, attention_close, device, seed):
    query, key_cache, value_cache, block_tables, query_start_loc, context_lens = paged_batch(
        seed, 1, 4, 16, 64, torch.float32, num_queries=[1, 4, 1], max_context=80)
    scale = 0.125
    expected_out, expected_lse = micro_attention_ref(query, key_cache, value_cache, block_tables, query_start_loc,
                                                     context_lens, scale)
    gen = torch.Generator().manual_seed(seed)
    num_splits = [2, 3, 6][seed]  # with 6 splits over few blocks, some splits are empty
    owner = torch.randint(0, num_splits, block_tables.shape, generator=gen)
    partials = [micro_attention_ref(query, key_cache, value_cache, block_tables.masked_fill(owner != split, -1),
                                    query_start_loc, context_lens, scale) for split in range(num_splits)]
    outs = torch.stack([out for out, _ in partials])
    lses = torch.stack([lse for _, lse in partials])
    for merge in (merge_partials, merge_partials_triton):
        out, lse = merge(outs.to(device), lses.to(device))
        attention_close(out, lse, expected_out, expected_lse, torch.float32)


def test_merge_partials_triton_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[P, N, H\]"):
        merge_partials_triton(torch.zeros(2, 3, 4, 8), torch.zeros(2, 3))
