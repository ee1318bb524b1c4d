"""The tensors of one rank's rBlock pool: keys and values of every layer.

An rBlock holds ``block_size`` tokens of every layer's K and V for the KV heads
of this rank's tensor-parallel shard (DistKV-LLM section 4.1).
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

from megakv.config import CacheConfig, ModelConfig


# madvise advice asking for transparent huge pages (linux/mman.h), and their size on x86-64 (and on arm64
# with 4 KiB base pages; elsewhere the advice covers whole 2 MiB ranges, which still holds larger pages).
MADV_HUGEPAGE = 14
HUGE_PAGE_BYTES = 2 << 20


def _advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask Linux to back the tensor's whole 2 MiB pages with huge pages (a no-op where THP is off)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    length = (end - first) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if length > 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(first, length, MADV_HUGEPAGE)


def pool_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed KV pool tensor; in CPU memory on Linux, backed by transparent huge pages where allowed.

    A decode step reads a long context's blocks in table order, which after some serving is random pool
    order: with 4 KiB pages almost every block costs TLB misses (page walks are dearer still in a VM).
    Huge pages raised the CPU decode op from 0.52 to 0.65 of the read bandwidth at 64K tokens
    (tools/bench_attention.py). The advice must come before the pages are first touched.
    """
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if tensor.device.type == "cpu" and sys.platform.startswith("linux"):
        _advise_huge_pages(tensor)
    return tensor.zero_()


def available_memory_bytes(device: torch.device) -> int:
    """Bytes a new allocation may take on ``device``: the GPU's free memory, else the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # No /proc (not Linux): free pages, which undercounts what the page cache would give back.
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class KVCache:
    """Per-layer key and value pools, each ``[num_blocks, num_kv_heads, block_size, head_dim]``."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Heads before tokens: one head's block is a contiguous [block_size, head_dim] tile.
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.key_cache = pool_tensor(shape, dtype, device)
        self.value_cache = pool_tensor(shape, dtype, device)

    @staticmethod
    def bytes_per_block(model: ModelConfig, tp: int, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one rBlock on one rank (K and V, all layers)."""
        element_size = torch.empty((), dtype=dtype).element_size()
        return (2 * model.num_layers * block_size * model.num_kv_heads_per_partition(tp) * model.head_dim
                * element_size)

    @classmethod
    def num_blocks_for(cls, model: ModelConfig, tp: int, cache: CacheConfig, dtype: torch.dtype) -> int:
        """The pool size: ``cache.num_blocks``, or as many blocks as fit in the memory budget."""
        if cache.num_blocks is not None:
            return cache.num_blocks
        num_blocks = int(cache.kv_cache_memory_gb * 2**30) // cls.bytes_per_block(model, tp, cache.block_size, dtype)
        if num_blocks == 0:
            raise ValueError(f"kv_cache_memory_gb={cache.kv_cache_memory_gb} holds no block of "
                             f"{cache.block_size} tokens; raise it or lower block_size")
        return num_blocks

    @property
    def num_layers(self) -> int:
        return self.key_cache.shape[0]

    def layer(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's (key, value) pools."""
        return self.key_cache[layer_index], self.value_cache[layer_index]
