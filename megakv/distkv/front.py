"""The cluster's front (global rank 0): the engine API over every instance of a DistKV cluster.

It validates each request against the cluster's limit, routes it (to the instance named, to
the one holding its longest cached prefix, or to the one with the most free KV room), keeps
the request table, and streams each request's outputs as its instance reports them. It shares
its rank with instance 0's leader loop and with the gManager service, each on a thread of its
own: the front treats instance 0 as any other instance (orders in, Progress out), so that it
streams the other instances' tokens while instance 0's step waits, and reads the gManager's
ledger for monitoring. When the gManager
declares an instance failed, the front runs that instance's requests again elsewhere, from
their prompts and the tokens already streamed, so that their clients see a pause, not an error.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable

from megakv.config import EngineConfig
from megakv.distkv.control import FRONT_TAG, ControlTraffic, Mailbox, Pacer
from megakv.distkv.instance_loop import FLUSH_SECONDS, InstanceLoop, Orders, Progress
from megakv.distkv.messages import InstanceFailed
from megakv.distkv.policy import cluster_kv_capacity
from megakv.distkv.prefix_routing import PrefixDirectory, prefix_holder
from megakv.engine.core import InstanceCore
from megakv.engine.limits import ContextLimit
from megakv.engine.request import Request, RequestOutput, RequestStatus, max_kv_tokens
from megakv.engine.sampling import SamplingParams
from megakv.engine.stats import EngineStats, InstanceStats
from megakv.kvcache.prefix_cache import extend_block_hashes

# The longest step() waits for the instances' outputs: its caller (the server's engine loop) takes new requests
# between two steps.
FRONT_WAIT_SECONDS = 0.02
# See ClusterFront._pacer: a few percent of a decode step, as late as the old front, which took the other leaders'
# Progress between two steps of instance 0, was on average.
FRONT_ACTIVE_PAUSE_SECONDS = 2e-3


class ClusterStalledError(RuntimeError):
    """No instance of the cluster can make progress (a bug: the gManager's queue always moves)."""


class ClusterFront:
    """Requests in, outputs out, for the whole cluster; instance 0's leader loop runs beside it, on a thread that
    the front starts."""

    def __init__(self, loop: InstanceLoop, core: InstanceCore, config: EngineConfig, context_limit: ContextLimit,
                 num_instances: int, leaders_comm, traffic: ControlTraffic | None = None) -> None:
        self.loop = loop
        self.core = core
        self.config = config
        self.context_limit = context_limit
        self.num_instances = num_instances
        self.rmanager = core.rmanager
        self.gmanager_service = loop.gmanager_service
        self._arrivals = itertools.count()
        self._request_counter = itertools.count()
        # Where each unfinished request runs, and the front's copy of each (the other instances report only new
        # tokens).
        self._where: dict[str, int] = {}
        self._routed: dict[str, Request] = {}
        # Where the blocks of the prompts routed so far went, with prefix caching (the cluster's pools bound it).
        self._prefixes = PrefixDirectory(num_instances * self.rmanager.pool.num_blocks) \
            if config.cache.enable_prefix_caching else None
        # Outputs for the caller of step(), each other instance's last progress, and the leaders that have not
        # yet confirmed the stop.
        self._ready: list[RequestOutput] = []
        self._progress: dict[int, Progress] = {}
        self._running_leaders: set[int] = set(range(num_instances))
        # Instances the gManager declared failed, in that order, and the requests run again after a failure.
        self.failed: list[int] = []
        self.num_requests_recomputed = 0
        # Requests aborted because the cluster left after a failure cannot hold them: request id -> the error their
        # last output carries instead of the abort.
        self._failing: dict[str, str] = {}
        # When the front last saw the cluster move: a report, a new request or an abort (a message to instance 0
        # counts too: see InstanceLoop.last_message_at).
        self._last_activity = time.monotonic()
        # The other leaders' Progress comes to the front's own mailbox; its orders to them leave by another (the
        # loop's mailbox belongs to instance 0's thread).
        self.mailbox = Mailbox(leaders_comm, traffic, FRONT_TAG)
        self._orders = Mailbox(leaders_comm, traffic)
        # Instance 0's outputs wake the front at once (front_event); only the other leaders' Progress waits for its
        # checks, which take the GIL from instance 0's step: FRONT_ACTIVE_PAUSE_SECONDS apart, from the first.
        self._pacer = Pacer(active_pause=FRONT_ACTIVE_PAUSE_SECONDS, first_pause=FRONT_ACTIVE_PAUSE_SECONDS)
        self._instance_error: BaseException | None = None
        self._instance_thread = threading.Thread(target=self._run_instance, name="megakv-instance-0", daemon=True)
        self._instance_thread.start()

    def _run_instance(self) -> None:
        try:
            self.loop.serve()
        except BaseException as err:  # raised by the front's next step: the service cannot go on without it
            self._instance_error = err
            self.loop.front_event.set()
            self.loop.wake()

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    instance: int | None = None) -> str:
        """Validate a request and route it (to ``instance``, else by free KV room); returns its id."""
        if instance is not None and (isinstance(instance, bool) or not isinstance(instance, int)
                                     or not 0 <= instance < self.num_instances):
            raise ValueError(f"instance {instance!r} does not exist: the cluster has instances "
                             f"0 to {self.num_instances - 1}")
        if instance in self.failed:
            raise ValueError(f"instance {instance} has failed: the cluster serves on instances {self.live_instances}")
        if request_id is None:
            request_id = f"request-{next(self._request_counter)}"
        if request_id in self._where:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.core.validate(prompt_ids, params, self.context_limit)
        request = Request(request_id, list(prompt_ids), params, arrival=next(self._arrivals))
        if self._prefixes is not None:
            extend_block_hashes(request.block_hashes, request.prompt_ids, len(request.prompt_ids),
                                self.rmanager.block_size, params.cache_salt)
        self._send(request, instance)
        return request_id

    @property
    def live_instances(self) -> list[int]:
        """The instances not declared failed."""
        return [index for index in range(self.num_instances) if index not in self.failed]

    def _send(self, request: Request, instance: int | None) -> None:
        """Route the request (to ``instance``, if given) and hand it to its instance."""
        target = instance if instance is not None else self._route(request)
        if self._prefixes is not None:
            self._prefixes.record(request.block_hashes, target)
        self._last_activity = time.monotonic()
        self._where[request.request_id] = target
        self._routed[request.request_id] = request
        self._order(target, Orders(requests=[request]))

    def _order(self, instance: int, orders: Orders) -> None:
        if instance == self.loop.instance_id:
            self.loop.post(instance, orders)
        else:
            self._orders.post(instance, orders)

    def _route(self, request: Request) -> int:
        """With prefix caching, the instance that holds the longest cached prefix of the request, unless it is
        much busier than the others (megakv.distkv.prefix_routing); else the instance with the most free blocks as
        last reported, those that hold a cached prefix counted half (a request there would push the prefix out),
        then the most free blocks, then the fewest requests routed to it."""
        pool = self.rmanager.pool.num_blocks
        free = [self._progress[index].num_free_blocks if index in self._progress else pool
                for index in range(self.num_instances)]
        fresh = [self._progress[index].num_fresh_blocks if index in self._progress else pool
                 for index in range(self.num_instances)]
        load = Counter(self._where.values())
        if self._prefixes is not None:
            holder = prefix_holder(self._prefixes, request.block_hashes,
                                   [load[index] for index in range(self.num_instances)])
            if holder is not None and holder not in self.failed:
                return holder
        return max(self.live_instances,
                   key=lambda index: (free[index] + fresh[index], free[index], -load[index], -index))

    def abort(self, request_id: str) -> None:
        """Stop a request on its instance (before its next step) and release its blocks everywhere."""
        self._last_activity = time.monotonic()
        target = self._where.get(request_id)
        if target is not None:
            self._order(target, Orders(aborts=[request_id]))

    def has_unfinished(self) -> bool:
        """True while a request runs anywhere in the cluster, has an output not yet returned, or blocks are
        still owed: the front's caller keeps collecting reports (and /metrics stays current) until the ledger
        settles."""
        owed = self.rmanager.has_returns or self.gmanager_service.is_busy or self.loop.has_local_mail
        # A failed thread must reach step(), which raises it, even with nothing to serve.
        broken = self._instance_error is not None or self.gmanager_service.error is not None
        return bool(self._where) or bool(self._ready) or self._has_news() or owed or broken

    def _has_news(self) -> bool:
        return bool(self.loop.to_front) or self.mailbox.has_mail()

    def _check_threads(self) -> None:
        """Raise if instance 0's loop or the gManager service failed."""
        self.gmanager_service.check()
        if self._instance_error is not None:
            raise RuntimeError(f"instance 0's loop failed: {self._instance_error!r}") from self._instance_error

    def step(self) -> list[RequestOutput]:
        """Collect what the instances reported, waiting up to FRONT_WAIT_SECONDS for it."""
        self._check_threads()
        if not self._ready and not self._has_news():
            self._pacer.wait(self._has_news, FRONT_WAIT_SECONDS, self.loop.front_event)
        self._collect()
        self._check_stalled()
        ready, self._ready = self._ready, []
        for index, output in enumerate(ready):
            if output.finished:
                self._where.pop(output.request_id, None)
                self._routed.pop(output.request_id, None)
                error = self._failing.pop(output.request_id, None)
                if error is not None:
                    ready[index] = dataclasses.replace(output, finish_reason=RequestStatus.FINISHED_ERROR.finish_reason,
                                                       error=error)
        return ready

    def _collect(self) -> None:
        """Take what the instances reported: instance 0's outputs whole and its Progress, the other leaders'
        Progress with their new tokens, and the failures the gManager declared."""
        self.loop.front_event.clear()
        items = [self.loop.to_front.popleft() for _ in range(len(self.loop.to_front))] + self.mailbox.receive()
        if items:
            self._pacer.saw_message()
            self._last_activity = time.monotonic()
        for item in items:
            if isinstance(item, RequestOutput):
                self._ready.append(item)
                continue
            if isinstance(item, InstanceFailed):
                self._instance_failed(item.instance_id)
                continue
            if item.instance_id in self.failed:
                continue  # sent before it failed: its requests run again elsewhere
            self._progress[item.instance_id] = item
            self._ready.extend(self._restore(output) for output in item.outputs)
            if item.stopped:
                self._running_leaders.discard(item.instance_id)

    def _instance_failed(self, failed: int) -> None:
        """The gManager declared ``failed`` out of the cluster: its requests run again on the others, from their
        prompts and the tokens streamed so far (greedy decoding gives the same tokens again). A request that the
        smaller cluster cannot hold, wherever it runs, ends with an error naming the failure."""
        if failed in self.failed:
            return
        self.failed.append(failed)
        self._running_leaders.discard(failed)
        self._progress.pop(failed, None)
        capacity = cluster_kv_capacity(self.rmanager.pool.num_blocks, self.num_instances, self.config.distkv,
                                       self.failed)
        self.context_limit = dataclasses.replace(self.context_limit, capacity=capacity)
        for request_id, where in list(self._where.items()):
            request = self._routed[request_id]
            needed = max_kv_tokens(len(request.prompt_ids), request.params.max_new_tokens)
            if needed > self.context_limit.max_model_len:
                error = (f"instance {failed} failed, and the {len(self.live_instances)} instance(s) left can hold "
                         f"{self.context_limit.max_model_len} tokens of a request, fewer than its {needed}")
                if where != failed:
                    self._failing[request_id] = error
                    self.abort(request_id)
                    continue
                self._where.pop(request_id)
                self._ready.append(RequestOutput(request_id, request.prompt_ids, list(request.output_ids), [],
                                                 RequestStatus.FINISHED_ERROR.finish_reason, instance=failed,
                                                 error=error))
            elif where == failed:
                self.num_requests_recomputed += 1
                self._send(Request(request_id, request.prompt_ids, request.params, list(request.output_ids),
                                   arrival=request.arrival, block_hashes=list(request.block_hashes)), None)

    def _restore(self, output: RequestOutput) -> RequestOutput:
        """The front's full output from another instance's delta (see InstanceLoop.report_outputs)."""
        request = self._routed[output.request_id]
        request.output_ids.extend(output.new_token_ids)
        return dataclasses.replace(output, prompt_ids=request.prompt_ids, token_ids=list(request.output_ids))

    def _check_stalled(self) -> None:
        """Raise ClusterStalledError once every instance holding unfinished requests has been waiting, and no
        message has moved, for ``stall_timeout`` seconds. An instance that has not reported waiting counts as
        busy: a long prefill step sends nothing until it ends."""
        quiet = time.monotonic() - max(self._last_activity, self.loop.last_message_at)
        if not self._where or quiet < self.config.distkv.stall_timeout:
            return
        holders = sorted(set(self._where.values()))
        progress = {index: self._progress.get(index) for index in holders}
        if any(report is None or not report.blocked for report in progress.values()):
            return
        waits = "; ".join(f"instance {index}: {report.num_running} running, {report.num_waiting} waiting"
                          for index, report in progress.items())
        raise ClusterStalledError(
            f"the cluster is stalled: {len(self._where)} unfinished request(s) and no progress for {quiet:.0f} s "
            f"({waits}; gManager: {self.gmanager_service.describe()})")

    def stats(self) -> EngineStats:
        """Each live instance's queues and pool as last reported, and the gManager's counters and ledger; blocks lent
        and borrowed are the ledger's debts."""
        service = self.gmanager_service
        with service.lock:
            gmanager = service.gmanager
            debts = {pair: n for pair, n in gmanager.debts.items() if n}
            counters = (gmanager.num_borrow_events, gmanager.num_blocks_borrowed, gmanager.num_blocks_moved,
                        gmanager.num_blocks_swapped, gmanager.outstanding(), gmanager.kept_loans())
        instances = []
        num_blocks = self.rmanager.pool.num_blocks
        for index in self.live_instances:
            progress = self._progress.get(index, Progress(index, [], num_blocks, 0, 0, 0, 0, 0))
            instances.append(InstanceStats(
                index, progress.num_running, progress.num_waiting, num_blocks=num_blocks,
                num_free_blocks=progress.num_free_blocks,
                num_lent_blocks=sum(n for (_, creditor), n in debts.items() if creditor == index),
                num_borrowed_blocks=sum(n for (debtor, _), n in debts.items() if debtor == index),
                num_preemptions=progress.num_preemptions,
                num_remote_micro_attentions=progress.num_remote_micro_attentions,
                num_recalled=progress.num_recalled, num_cached_blocks=progress.num_cached_blocks,
                num_prefix_cache_queries=progress.num_prefix_cache_queries,
                num_prefix_cache_hits=progress.num_prefix_cache_hits))
        return EngineStats(instances, *counters, failed_instances=list(self.failed),
                           num_requests_recomputed=self.num_requests_recomputed)

    def shutdown(self) -> None:
        """Stop every instance: each leader leaves its loop after the step it is in; instance 0's, once every other
        has stopped, for it then stops the gManager service, which must not outlast their last messages."""
        here = self.loop.instance_id
        for index in self._running_leaders - {here}:
            self._order(index, Orders(stop=True))
        self._wait_for_stops(lambda: self._running_leaders <= {here})
        self._order(here, Orders(stop=True))
        self._wait_for_stops(lambda: not self._running_leaders)
        self._orders.flush(FLUSH_SECONDS)
        self._instance_thread.join()

    def _wait_for_stops(self, stopped: Callable[[], bool]) -> None:
        """Collect reports until ``stopped()``: leaders confirm their stop, or the gManager declares them failed."""
        while not stopped():
            self._pacer.wait(lambda: self._has_news() or self._instance_error is not None, None, self.loop.front_event)
            self._check_threads()
            self._collect()
