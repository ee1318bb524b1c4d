"""One instance's leader loop in a DistKV cluster (DistKV-LLM sections 4-5).

Every instance's leader (TP rank 0) runs its own step loop: take the control messages that
arrived (new requests and aborts from the front; loans, returns, turns, recalls and swaps from
the gManager and the other instances), schedule its batch, recall lent blocks for a request of
its own that waited too long for them, tell the gManager what its requests need to borrow, pull
remote blocks home when its pool has room, or swap blocks with an instance whose requests hold
this pool's while this one's hold its (DGFM), hand the step to its TP ranks, and send the
step's outputs to the front. Every leader runs its loop on a thread of its own, the front's too, so that
the front streams every instance's tokens whatever instance 0's step waits for. A step waits for no other
instance, except, layer by layer, for
the KV servers of the instances holding its requests' blocks; those answer from a thread of
their own. An instance that offered a swap runs no step until its peer answers, once the peer's
current step ends. An instance with nothing to do sleeps until a message arrives.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from megakv.config import EngineConfig
from megakv.distkv.control import (FRONT_TAG, GMANAGER_INSTANCE, GMANAGER_MESSAGES, GMANAGER_TAG, MAX_IDLE_POLL_SECONDS,
                                   ControlTraffic, InstanceControl, Mailbox, Pacer)
from megakv.distkv.gmanager import GManager
from megakv.distkv.gmanager_service import GManagerService
from megakv.distkv.instance_ranks import InstanceRanks, StepPlan
from megakv.distkv.messages import Alive, InstanceFailed, Left, Unresponsive
from megakv.distkv.policy import ClusterAdmission
from megakv.engine.core import InstanceCore
from megakv.engine.request import Request, RequestOutput, RequestStatus, max_kv_tokens
from megakv.engine.sampling import SampledTokens
from megakv.engine.scheduler import SchedulerOutput
from megakv.kvcache.block_pool import num_blocks_for
from megakv.kvcache.rmanager import Transfer
from megakv.parallel.messaging import end_this_rank

# How long a stopping leader waits for its last messages to leave.
FLUSH_SECONDS = 5.0
# Between two checks for the other leaders' messages by the front's instance, quiet for a while (see Pacer). What
# they send a quiet instance 0 (blocks given back, a swap's answer) can wait this long; what is urgent reaches it
# from its own rank without waiting (the front's orders, the gManager's answers). Each check costs CPU on a rank
# that hosts the gManager service too.
QUIET_FRONT_INSTANCE_PAUSE_SECONDS = 0.05


@dataclass(frozen=True)
class Orders:
    """Front -> leader: new requests and aborts for its instance, or the end."""

    requests: list[Request] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    stop: bool = False


@dataclass(frozen=True)
class Progress:
    """Leader -> front, after a step with outputs (or when its queues changed): outputs and monitoring."""

    instance_id: int
    # Each output carries only its new tokens: the front keeps the prompt and the tokens so far.
    outputs: list[RequestOutput]
    num_free_blocks: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_remote_micro_attentions: int
    num_recalled: int
    # Its last step ran nothing although it has unfinished requests: they wait for blocks or for their turn.
    blocked: bool = False
    # The leader's last message: it has stopped.
    stopped: bool = False
    # Prefix caching (see InstanceStats), and the free blocks that hold no cached prefix (for routing).
    num_fresh_blocks: int = 0
    num_cached_blocks: int = 0
    num_prefix_cache_queries: int = 0
    num_prefix_cache_hits: int = 0


class InstanceLoop:
    """The leader of one instance: its control plane, its scheduling policy across the cluster, and its steps.

    On the front's rank (instance 0) it also hosts the gManager service, and what it has for the front (its
    outputs and Progress, and the failures the gManager declared) waits in ``to_front``; the other leaders send
    their Progress to the front's own mailbox.
    """

    def __init__(self, core: InstanceCore, config: EngineConfig, ranks: InstanceRanks, instance_id: int,
                 num_instances: int, is_front: bool, leaders_comm, gmanager_comm,
                 control_traffic: ControlTraffic | None = None) -> None:
        self.core, self.config, self.ranks = core, config, ranks
        self.rmanager, self.scheduler = core.rmanager, core.scheduler
        self.model_runner, self.step_log = core.model_runner, core.step_log
        self.admission: ClusterAdmission = self.scheduler.admission
        self.instance_id, self.is_front = instance_id, is_front
        # The front's instance hears of its requests and of the gManager's answers at once (``_mail_event``), so
        # only the other leaders' messages wait for its checks; see QUIET_FRONT_INSTANCE_PAUSE_SECONDS.
        self._pacer = Pacer(QUIET_FRONT_INSTANCE_PAUSE_SECONDS if is_front else MAX_IDLE_POLL_SECONDS)
        # Messages this leader posted to itself, and (on the front) the front's orders and the gManager service's
        # answers to it; the event is set when one comes.
        self._local_mail: deque[object] = deque()
        self._mail_event = threading.Event()
        # On the front's rank: instance 0's outputs and Progress, and the failures the gManager declared, for the
        # front (another thread) to take.
        self.to_front: deque[RequestOutput | Progress | InstanceFailed] = deque()
        self.front_event = threading.Event()
        # When this leader last received a message (the front's stall detector reads it).
        self.last_message_at = time.monotonic()
        # What this leader sent on the control plane, and in how many steps (count_traffic only).
        self.control_traffic = control_traffic
        self.num_steps = 0
        # Called before each step: tests stall an instance with it.
        self.before_step: Callable[[], None] | None = None
        # Called when something waits in to_front: the idle front sleeps until it is (see ClusterEngine.set_waker).
        self.wake: Callable[[], None] = lambda: None
        self.mailbox = Mailbox(leaders_comm, control_traffic)
        self.front_mailbox = None if is_front else Mailbox(leaders_comm, control_traffic, FRONT_TAG)
        self.gmanager_service = self.gmanager_mailbox = None
        self._stopped = threading.Event()
        if is_front:
            self.gmanager_service = GManagerService(GManager([self.rmanager.num_lendable_blocks] * num_instances),
                                                    Mailbox(gmanager_comm, tag=GMANAGER_TAG), self._deliver_home,
                                                    config.distkv.peer_timeout)
        else:
            self.gmanager_mailbox = Mailbox(gmanager_comm, control_traffic, GMANAGER_TAG)
            threading.Thread(target=self._beat, args=(Mailbox(gmanager_comm, tag=GMANAGER_TAG),),
                             name="megakv-heartbeat", daemon=True).start()
        self.control = InstanceControl(self.rmanager, self.post, self._yield, self._give_turn, self._recall,
                                       self._swap_in, self._swapped, self._lost)
        # Requests of this instance that a creditor recalled blocks from: never recalled again, so that a long
        # request is not preempted over and over.
        self._recalled: set[str] = set()
        # Requests preempted by a Recall since start, for monitoring.
        self.num_recalled = 0
        # Requests of this instance that waited for room it lent: since when (kept across the admissions and
        # preemptions of a chunked prefill that does not fit, until the request has computed its whole context),
        # and those that sent their one Recall.
        self._starving_since: dict[str, float] = {}
        self._recalled_for: set[str] = set()
        self.stopping = False
        # This instance's last step ran nothing although it has unfinished requests (see Progress.blocked).
        self._blocked = False
        # Counters last reported to the front, so that a leader reports only what changed.
        self._reported: tuple | None = None
        # The blocks the last step pulled home (a step that pulls starts no swap).
        self._pulls: list[Transfer] = []

    @property
    def has_local_mail(self) -> bool:
        """Whether messages this leader posted to itself (or the gManager service's answers) wait."""
        return bool(self._local_mail)

    def wait_for_mail(self, timeout: float | None) -> bool:
        """Sleep until a message arrives (True) or ``timeout`` seconds pass, at this rank's pace."""
        return self._pacer.wait(self.has_mail, timeout, self._mail_event)

    def serve(self) -> None:
        """Run this instance until the front stops it."""
        while not self.stopping:
            if not self.step() and not self.stopping:
                self.wait_for_mail(self._recall_due_in())
        self._report(final=True)
        self.stop()

    def _beat(self, mailbox: Mailbox) -> None:
        """Tell the gManager this instance runs, every quarter of the peer timeout, whatever its step is doing (on a
        thread of its own, with a mailbox of its own), until the leader stops."""
        while not self._stopped.wait(self.config.distkv.peer_timeout / 4):
            mailbox.post(GMANAGER_INSTANCE, Alive(self.instance_id))

    def stop(self) -> None:
        """The leader's end: its TP ranks stop and its last messages leave."""
        self.stopping = True
        self._stopped.set()
        self.ranks.stop_followers()
        if self.gmanager_service is not None:
            self.gmanager_service.stop(FLUSH_SECONDS)
        else:
            self.gmanager_mailbox.post(GMANAGER_INSTANCE, Left(self.instance_id))
            self.gmanager_mailbox.flush(FLUSH_SECONDS)
            self.front_mailbox.flush(FLUSH_SECONDS)
        self.mailbox.flush(FLUSH_SECONDS)

    def post(self, instance_id: int, message: object) -> None:
        """Send a control message: to the gManager (by its type), to this leader itself, or to another leader."""
        if isinstance(message, GMANAGER_MESSAGES):
            if self.gmanager_service is not None:
                self.gmanager_service.submit(message)
            else:
                self.gmanager_mailbox.post(GMANAGER_INSTANCE, message)
        elif instance_id == self.instance_id:
            self._local_mail.append(message)
            self._mail_event.set()
        else:
            self.mailbox.post(instance_id, message)

    def _deliver_home(self, message: object) -> None:
        """The gManager service's message to instance 0; a declared failure goes to the front as well, at once."""
        self._local_mail.append(message)
        self._mail_event.set()
        if isinstance(message, InstanceFailed):
            self._to_front(message)
            self.wake()

    def _to_front(self, *items: RequestOutput | Progress | InstanceFailed) -> None:
        self.to_front.extend(items)
        self.front_event.set()

    def has_mail(self) -> bool:
        """Whether a message waits for this leader."""
        return (bool(self._local_mail) or self.mailbox.has_mail()
                or (self.gmanager_mailbox is not None and self.gmanager_mailbox.has_mail()))

    def take_mail(self) -> bool:
        """Handle every message that has arrived; True if there was one. A leader whose front (with the gManager)
        failed ends: the service is gone."""
        handled = False
        while True:
            self._mail_event.clear()
            messages = [self._local_mail.popleft() for _ in range(len(self._local_mail))]
            messages += self.mailbox.receive()
            if self.gmanager_mailbox is not None:
                messages += self.gmanager_mailbox.receive()
                if GMANAGER_INSTANCE in self.mailbox.failed | self.gmanager_mailbox.failed:
                    print(f"megakv: instance {self.instance_id}: the front and gManager (rank 0) failed: ending this "
                          "instance", file=sys.stderr, flush=True)
                    end_this_rank()
            if not messages:
                return handled
            handled = True
            self._pacer.saw_message()
            for message in messages:
                self._handle(message)

    def _handle(self, message: object) -> None:
        self.last_message_at = time.monotonic()
        if isinstance(message, Orders):
            for request in message.requests:
                self.core.add(request)
            for request_id in message.aborts:
                self.abort_here(request_id)
            self.stopping = self.stopping or message.stop
        elif isinstance(message, InstanceFailed):
            if message.instance_id == self.instance_id:
                print(f"megakv: instance {self.instance_id} was declared failed by the gManager (it did not answer "
                      f"within --peer-timeout, {self.config.distkv.peer_timeout:g} s): ending it",
                      file=sys.stderr, flush=True)
                end_this_rank()
            self._instance_failed(message.instance_id)
        else:
            self.control.handle(message)

    def _yield(self, request_id: str) -> bool:
        """The gManager's Yield (Scheduler.yield_blocks): a yielded request gives up any turn it held."""
        if not self.scheduler.yield_blocks(request_id):
            return False
        self.admission.forget(request_id)
        return True

    def _give_turn(self, request_id: str) -> bool:
        """The gManager's Turn: the request that yielded is admitted before anyone else. False if it is not
        waiting for its turn (it did not yield, or it ended)."""
        if not self.scheduler.give_turn(request_id):
            return False
        self.admission.give_turn(request_id)
        return True

    def _recall(self, creditor: int, num_blocks: int) -> None:
        """A creditor's Recall: preempt the latest requests holding its blocks, none recalled before, until they
        held ``num_blocks`` of them. A preempted request waits first in line and recomputes, as after any
        preemption."""
        freed = 0
        holders = [request for request in self.scheduler.running if request.request_id not in self._recalled
                   and creditor in self.rmanager.block_counts(request.request_id)]
        for request in sorted(holders, key=lambda request: request.arrival, reverse=True):
            if freed >= num_blocks:
                break
            freed += self.rmanager.block_counts(request.request_id)[creditor]
            self._recalled.add(request.request_id)
            self.num_recalled += 1
            self.scheduler.preempt(request, RequestStatus.RECALLED)

    def _instance_failed(self, failed: int) -> None:
        """Go on without ``failed``: the control plane forgets it (its requests' blocks there are lost, and they
        recompute), and every rank of this instance shuts its links with it, dropping a swap that died with it."""
        if failed in self.control.failed:
            return
        swapping = self.rmanager.swapping
        self.control.handle(InstanceFailed(failed))
        self.ranks.run_now(StepPlan(None, swap_writes=[] if swapping and not self.rmanager.swapping else None,
                                    shut=[failed]))

    def _run_plan(self, plan: StepPlan):
        """Hand a plan to the TP ranks; the logits, or None when another instance failed to answer during it. Then
        every block copied from that instance holds nothing, and a step that read its KV computed wrong rows: the
        requests that hold those blocks or read that KV are preempted (the others compute their step again), and
        the gManager hears of the failure."""
        logits = self.ranks.run_now(plan)
        failed = [instance for instance in self.ranks.failed_creditors if instance not in self.control.failed]
        if not failed:
            return logits
        emptied = {transfer.dst_block for transfer in plan.pulls if transfer.creditor in failed}
        # A pulled block took its cached content's hash before the copy (RManager.pull_home): it holds nothing.
        self.rmanager.pool.uncache(emptied)
        self._lost(self.rmanager.holders(emptied))
        for instance in failed:
            print(f"megakv: instance {self.instance_id}: instance {instance} did not answer within --peer-timeout "
                  f"({self.config.distkv.peer_timeout:g} s), or its link ended: going on without it",
                  file=sys.stderr, flush=True)
            self.post(GMANAGER_INSTANCE, Unresponsive(self.instance_id, instance))
            self._instance_failed(instance)
        return None

    def _lost(self, request_ids: list[str]) -> None:
        """A failed instance held blocks of these requests: their KV there is gone, so they compute it again here
        (or wherever they get room), as after any preemption."""
        for request_id in request_ids:
            self.scheduler.preempt(self.scheduler.find(request_id))

    def _swap_in(self, moves: list[Transfer]) -> None:
        """A peer's Swap: copy its blocks' KV now, between two steps. Later, the blocks could be freed (the request
        aborted, yielded or recalled) and lent again before the copy overwrote them."""
        self._run_plan(StepPlan(None, moves))

    def _swapped(self, writes: list[tuple[int, int]]) -> None:
        """The answer to this instance's Swap: write the KV copied out now, for the same reason."""
        self.ranks.run_now(StepPlan(None, swap_writes=writes))

    def _start_swap(self) -> None:
        """DGFM without room: with an instance that holds blocks of this one's requests while its requests hold
        blocks of this pool, exchange them, so that both requests' KV comes home and no free block is needed.
        Every TP rank copies its heads' KV of the peer's blocks out; then the peer may overwrite them."""
        peer = self.rmanager.swap_partner(self.control.kept_by)
        if peer is None or not self.config.distkv.max_moves_per_step:
            return
        block_ids = self.rmanager.begin_swap(peer, self.config.distkv.max_moves_per_step)
        self._run_plan(StepPlan(None, swap_out=(peer, block_ids)))
        if self.rmanager.swapping:  # unless the peer failed meanwhile
            self.control.offer_swap(peer, block_ids)

    def _head_lacking_room(self) -> tuple[Request, int, int] | None:
        """The first request waiting here, if it fits this pool to its last token and its blocks so far do not fit
        the free ones; with the blocks it lacks and the blocks it needs to its last token."""
        rmanager, waiting = self.rmanager, self.scheduler.waiting
        if not waiting:
            return None
        head = waiting[0]
        lacking = num_blocks_for(head.num_tokens, rmanager.block_size) - rmanager.num_free_blocks
        lifetime = num_blocks_for(max_kv_tokens(len(head.prompt_ids), head.params.max_new_tokens),
                                  rmanager.block_size)
        if lifetime > rmanager.pool.num_blocks or lacking <= 0:
            return None
        return head, lacking, lifetime

    def _starving_head(self) -> tuple[Request, int, int, int] | None:
        """The first request waiting here, if lent room keeps it waiting and a recall would let it in: it lacks room
        (``_head_lacking_room``), has not recalled yet, and would be admitted with the blocks that the largest
        debtor holds. Returns it with that debtor, the blocks it lacks and the blocks it needs to its last token.

        Only a request that never borrows recalls: one that outgrows the pool would borrow, and could then be asked
        to yield while its reservation kept the gManager's first borrower waiting for this pool."""
        lacking_room = self._head_lacking_room()
        debtor = self.rmanager.largest_debtor()
        if lacking_room is None or debtor is None or lacking_room[0].request_id in self._recalled_for:
            return None
        head, lacking, lifetime = lacking_room
        if lacking > len(self.rmanager.lent_to(debtor)):
            return None
        return head, debtor, lacking, lifetime

    def _reclaim_kept(self) -> None:
        """A waiting head that lacks room (``_head_lacking_room``) takes this pool's blocks that another instance
        keeps for a cached prefix back at once (no request holds them, so no ``recall_after`` wait), from the
        instance that keeps the most."""
        keepers = self.control.kept_by
        lacking_room = self._head_lacking_room() if keepers and not self.control.awaiting_recall else None
        if lacking_room is None:
            return
        head, lacking, lifetime = lacking_room
        debtor = max(keepers, key=lambda debtor: (keepers[debtor], -debtor))
        # All it lacks: an answer of fewer blocks (the debtor kept fewer) ends the reservation at once, so that the
        # pool lends again while the head still waits.
        self.control.recall(head.request_id, debtor, lacking, lifetime, kept_only=True)

    def _recall_for_starving(self) -> None:
        """Lending must not starve the lender: a starving head (``_starving_head``) that has waited
        ``recall_after`` seconds asks its debtor for the blocks it lacks."""
        if self._starving_since:
            for request in self.scheduler.running:
                if request.num_computed_tokens == request.num_tokens:
                    self._starving_since.pop(request.request_id, None)
        starving = self._starving_head()
        if starving is None:
            return
        head, debtor, num_lacking, lifetime = starving
        since = self._starving_since.setdefault(head.request_id, time.monotonic())
        if (time.monotonic() - since >= self.config.distkv.recall_after
                and self.control.recall(head.request_id, debtor, num_lacking, lifetime)):
            self._recalled_for.add(head.request_id)

    def _recall_due_in(self) -> float | None:
        """Seconds until this instance recalls lent blocks for its first waiting request; None if it will not
        before a message comes (the answer to a Recall in flight is one)."""
        starving = self._starving_head()
        if starving is None or self.control.awaiting_recall or self.rmanager.swapping:
            return None
        since = self._starving_since.get(starving[0].request_id, time.monotonic())
        return max(0.0, since + self.config.distkv.recall_after - time.monotonic())

    def abort_here(self, request_id: str) -> None:
        """Stop a request of this instance and release its blocks; its last output goes to the front."""
        aborted = self.core.abort(request_id)
        if aborted is not None:
            self._finished(aborted.request_id)
            self.report_outputs([aborted])

    def _finished(self, request_id: str) -> None:
        self.control.forget(request_id)
        self.admission.forget(request_id)
        self._recalled.discard(request_id)
        self._recalled_for.discard(request_id)
        self._starving_since.pop(request_id, None)

    def _arrivals_here(self) -> dict[str, int]:
        return {request.request_id: request.arrival for request in self.scheduler.unfinished()}

    def step(self) -> bool:
        """One step of this instance (InstanceCore.step, with this loop as its driver); False when it ran no
        forward pass (it took its messages, and maybe copied blocks home)."""
        self.take_mail()
        if self.stopping:
            return False
        if self.rmanager.swapping:
            # A swap awaits the peer's answer: a step would read blocks the peer is overwriting.
            self.control.sync(self._arrivals_here())
            return False
        if self.before_step is not None:
            self.before_step()
        self._pulls = []
        outputs = self.core.step(self)
        if outputs is None and not self._pulls:
            self._start_swap()
            return False
        for output in outputs or []:
            if output.finished:
                self._finished(output.request_id)
        self.control.sync(self._arrivals_here())
        self.report_outputs(outputs or [])
        if not self._pulls:
            self._start_swap()
        return outputs is not None

    def ready(self, scheduled: SchedulerOutput) -> SchedulerOutput:
        """StepDriver: take kept loans back and recall lent room for a starving request, fill waiting slots from
        freed blocks, tell the control plane; the chunks whose blocks are all here or lent run."""
        rmanager, scheduler = self.rmanager, self.scheduler
        self._reclaim_kept()
        self._recall_for_starving()
        # Blocks freed since a request went PENDING serve it before any creditor does.
        spare = rmanager.num_free_blocks - sum(not rmanager.has_pending(r.request_id) for r in scheduler.running)
        for request in scheduler.running:
            spare -= rmanager.fill_pending_locally(request.request_id, spare)
        self.control.sync(self._arrivals_here())
        return SchedulerOutput([chunk for chunk in scheduled.chunks
                                if not rmanager.has_pending(chunk.request.request_id)])

    def run(self, ready: SchedulerOutput) -> SampledTokens | None:
        """StepDriver: DGFM's pulls home and the ready chunks, handed to the TP ranks as one plan; None when no
        forward pass ran."""
        rmanager = self.rmanager
        self._pulls = self._plan_pulls()
        if not ready.chunks and not self._pulls:
            self._blocked = self.scheduler.has_unfinished()
            self._report()
            return None
        if self._blocked:
            # Before a step that may be long: the front must not take this instance for a stalled one.
            self._blocked = False
            self._report()
        for chunk in ready.chunks:
            chunk.request.block_instances.update(rmanager.block_counts(chunk.request.request_id))
        plan = StepPlan(self.model_runner.prepare(ready) if ready.chunks else None, self._pulls)
        logits = self._run_plan(plan)
        if logits is None:
            return None
        self.num_steps += 1
        return self.model_runner.sample(ready, logits)

    def _plan_pulls(self) -> list[Transfer]:
        """DGFM: move remote blocks home while the pool has room beyond one block per running request and no
        request here waits for blocks."""
        rmanager = self.rmanager
        room = rmanager.num_free_blocks - len(self.scheduler.running)
        if room <= 0 or rmanager.num_pending_blocks or not rmanager.num_borrowed_blocks:
            return []
        return rmanager.pull_home(min(room, self.config.distkv.max_moves_per_step))

    def progress_now(self, outputs: list[RequestOutput] | None = None, final: bool = False) -> Progress:
        """This instance's Progress as of now, with these outputs."""
        return Progress(self.instance_id, outputs or [], self.rmanager.num_free_blocks, len(self.scheduler.running),
                        self.scheduler.num_waiting, self.scheduler.num_preemptions,
                        self.model_runner.num_remote_micro_attentions, self.num_recalled, self._blocked,
                        stopped=final, num_fresh_blocks=self.rmanager.pool.num_fresh_blocks,
                        num_cached_blocks=self.rmanager.num_cached_blocks,
                        num_prefix_cache_queries=self.scheduler.num_prefix_cache_queries,
                        num_prefix_cache_hits=self.scheduler.num_prefix_cache_hits)

    def report_outputs(self, outputs: list[RequestOutput]) -> None:
        """Outputs go to the front: whole on the front's rank, in a Progress elsewhere.

        A Progress carries only each step's new tokens: with the prompt and every token so far, a long request
        would send its whole context to the front every step.
        """
        if self.is_front:
            self._to_front(*outputs)
            self._report()
        else:
            self._report([dataclasses.replace(output, prompt_ids=[], token_ids=[]) for output in outputs])

    def _report(self, outputs: list[RequestOutput] | None = None, final: bool = False) -> None:
        """Send the front a Progress when there are outputs, the queues changed, or this is the last one."""
        progress = self.progress_now(outputs, final)
        counters = dataclasses.astuple(dataclasses.replace(progress, outputs=[]))
        if outputs or final or counters != self._reported:
            self._reported = counters
            if self.is_front:
                self._to_front(progress)
            else:
                self.front_mailbox.post(0, progress)
