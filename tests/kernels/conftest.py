"""Kernel test helpers. The Triton kernels run natively on a GPU and in the interpreter on CPU
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports them)."""
from __future__ import annotations

import pytest
import torch

from megakv.kernels import cpu_attention
from megakv.kernels.cpu_build import runnable_isas

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=runnable_isas())
def isa(request, monkeypatch):
    """Each build of the C++ CPU ops this CPU can execute (skipped where it does not build)."""
    monkeypatch.setenv("MEGAKV_CPU_ISA", request.param)
    if cpu_attention.load_extension() is None:
        pytest.skip(f"the C++ CPU op ({request.param}) did not build here")
    return request.param


def make_paged_batch(seed: int, num_kv_heads: int, group: int, block_size: int, head_dim: int,
                     dtype: torch.dtype, num_queries: list[int], max_context: int,
                     absent_fraction: float = 0.0):
    """Random sequences scattered over a NaN-filled pool larger than they need.

    num_queries[s] new tokens for sequence s (1 = decode); context lengths are random in
    [num_queries[s], max_context]; slots past a context and unused blocks hold NaN; a fraction of each
    table's entries is set to -1 (blocks of another micro-attention). Returns
    (query, key_cache, value_cache, block_tables, query_start_loc, context_lens).
    """
    gen = torch.Generator().manual_seed(seed)
    context_lens = [int(torch.randint(n, max_context + 1, (1,), generator=gen)) for n in num_queries]
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_pool_blocks = 2 * sum(blocks_per_seq) + 3
    key_cache = torch.full((num_pool_blocks, num_kv_heads, block_size, head_dim), float("nan"), dtype=dtype)
    value_cache = torch.full_like(key_cache, float("nan"))
    physical = torch.randperm(num_pool_blocks, generator=gen)
    block_tables = torch.full((len(num_queries), max(blocks_per_seq) + 2), -1, dtype=torch.int32)
    next_block = 0
    for seq, (context_len, num_blocks) in enumerate(zip(context_lens, blocks_per_seq)):
        table = physical[next_block:next_block + num_blocks]
        next_block += num_blocks
        block_tables[seq, :num_blocks] = table.to(torch.int32)
        for logical, block_id in enumerate(table.tolist()):
            num_tokens = min(block_size, context_len - logical * block_size)
            shape = (num_kv_heads, num_tokens, head_dim)
            key_cache[block_id, :, :num_tokens] = torch.randn(shape, generator=gen).to(dtype)
            value_cache[block_id, :, :num_tokens] = torch.randn(shape, generator=gen).to(dtype)
    if absent_fraction > 0:
        absent = torch.rand(block_tables.shape, generator=gen) < absent_fraction
        block_tables = block_tables.masked_fill(absent, -1)
    query = torch.randn(sum(num_queries), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    query_start_loc = [0]
    for n in num_queries:
        query_start_loc.append(query_start_loc[-1] + n)
    return query, key_cache, value_cache, block_tables, query_start_loc, context_lens


def assert_attention_close(out: torch.Tensor, lse: torch.Tensor, expected_out: torch.Tensor,
                           expected_lse: torch.Tensor, dtype: torch.dtype) -> None:
    """Outputs match within the dtype's tolerance; lse matches, -inf exactly where expected."""
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float().cpu(), expected_out.float().cpu(), atol=tolerance, rtol=tolerance)
    empty = torch.isinf(expected_lse)
    assert torch.equal(torch.isinf(lse.cpu()), empty.cpu())
    torch.testing.assert_close(lse.cpu()[~empty], expected_lse.cpu()[~empty], atol=1e-4, rtol=1e-4)


def make_random_partials(seed: int, num_partials: int, dtype: torch.dtype,
                         head_dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials [P, N, H, D] with random lses; some partials empty (-inf), and one row empty everywhere."""
    gen = torch.Generator().manual_seed(seed)
    outs = torch.randn(num_partials, 5, 4, head_dim, generator=gen).to(dtype)
    lses = torch.randn(num_partials, 5, 4, generator=gen) * 3
    lses = lses.masked_fill(torch.rand(lses.shape, generator=gen) < 0.3, float("-inf"))
    lses[:, 0, 0] = float("-inf")
    outs[:, 0, 0] = 0
    return outs, lses


@pytest.fixture
def random_partials():
    """The partials builder (see make_random_partials)."""
    return make_random_partials


@pytest.fixture
def paged_batch():
    """The batch builder (see make_paged_batch)."""
    return make_paged_batch


@pytest.fixture
def attention_close():
    """The comparison of (out, lse) with the reference (see assert_attention_close)."""
    return assert_attention_close


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: the GPU when there is one, else the interpreter on CPU."""
    return DEVICE


def poison_blocks_before_windows(key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                                 query_start_loc: list[int], context_lens: list[int],
                                 window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches with NaN in every block wholly before its sequence's first query's window.

    A kernel that reads such a block (it must not) returns NaN.
    """
    block_size = key_cache.shape[2]
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    for seq, context_len in enumerate(context_lens):
        num_queries = query_start_loc[seq + 1] - query_start_loc[seq]
        first_visible = context_len - num_queries + 1
        for logical in range(max(0, first_visible - window) // block_size):
            block_id = int(block_tables[seq, logical])
            if block_id >= 0:
                key_cache[block_id] = float("nan")
                value_cache[block_id] = float("nan")
    return key_cache, value_cache


@pytest.fixture
def poison_before_windows():
    """The cache poisoner (see poison_blocks_before_windows)."""
    return poison_blocks_before_windows
