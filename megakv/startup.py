"""What ``megakv generate`` and ``megakv serve`` do alike before their engine exists: open the checkpoint
against the options, check that the KV pool fits this rank's memory, find the chat's end-of-turn token."""
from __future__ import annotations

import argparse

import torch

from megakv.chat import ChatTemplate
from megakv.checkpoint.format import CheckpointInfo, read_checkpoint_info
from megakv.config import EngineConfig, parse_dtype
from megakv.kvcache.kv_cache import KVCache, available_memory_bytes
from megakv.options import UsageError, option_source
from megakv.tokenizer import TextTokenizer


def open_checkpoint(model_dir: str, options: dict, config: EngineConfig) -> tuple[CheckpointInfo, torch.dtype]:
    """The checkpoint and the dtype to run it in, checked against the TP degree before any process group exists."""
    info = read_checkpoint_info(model_dir)
    tp = config.parallel.tensor_parallel_size
    info.model.check_tensor_parallel_size(tp)
    if info.tensor_parallel_size != tp:
        raise UsageError(f"checkpoint {model_dir} is sharded for tp={info.tensor_parallel_size}, not --tp {tp}: "
                         f"pass --tp {info.tensor_parallel_size} or reshard it with tools/convert_checkpoint.py")
    dtype = parse_dtype(options["dtype"]) if options["dtype"] else info.model.torch_dtype
    return info, dtype


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
