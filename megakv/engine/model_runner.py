"""Turns a scheduled step into model inputs, runs the model, and samples.

With one instance, all ranks of the TP group run the same schedule and TP rank 0
broadcasts the sampled tokens. With several instances, the instance's leader
prepares the inputs (including which queries go to which creditor) and sends
them to its TP group (see megakv.distkv.instance_ranks).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megakv.attention.metadata import AttentionMetadata
from megakv.attention.remote import OutgoingQueries, ServedQueries
from megakv.engine.sampling import SampledTokens, Sampler, token_logprobs
from megakv.engine.scheduler import SchedulerOutput
from megakv.kvcache.kv_cache import KVCache
from megakv.kvcache.rmanager import BlockRef, RManager
from megakv.models.llama import LlamaModel
from megakv.parallel import state


@dataclass
class StepInputs:
    """Everything a rank needs to run one step's forward pass."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    # Rows whose logits are computed: the last token of each chunk that completes its request (sampled), then
    # the rows of the chunks' prompt_logprob_positions, in batch order.
    logits_indices: torch.Tensor
    # Per creditor: which rows attend to blocks there and whose K/V are stored there.
    outgoing: list[OutgoingQueries] = field(default_factory=list)
    # Per creditor: the micro-attention it must run for this instance (sent in the control round).
    served_by_creditor: dict[int, ServedQueries] = field(default_factory=dict)

    def __getstate__(self) -> dict:
        """Tensors travel as numpy arrays: the leader sends every step's inputs to its TP ranks, and
        pickling numpy is several times cheaper than pickling torch tensors."""
        metadata = self.metadata
        return {**self.__dict__, "device": str(self.input_ids.device),
                "metadata": {**metadata.__dict__, "block_tables": metadata.block_tables.cpu().numpy(),
                             "slot_mapping": metadata.slot_mapping.cpu().numpy()},
                **{name: getattr(self, name).cpu().numpy() for name in _TENSOR_FIELDS}}

    def __setstate__(self, state: dict) -> None:
        device = state.pop("device")
        metadata = dict(state.pop("metadata"))
        for name in ("block_tables", "slot_mapping"):
            metadata[name] = torch.from_numpy(metadata[name]).to(device)
        self.__dict__.update(state, metadata=AttentionMetadata(**metadata))
        for name in _TENSOR_FIELDS:
            setattr(self, name, torch.from_numpy(state[name]).to(device))


_TENSOR_FIELDS = ("input_ids", "positions", "logits_indices")


class _TableView:
    """Tensors of one version of a request's block table, reused by every step until the table changes.

    Rebuilding them from the table's refs each step costs about as much as a decode step's
    attention at short context once tables hold thousands of blocks.
    """

    def __init__(self, refs: list[BlockRef], version: int, instance_id: int) -> None:
        self.version = version
        self.owners = torch.tensor([ref.instance_id for ref in refs], dtype=torch.int32)
        self.block_ids = torch.tensor([ref.block_id for ref in refs], dtype=torch.int32)
        here = self.owners == instance_id
        # This instance's block ids by logical index, -1 where the block lives elsewhere.
        self.local_row = torch.where(here, self.block_ids, -1)
        self._instance_id = instance_id
        self._is_local = bool(here.all())
        self._rows: dict[int, list[int]] = {}

    def creditors(self, first_block: int, num_blocks: int) -> list[int]:
        """Other instances holding some of blocks first_block .. num_blocks - 1."""
        if self._is_local:
            return []
        return sorted(set(self.owners[first_block:num_blocks].tolist()) - {self._instance_id})

    def row_for(self, creditor: int) -> list[int]:
        """The creditor's block ids by logical index, -1 elsewhere (what the creditor attends over)."""
        if creditor not in self._rows:
            self._rows[creditor] = torch.where(self.owners == creditor, self.block_ids, -1).tolist()
        return self._rows[creditor]


