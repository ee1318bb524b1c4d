"""The engine of one serving instance: add requests, step until they finish.

The step loop reads like the design: ``schedule()`` -> ``model_runner.execute()``
-> ``postprocess()``.
"""
from __future__ import annotations

import itertools
import time

import torch

from megakv.checkpoint.format import CheckpointInfo, load_shard
from megakv.config import EngineConfig, ModelConfig, dtype_name
from megakv.engine.model_runner import ModelRunner
from megakv.engine.request import Placement, Request, RequestOutput
from megakv.engine.sampling import SamplingParams
from megakv.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from megakv.distkv.rmanager import RManager
from megakv.kvcache.block_pool import BlockPool, num_blocks_for
from megakv.kvcache.kv_cache import KVCache
from megakv.models.llama import LlamaModel
from megakv.parallel import state


def load_model(info: CheckpointInfo, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    """Build the model on the meta device and fill it with this TP rank's shard, allocating once."""
    tp = state.get_tensor_model_parallel_world_size()
    if info.tensor_parallel_size != tp:
        raise ValueError(f"checkpoint {info.path} is sharded for tp={info.tensor_parallel_size}, not tp={tp}: "
                         f"run with --tp {info.tensor_parallel_size} or reshard it with tools/convert_checkpoint.py")
    config = ModelConfig.from_dict({**info.model.to_dict(), "dtype": dtype_name(dtype)})
    with torch.device("meta"):
        model = LlamaModel(config)
    shard = load_shard(info, state.get_tensor_model_parallel_rank(), device=str(device))
    shard = {name: tensor.to(dtype) for name, tensor in shard.items()}
    model.load_state_dict(shard, strict=True, assign=True)
    return model.eval()


class LLMEngine:
    """One instance's scheduler, block manager and model runner."""

    def __init__(self, info: CheckpointInfo, config: EngineConfig, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        self.model_config = info.model
        self.config = config
        device = device or torch.device("cpu")
        dtype = dtype or info.model.torch_dtype
        tp = state.get_tensor_model_parallel_world_size()
        num_blocks = KVCache.num_blocks_for(info.model, tp, config.cache, dtype)
        self.rmanager = RManager(state.get_instance_id(), BlockPool(num_blocks), config.cache.block_size,
                                 config.distkv.lending_cap)
        self.scheduler = Scheduler(config.scheduler, self.rmanager)
        model = load_model(info, dtype, device)
        kv_cache = KVCache(info.model.num_layers, num_blocks, config.cache.block_size,
                           info.model.num_kv_heads_per_partition(tp), info.model.head_dim, dtype, device)
        self.model_runner = ModelRunner(model, kv_cache, self.rmanager, device)
        self._request_counter = itertools.count()
        # (tokens run, wall seconds) of every step, for monitoring and benchmarks.
        self.step_log: list[tuple[int, float]] = []

    def kv_capacity_blocks(self) -> int:
        """The most blocks one request may ever hold: this instance's pool."""
        return self.rmanager.pool.num_blocks

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem when a request can never be served."""
        model = self.model_config
        if not prompt_ids:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < model.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {model.vocab_size})")
        total = len(prompt_ids) + params.max_new_tokens
        if total > model.max_position_embeddings:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                             f"{total} exceeds the model's maximum position {model.max_position_embeddings}")
        block_size = self.rmanager.block_size
        needed = num_blocks_for(total - 1, block_size)
        capacity = self.kv_capacity_blocks()
        if needed > capacity:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) needs "
                             f"{needed} KV blocks of {block_size} tokens, but the pool holds only {capacity}")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request after validating it; returns its id."""
        self.validate(prompt_ids, params)
        request_id = request_id if request_id is not None else str(next(self._request_counter))
        self.scheduler.add(Request(request_id, list(prompt_ids), params))
        return request_id

    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the requests that finished in it."""
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            raise RuntimeError("scheduler made no progress: no request fits in the KV pool")
        tokens = self.model_runner.execute(scheduled)
        finished = self.postprocess(scheduled, tokens)
        self.step_log.append((scheduled.num_tokens, time.perf_counter() - started))
        return finished

    def postprocess(self, scheduled: SchedulerOutput, tokens: list[int]) -> list[RequestOutput]:
        """Append the sampled tokens, retire finished requests; returns their outputs."""
        finished = []
        next_tokens = iter(tokens)
        for chunk in scheduled.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            if not chunk.samples_next_token:
                continue
            token = next(next_tokens)
            request.output_ids.append(token)
            reason = self._finish_reason(request, token)
            if reason is not None:
                placement = self.placement(request)
                self.scheduler.finish(request, reason)
                self.model_runner.sampler.release(request.request_id)
                finished.append(RequestOutput(request.request_id, request.prompt_ids, request.output_ids, reason,
                                              placement))
        return finished

    def placement(self, request: Request) -> Placement:
        """Where the request's blocks are now, and every instance that has held one."""
        table = self.rmanager.block_table(request.request_id)
        num_local = sum(ref.instance_id == self.rmanager.instance_id for ref in table)
        instances = request.block_instances | {ref.instance_id for ref in table}
        return Placement(num_local, len(table) - num_local, sorted(instances))

    def _finish_reason(self, request: Request, token: int) -> str | None:
        if not request.params.ignore_eos and token in self.model_config.eos_token_ids:
            return "stop"
        if len(request.output_ids) >= request.params.max_new_tokens:
            return "length"
        return None

    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits [len(prompt), vocab] at every prompt position, by chunked prefill through the KV pool."""
        params = SamplingParams(max_new_tokens=1)
        self.validate(prompt_ids, params)
        request = Request(f"prompt-logits-{next(self._request_counter)}", list(prompt_ids), params)
        budget = self.config.scheduler.max_num_batched_tokens
        rows = []
        try:
            for start in range(0, len(prompt_ids), budget):
                num_tokens = min(budget, len(prompt_ids) - start)
                self.rmanager.grow(request.request_id, start + num_tokens)
                chunk = ScheduledChunk(request, start, num_tokens)
                rows.append(self.model_runner.compute_logits(SchedulerOutput([chunk]), every_token=True))
        finally:
            self.rmanager.free(request.request_id)
        return torch.cat(rows)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        """Serve a batch of prompts to completion; outputs in prompt order.

        A prompt that can never be served gets an output with finish_reason "error" and the reason
        in ``error``; the others are served.
        """
        outputs: dict[str, RequestOutput] = {}
        ids = []
        for prompt_ids, request_params in zip(prompts, params):
            request_id = str(next(self._request_counter))
            ids.append(request_id)
            try:
                self.validate(prompt_ids, request_params)
            except ValueError as err:
                outputs[request_id] = RequestOutput(request_id, list(prompt_ids), [], "error", error=str(err))
                continue
            self.scheduler.add(Request(request_id, list(prompt_ids), request_params))
        while self.has_unfinished():
            for output in self.step():
                outputs[output.request_id] = output
        return [outputs[request_id] for request_id in ids]
