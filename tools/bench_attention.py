"""Benchmark megakv's paged (rBlock) attention (CPU, or a GPU) against torch SDPA on contiguous KV; prints JSON.

Decode: for each context and batch, KV bytes read per second by megakv's paged micro-attention
(``megakv.kernels.ops.micro_attention``, block tables a random permutation of the pool), by
``scaled_dot_product_attention`` on the same KV stored contiguously, and the machine's memory read
bandwidth (a sum over a 1 GiB tensor), the three timed in turn; and the paged path over a KV that stays in
cache (its compute ceiling, which no memory can lift it above). Prefill: one chunk of queries over a long
context against SDPA with a bottom-right causal mask. fp32 unless ``--dtype`` says otherwise.

Default model shapes: 8 query heads, 2 KV heads, head_dim 128 (one tensor-parallel rank of a GQA model
such as LLaMA-3-8B at TP=4): 2 KiB of K+V per token, so batch 8 x 128K tokens is 2 GiB paged plus 2 GiB
contiguous.

    python tools/bench_attention.py                       # everything (about 3 minutes, 5 GiB peak)
    python tools/bench_attention.py --contexts 16384 --batches 1 --no-prefill
    python tools/bench_attention.py --device cuda --dtype bfloat16 --contexts 32768 131072   # the GPU target
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from megakv.bench.memory import ReadBandwidth
from megakv.kernels.cpu_attention import load_extension
from megakv.kernels.cpu_build import VARIANTS_BY_ISA, cpu_model, runnable_isas, selected_isa
from megakv.kernels.ops import micro_attention
from megakv.kvcache.kv_cache import pool_tensor


# 16 MiB of K/V: inside this machine's 32 MiB L3 (and an H100's 50 MiB L2), and enough that per-call overhead is small.
RESIDENT_CONTEXT_BYTES = 16 << 20


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer around a call measures the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(*fns, repeats: int, device: torch.device) -> list[float]:
    """The fastest of ``repeats`` timed calls of each function, after one warm-up call each.

    The functions take turns, so that load from other processes on a shared machine hits them alike.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def to_pool(keys: torch.Tensor, values: torch.Tensor, block_size: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter contiguous K/V [B, Hkv, ctx, D] over a pool (allocated as the engine allocates its own) in
    random block order: the worst case, the order a long-running server's free list ends up in.

    Returns (key_cache, value_cache [B * ctx / block_size, Hkv, block_size, D], block_tables int32 [B, nb]).
    """
    batch, num_kv_heads, context, head_dim = keys.shape
    blocks_per_seq = context // block_size
    block_tables = torch.randperm(batch * blocks_per_seq, generator=generator).view(batch, blocks_per_seq)
    caches = []
    for contiguous in (keys, values):
        cache = pool_tensor((batch * blocks_per_seq, num_kv_heads, block_size, head_dim), keys.dtype, keys.device)
        # [B, Hkv, nb, bs, D] -> [B, nb, Hkv, bs, D] -> [B * nb, Hkv, bs, D]
        blocks = contiguous.view(batch, num_kv_heads, blocks_per_seq, block_size, head_dim).transpose(1, 2)
        cache[block_tables.flatten().to(keys.device)] = blocks.reshape(-1, num_kv_heads, block_size, head_dim)
        caches.append(cache)
    return caches[0], caches[1], block_tables.to(keys.device, torch.int32)


def random_kv(batch: int, context: int, args, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random contiguous K/V [B, Hkv, ctx, D] and the same K/V in a pool (see :func:`to_pool`).

    Returns (keys, values, key_cache, value_cache, block_tables).
    """
    shape = (batch, args.num_kv_heads, context, args.head_dim)
    keys = torch.randn(shape, generator=generator).to(args.device, args.dtype)
    values = torch.randn(shape, generator=generator).to(args.device, args.dtype)
    return (keys, values) + to_pool(keys, values, args.block_size, generator)


def bench_decode(context: int, batch: int, args, generator: torch.Generator, bandwidth: ReadBandwidth) -> dict:
    """One decode step of ``batch`` sequences of ``context`` tokens: paged path, contiguous SDPA, a plain read."""
    num_q_heads = args.num_kv_heads * args.group
    keys, values, key_cache, value_cache, block_tables = random_kv(batch, context, args, generator)
    query = torch.randn(batch, num_q_heads, args.head_dim, generator=generator).to(args.device, args.dtype)
    scale = args.head_dim ** -0.5
    query_start_loc = list(range(batch + 1))
    context_lens = [context] * batch
    kv_bytes = 2 * keys.numel() * keys.element_size()
    # SDPA reads each KV head once when the query heads of a group are its rows: [B, Hkv, group, D].
    grouped_query = query.view(batch, args.num_kv_heads, args.group, args.head_dim)
    paged, sdpa, read = best_seconds(
        lambda: micro_attention(query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale),
        lambda: F.scaled_dot_product_attention(grouped_query, keys, values, scale=scale), bandwidth,
        repeats=args.repeats, device=args.device)
    paged_gbps, sdpa_gbps, read_gbps = kv_bytes / paged / 1e9, kv_bytes / sdpa / 1e9, bandwidth.gbps(read)
    return dict(case="decode", context=context, batch=batch, kv_bytes=kv_bytes, paged_gbps=paged_gbps,
                sdpa_contiguous_gbps=sdpa_gbps, read_bandwidth_gbps=read_gbps, paged_ms=paged * 1e3,
                sdpa_ms=sdpa * 1e3, paged_vs_sdpa=paged_gbps / sdpa_gbps, paged_vs_bandwidth=paged_gbps / read_gbps)


def bench_cache_resident(args, generator: torch.Generator, calls: int = 50) -> dict:
    """Decode over a KV small enough to stay in the last-level cache: the paged path's compute ceiling.

    A decode row's paged_gbps is bounded by this figure as well as by the memory: where it is not far above
    the read bandwidth, only overlapping every memory stall with compute could reach that bandwidth.
    """
    context = RESIDENT_CONTEXT_BYTES // (2 * args.num_kv_heads * args.head_dim * args.dtype.itemsize)
    num_q_heads = args.num_kv_heads * args.group
    keys, values, key_cache, value_cache, block_tables = random_kv(1, context, args, generator)
    query = torch.randn(1, num_q_heads, args.head_dim, generator=generator).to(args.device, args.dtype)
    scale = args.head_dim ** -0.5

    def repeated() -> None:
        for _ in range(calls):
            micro_attention(query, key_cache, value_cache, block_tables, [0, 1], [context], scale)

    (seconds,) = best_seconds(repeated, repeats=args.repeats, device=args.device)
    kv_bytes = 2 * keys.numel() * keys.element_size()
    return dict(case="decode_cache_resident", context=context, batch=1, kv_bytes=kv_bytes,
                paged_gbps=kv_bytes * calls / seconds / 1e9)


def bench_prefill(context: int, num_queries: int, args, generator: torch.Generator) -> dict:
    """A chunk of ``num_queries`` new tokens at the end of ``context``: paged path vs SDPA causal."""
    num_q_heads = args.num_kv_heads * args.group
    keys, values, key_cache, value_cache, block_tables = random_kv(1, context, args, generator)
    query = torch.randn(num_queries, num_q_heads, args.head_dim, generator=generator).to(args.device, args.dtype)
    scale = args.head_dim ** -0.5
    # Query i sees context - num_queries + 1 + i keys: a bottom-right aligned causal mask.
    visible = torch.arange(context - num_queries + 1, context + 1, device=args.device)
    mask = torch.arange(context, device=args.device)[None, :] < visible[:, None]  # [n, ctx]
    sdpa_query = query.transpose(0, 1)[None]  # [1, Hq, n, D]
    paged, sdpa = best_seconds(
        lambda: micro_attention(query, key_cache, value_cache, block_tables, [0, num_queries], [context], scale),
        lambda: F.scaled_dot_product_attention(sdpa_query, keys, values, attn_mask=mask, scale=scale,
                                               enable_gqa=True), repeats=args.repeats, device=args.device)
    return dict(case="prefill", context=context, batch=1, num_queries=num_queries, paged_ms=paged * 1e3,
                sdpa_causal_ms=sdpa * 1e3, paged_vs_sdpa=sdpa / paged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prefill-queries", type=int, default=512)
    parser.add_argument("--prefill-context", type=int, default=16384)
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="of the query and K/V (the targets are set for float32)")
    parser.add_argument("--isa", choices=list(VARIANTS_BY_ISA),
                        help="build of the CPU op to time (default: the best this CPU runs; sets MEGAKV_CPU_ISA)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda to time the Triton kernels (with --dtype bfloat16 for the GPU target)")
    args = parser.parse_args()
    if args.isa is not None:
        if args.isa not in runnable_isas():
            parser.error(f"--isa {args.isa}: this CPU can run only {', '.join(runnable_isas())}")
        os.environ["MEGAKV_CPU_ISA"] = args.isa
    args.dtype = getattr(torch, args.dtype)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    generator = torch.Generator().manual_seed(0)
    if args.device.type == "cpu":
        load_extension()  # build (or load) the C++ op before timing
    results = []
    if not args.no_decode:
        bandwidth = ReadBandwidth(args.device)
        results += [bench_decode(context, batch, args, generator, bandwidth)
                    for context in args.contexts for batch in args.batches]
        del bandwidth
        results.append(bench_cache_resident(args, generator))
    if not args.no_prefill:
        results.append(bench_prefill(args.prefill_context, args.prefill_queries, args, generator))
    on_cpu = args.device.type == "cpu"
    report = dict(
        machine=dict(processor=cpu_model(), num_threads=torch.get_num_threads(), torch=torch.__version__,
                     device=str(args.device), cpu_isas=list(runnable_isas()),
                     cpu_extension=load_extension() is not None if on_cpu else None,
                     cpu_extension_isa=selected_isa() if on_cpu and load_extension() is not None else None,
                     gpu=torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None),
        shapes=dict(num_q_heads=args.num_kv_heads * args.group, num_kv_heads=args.num_kv_heads,
                    head_dim=args.head_dim, block_size=args.block_size, dtype=str(args.dtype).removeprefix("torch.")),
        results=results)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
