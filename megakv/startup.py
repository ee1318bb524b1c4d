"""What ``megakv generate`` and ``megakv serve`` do alike before their engine exists: open the checkpoint
against the options, check that the KV pool fits this rank's memory, find the chat's end-of-turn token."""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from megakv.chat import ChatTemplate
from megakv.checkpoint.format import CheckpointInfo, read_checkpoint_info
from megakv.config import EngineConfig, dtype_name, parse_dtype
from megakv.kernels.cpu_build import cpu_flags
from megakv.kvcache.kv_cache import KVCache, available_memory_bytes
from megakv.options import UsageError, option_source
from megakv.tokenizer import TextTokenizer

# CPU flags (/proc/cpuinfo) of bf16 arithmetic: AVX-512 bf16 dot products, or AMX tiles.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def open_checkpoint(model_dir: str, options: dict,
                    config: EngineConfig) -> tuple[CheckpointInfo, torch.dtype | None]:
    """The checkpoint and the dtype asked for (None: auto, see :func:`run_dtype`), checked against the TP degree
    before any process group exists."""
    info = read_checkpoint_info(model_dir)
    tp = config.parallel.tensor_parallel_size
    info.model.check_tensor_parallel_size(tp)
    if info.tensor_parallel_size != tp:
        raise UsageError(f"checkpoint {model_dir} is sharded for tp={info.tensor_parallel_size}, not --tp {tp}: "
                         f"pass --tp {info.tensor_parallel_size} or reshard it with tools/convert_checkpoint.py")
    requested = options["dtype"]
    return info, None if requested in (None, "auto") else parse_dtype(requested)


def auto_dtype(info: CheckpointInfo, device: torch.device) -> torch.dtype:
    """``--dtype auto``: the checkpoint's dtype, except that an fp32 checkpoint runs in bf16 on a CPU with bf16
    arithmetic (avx512_bf16 or AMX), where bf16 halves the bytes a decode step reads and the C++ ops use the
    CPU's bf16 dot products. fp16 checkpoints (bf16 would drop mantissa bits) and GPUs keep the checkpoint's."""
    checkpoint = info.model.torch_dtype
    if device.type == "cpu" and checkpoint == torch.float32 and cpu_flags() & BF16_CPU_FLAGS:
        return torch.bfloat16
    return checkpoint


def run_dtype(requested: torch.dtype | None, info: CheckpointInfo, device: torch.device) -> torch.dtype:
    """The dtype every rank runs in: the one asked for, else rank 0's :func:`auto_dtype` for all (ranks on
    machines with different CPUs must still hold KV blocks of one dtype)."""
    if requested is not None:
        return requested
    choice = [dtype_name(auto_dtype(info, device))]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return parse_dtype(choice[0])


def check_kv_pool_fits(args: argparse.Namespace, info: CheckpointInfo, config: EngineConfig, dtype: torch.dtype,
                       device: torch.device) -> None:
    """Refuse a KV pool larger than this rank's free memory before anything is allocated for it."""
    cache, tp = config.cache, config.parallel.tensor_parallel_size
    block_bytes = KVCache.bytes_per_block(info.model, tp, cache.block_size, dtype)
    num_blocks = KVCache.num_blocks_for(info.model, tp, cache, dtype)
    needed, available = num_blocks * block_bytes, available_memory_bytes(device)
    if needed > available:
        key = "num_blocks" if cache.num_blocks is not None else "kv_cache_memory_gb"
        raise UsageError(f"{option_source(args, key)}: the KV pool of {num_blocks} blocks of {block_bytes} bytes "
                         f"needs {needed} bytes ({needed / 2**30:.1f} GiB) on each rank, but {device} has "
                         f"{available} bytes ({available / 2**30:.1f} GiB) available")


def chat_stop_token_ids(tokenizer: TextTokenizer | None, chat: ChatTemplate | None) -> tuple[int, ...]:
    """The id of the chat template's end-of-turn token, which ends a chat request as EOS does."""
    if tokenizer is None or chat is None or chat.end_of_turn_token is None:
        return ()
    token_id = tokenizer.token_to_id(chat.end_of_turn_token)
    return () if token_id is None else (token_id,)
