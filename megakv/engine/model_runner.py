"""Turns a scheduled step into model inputs, runs the model, and samples.

All ranks of a tensor-parallel group run the same schedule; TP rank 0 samples
and broadcasts the tokens so that every rank appends exactly the same ones.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megakv.attention.metadata import AttentionMetadata
from megakv.engine.sampling import Sampler
from megakv.engine.scheduler import SchedulerOutput
from megakv.kvcache.block_manager import BlockManager
from megakv.kvcache.kv_cache import KVCache
from megakv.models.llama import LlamaModel
from megakv.parallel import state


class ModelRunner:
    """Owns the model and this rank's KV pool tensors."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, block_manager: BlockManager,
                 device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.device = device
        self.sampler = Sampler()

    def prepare(self, scheduled: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                           torch.Tensor]:
        """Flatten the step's chunks into (input_ids, positions, metadata, logits_indices)."""
        block_size = self.block_manager.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        query_start_loc = [0]
        context_lens: list[int] = []
        logits_indices: list[int] = []
        tables = [self.block_manager.block_table(chunk.request.request_id) for chunk in scheduled.chunks]
        max_blocks = max(len(table) for table in tables)
        block_tables = torch.full((len(tables), max_blocks), -1, dtype=torch.int32)
        for row, (chunk, table) in enumerate(zip(scheduled.chunks, tables)):
            end = chunk.start + chunk.num_tokens
            input_ids.extend(chunk.request.token_ids[chunk.start:end])
            positions.extend(range(chunk.start, end))
            query_start_loc.append(len(input_ids))
            context_lens.append(end)
            block_tables[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
            if chunk.samples_next_token:
                logits_indices.append(len(input_ids) - 1)
        positions_tensor = torch.tensor(positions, dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(tables)),
                                       torch.tensor([chunk.num_tokens for chunk in scheduled.chunks]))
        slot_mapping = block_tables[rows, positions_tensor // block_size].long() * block_size \
            + positions_tensor % block_size
        metadata = AttentionMetadata(query_start_loc=query_start_loc, context_lens=context_lens,
                                     block_tables=block_tables.to(self.device),
                                     slot_mapping=slot_mapping.to(self.device))
        return (torch.tensor(input_ids, dtype=torch.long, device=self.device), positions_tensor.to(self.device),
                metadata, torch.tensor(logits_indices, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def compute_logits(self, scheduled: SchedulerOutput, every_token: bool = False) -> torch.Tensor:
        """Run one step; logits [N, vocab] of the sampling chunks' last tokens, or of every token."""
        input_ids, positions, metadata, logits_indices = self.prepare(scheduled)
        return self.model(input_ids, positions, self.kv_cache, metadata, None if every_token else logits_indices)

    def execute(self, scheduled: SchedulerOutput) -> list[int]:
        """Run one step; returns the next token of every chunk that samples, in batch order."""
        logits = self.compute_logits(scheduled)
        sampling = [chunk.request for chunk in scheduled.chunks if chunk.samples_next_token]
        if not sampling:
            return []
        tokens = self.sampler.sample(logits, [r.request_id for r in sampling], [r.params for r in sampling])
        return self._broadcast_from_tp_rank0(tokens)

    def _broadcast_from_tp_rank0(self, tokens: list[int]) -> list[int]:
        if state.get_tensor_model_parallel_world_size() == 1:
            return tokens
        tensor = torch.tensor(tokens, dtype=torch.long, device=self.device)
        dist.broadcast(tensor, src=state.get_tensor_model_parallel_src_rank(),
                       group=state.get_tensor_model_parallel_group())
        return tensor.tolist()
