"""The core of one serving instance: its scheduler, rManager and model runner.

A step reads like the design: ``schedule()`` -> ``model_runner.execute()`` ->
``postprocess()``. The core takes requests and aborts at any time between steps
and reports, every step, the new tokens of each request that sampled one; it
does not know whether it runs alone (``LLMEngine``) or as one instance of a
DistKV cluster (``megakv.distkv.instance_loop``), which drive it.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from megakv.checkpoint.format import CheckpointInfo, load_shard
from megakv.config import EngineConfig, ModelConfig, dtype_name
from megakv.engine.limits import ContextLimit
from megakv.engine.model_runner import ModelRunner
from megakv.engine.request import Placement, Request, RequestOutput, RequestStatus
from megakv.engine.sampling import SAMPLING_FAILED, SampledTokens, SamplingParams
from megakv.engine.scheduler import AdmissionPolicy, LocalAdmission, ScheduledChunk, Scheduler, SchedulerOutput
from megakv.kvcache.block_pool import BlockPool
from megakv.kvcache.kv_cache import KVCache
from megakv.kvcache.rmanager import PENDING, RManager
from megakv.models.llama import LlamaModel
from megakv.parallel import state



class StepDriver(Protocol):
    """How a step's scheduled chunks run when the instance is one of a cluster's."""

    def ready(self, scheduled: SchedulerOutput) -> SchedulerOutput:
        """The chunks that run now (those of requests still waiting for borrowed blocks wait)."""
        ...

    def run(self, ready: SchedulerOutput) -> SampledTokens | None:
        """Run them on the instance's TP ranks; their sampled tokens, or None when no forward pass ran."""
        ...


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