class ModelRunner:
    """Owns the model and this rank's KV pool tensors."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, rmanager: RManager, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.rmanager = rmanager
        self.device = device
        self.sampler = Sampler(model.config.eos_token_ids)
        self._views: dict[str, _TableView] = {}
        # Micro-attentions asked of other instances since start: one per request chunk and creditor in a step.
        self.num_remote_micro_attentions = 0

    def _table_view(self, request_id: str) -> _TableView:
        view = self._views.get(request_id)
        version = self.rmanager.table_version(request_id)
        if view is None or view.version != version:
            view = _TableView(self.rmanager.block_table(request_id), version, self.rmanager.instance_id)
        return view

    def prepare(self, scheduled: SchedulerOutput) -> StepInputs:
        """Flatten the step's chunks into model inputs; blocks on other instances become remote work."""
        me, block_size = self.rmanager.instance_id, self.rmanager.block_size
        window = self.model.config.sliding_window
        input_ids: list[int] = []
        positions: list[int] = []
        query_start_loc = [0]
        context_lens: list[int] = []
        logits_indices: list[int] = []
        prompt_logprob_rows: list[int] = []
        slot_mapping: list[torch.Tensor] = []
        views = {chunk.request.request_id: self._table_view(chunk.request.request_id) for chunk in scheduled.chunks}
        # Only this step's requests stay cached: a finished request's views go with it.
        self._views = views
        local_tables = torch.full((len(views), max(len(view.owners) for view in views.values())), -1,
                                  dtype=torch.int32)
        outgoing: dict[int, OutgoingQueries] = {}
        served: dict[int, ServedQueries] = {}
        for row, chunk in enumerate(scheduled.chunks):
            view = views[chunk.request.request_id]
            start, end = chunk.start, chunk.start + chunk.num_tokens
            first_row = len(input_ids)
            input_ids.extend(chunk.request.token_ids[start:end])
            positions.extend(range(start, end))
            query_start_loc.append(len(input_ids))
            context_lens.append(end)
            if chunk.samples_next_token:
                logits_indices.append(len(input_ids) - 1)
            prompt_logprob_rows.extend(first_row + position - start for position in chunk.prompt_logprob_positions)
            local_tables[row, :len(view.owners)] = view.local_row
            token_positions = torch.arange(start, end)
            token_blocks = token_positions // block_size
            token_owners = view.owners[token_blocks]
            slots = view.block_ids[token_blocks].long() * block_size + token_positions % block_size
            slot_mapping.append(torch.where(token_owners == me, slots, -1))
            # A creditor that holds only blocks before the chunk's first window is not asked.
            first_block = 0 if window is None else max(0, start + 1 - window) // block_size
            for creditor in view.creditors(first_block, -(-end // block_size)):
                out = outgoing.setdefault(creditor, OutgoingQueries(creditor, [], []))
                out.query_indices.extend(range(first_row, len(input_ids)))
                writes = (token_owners == creditor).nonzero().flatten()
                out.write_indices.extend((writes + first_row).tolist())
                work = served.setdefault(creditor, ServedQueries(me, [], [0], [], [], window))
                work.write_slots.extend(slots[writes].tolist())
                work.query_start_loc.append(work.query_start_loc[-1] + chunk.num_tokens)
                work.context_lens.append(end)
                work.block_tables.append(view.row_for(creditor))
        self.num_remote_micro_attentions += sum(len(work.context_lens) for work in served.values())
        metadata = AttentionMetadata(query_start_loc=query_start_loc, context_lens=context_lens,
                                     block_tables=local_tables.to(self.device),
                                     slot_mapping=torch.cat(slot_mapping).to(self.device), sliding_window=window)
        return StepInputs(torch.tensor(input_ids, dtype=torch.long, device=self.device),
                          torch.tensor(positions, dtype=torch.long, device=self.device), metadata,
                          torch.tensor(logits_indices + prompt_logprob_rows, dtype=torch.long, device=self.device),
                          list(outgoing.values()), served)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, every_token: bool = False) -> torch.Tensor:
        """Logits [N, vocab] of the sampled rows, or of every token."""
        return self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.metadata,
                          None if every_token else inputs.logits_indices)

    def compute_logits(self, scheduled: SchedulerOutput, every_token: bool = False) -> torch.Tensor:
        """Prepare and run one step (see forward)."""
        return self.forward(self.prepare(scheduled), every_token)

    def sample(self, scheduled: SchedulerOutput, logits: torch.Tensor) -> SampledTokens:
        """The next token of every chunk that samples, in batch order, with logprobs where asked, and the prompt
        logprobs of the chunks that compute some (logits: the rows of StepInputs.logits_indices)."""
        sampling = [chunk.request for chunk in scheduled.chunks if chunk.samples_next_token]
        sampled = SampledTokens([], [])
        if sampling:
            sampled = self.sampler.sample(logits[:len(sampling)], [r.request_id for r in sampling],
                                          [r.params for r in sampling], sampling)
        row = len(sampling)
        for chunk in scheduled.chunks:
            positions, request = chunk.prompt_logprob_positions, chunk.request
            if positions:
                sampled.prompt_logprobs[request.request_id] = token_logprobs(
                    logits[row:row + len(positions)], request.prompt_ids[positions.start + 1:positions.stop + 1],
                    request.params.prompt_logprobs)
                row += len(positions)
        return sampled

    def execute(self, scheduled: SchedulerOutput) -> SampledTokens:
        """Run one single-instance step; every TP rank returns the same tokens.

        Logprobs are not broadcast: every rank computes them from the same logits, and only TP rank 0's reach
        a client.
        """
        sampled = self.sample(scheduled, self.compute_logits(scheduled))
        return dataclasses.replace(sampled, token_ids=self._broadcast_from_tp_rank0(sampled.token_ids))

    def _broadcast_from_tp_rank0(self, tokens: list[int]) -> list[int]:
        if state.get_tensor_model_parallel_world_size() == 1 or not tokens:
            return tokens
        tensor = torch.tensor(tokens, dtype=torch.long, device=self.device)
        dist.broadcast(tensor, src=state.get_tensor_model_parallel_src_rank(),
                       group=state.get_tensor_model_parallel_group())
        return tensor.tolist()