class InstanceCore:
    """One instance's scheduler, block manager and model runner."""

    def __init__(self, info: CheckpointInfo, config: EngineConfig, dtype: torch.dtype | None = None,
                 device: torch.device | None = None,
                 admission: Callable[[RManager], AdmissionPolicy] | None = None) -> None:
        self.model_config = info.model
        self.config = config
        device = device or torch.device("cpu")
        dtype = dtype or info.model.torch_dtype
        tp = state.get_tensor_model_parallel_world_size()
        num_blocks = KVCache.num_blocks_for(info.model, tp, config.cache, dtype)
        self.rmanager = RManager(state.get_instance_id(), BlockPool(num_blocks), config.cache.block_size,
                                 config.distkv.lending_cap)
        # The policy may consult the pool (megakv.distkv.policy for a cluster), so it is built around this
        # core's rManager.
        self.scheduler = Scheduler(config.scheduler, self.rmanager,
                                   admission(self.rmanager) if admission is not None else LocalAdmission(),
                                   config.cache.enable_prefix_caching)
        model = load_model(info, dtype, device)
        kv_cache = KVCache(info.model.num_layers, num_blocks, config.cache.block_size,
                           info.model.num_kv_heads_per_partition(tp), info.model.head_dim, dtype, device)
        self.model_runner = ModelRunner(model, kv_cache, self.rmanager, device)
        # (tokens run, wall seconds) of every step, for monitoring and benchmarks.
        self.step_log: list[tuple[int, float]] = []

    def validate(self, prompt_ids: list[int], params: SamplingParams, limit: ContextLimit) -> None:
        """Raise ValueError naming the problem when a request can never be served within ``limit``."""
        model = self.model_config
        if not prompt_ids:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < model.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {model.vocab_size})")
        bad = [token for token in params.token_ids() if not 0 <= token < model.vocab_size]
        if bad:
            raise ValueError(f"sampling parameters name token id {bad[0]!r}, outside the vocabulary "
                             f"[0, {model.vocab_size})")
        limit.check(len(prompt_ids), params.max_new_tokens)

    def add(self, request: Request) -> None:
        """Queue a validated request."""
        self.scheduler.add(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and release every block it holds; None if it is not here."""
        request = self.scheduler.find(request_id)
        if request is None:
            return None
        placement = self.placement(request)
        self.scheduler.abort(request_id)
        self.model_runner.sampler.release(request.request_id)
        return RequestOutput(request.request_id, request.prompt_ids, list(request.output_ids), [],
                             request.status.finish_reason, placement, instance=self.rmanager.instance_id)

    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished()

    def step(self, driver: StepDriver | None = None) -> list[RequestOutput] | None:
        """One step: schedule, run what is ready, postprocess; returns what each request gained in it, or None
        when no forward pass ran. Alone (``driver`` None) every scheduled chunk runs on this instance's TP
        group; a cluster's instance is the driver (megakv.distkv.instance_loop)."""
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if driver is None:
            if not scheduled.chunks:
                raise RuntimeError("scheduler made no progress: no request fits in the KV pool")
            ready, sampled = scheduled, self.model_runner.execute(scheduled)
        else:
            ready = driver.ready(scheduled)
            sampled = driver.run(ready)
        if sampled is None:
            return None
        outputs = self.postprocess(ready, sampled)
        self.step_log.append((ready.num_tokens, time.perf_counter() - started))
        return outputs

    def postprocess(self, scheduled: SchedulerOutput, sampled: SampledTokens) -> list[RequestOutput]:
        """Append the sampled tokens and retire finished requests; one output per request that sampled."""
        outputs = []
        next_tokens = iter(zip(sampled.token_ids, sampled.logprobs))
        for chunk in scheduled.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            self.scheduler.cache_computed_blocks(request)
            request.prompt_logprobs.extend(sampled.prompt_logprobs.get(request.request_id, ()))
            if not chunk.samples_next_token:
                continue
            token, logprobs = next(next_tokens)
            first = not request.output_ids
            error = None
            if token == SAMPLING_FAILED:
                # Only the rank that sampled knows why; the others end the request just as well.
                error = sampled.errors.get(request.request_id, "sampling failed on another tensor-parallel rank")
                finished, new_token_ids = RequestStatus.FINISHED_ERROR, []
            else:
                request.output_ids.append(token)
                finished, new_token_ids = self._finished(request, token), [token]
            placement = None
            if finished is not None:
                placement = self.placement(request)
                self.scheduler.finish(request, finished)
                self.model_runner.sampler.release(request.request_id)
            outputs.append(RequestOutput(request.request_id, request.prompt_ids, list(request.output_ids),
                                         new_token_ids, request.status.finish_reason, placement, error,
                                         instance=self.rmanager.instance_id,
                                         new_logprobs=None if logprobs is None else [logprobs],
                                         prompt_logprobs=list(request.prompt_logprobs) if first and
                                         request.params.prompt_logprobs is not None else None,
                                         num_cached_tokens=request.num_cached_tokens))
        return outputs

    def placement(self, request: Request) -> Placement:
        """Where the request's blocks are now, and every instance that has held one."""
        table = [ref for ref in self.rmanager.block_table(request.request_id) if ref != PENDING]
        num_local = sum(ref.instance_id == self.rmanager.instance_id for ref in table)
        instances = request.block_instances | {ref.instance_id for ref in table}
        return Placement(num_local, len(table) - num_local, sorted(instances))

    def _finished(self, request: Request, token: int) -> RequestStatus | None:
        """How the request ends with this token, if it does."""
        is_stop = token in self.model_config.eos_token_ids or token in request.params.stop_token_ids
        if not request.params.ignore_eos and is_stop:
            return RequestStatus.FINISHED_STOPPED
        if len(request.output_ids) >= request.params.max_new_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def prompt_logits(self, request_id: str, prompt_ids: list[int]) -> torch.Tensor:
        """Logits [len(prompt), vocab] at every prompt position, by chunked prefill through the KV pool."""
        request = Request(request_id, list(prompt_ids), SamplingParams(max_new_tokens=1))
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
