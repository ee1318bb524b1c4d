"""The control plane, point to point: an instance's borrowing, lending and returns, and the mailboxes.

An instance talks to the gManager only when its requests need blocks or stop needing them, when it
lends or takes blocks back, and when the gManager has asked it to report room; to a creditor only to
hand blocks back, answer its recalls and say how many of its blocks it keeps for a cached prefix,
and to a debtor only to recall blocks for a request of its own that waits for them. Nothing here is
collective, so no instance waits for another's step, and what an instance sends per step does not
grow with the number of instances. ``InstanceControl`` and ``GManager`` are plain state machines
over a ``post`` function: the mailbox carries their messages between ranks (megakv.distkv.in_process
carries them within one process).
"""
from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from megakv.distkv.messages import (Borrow, InstanceFailed, Kept, KeptLoans, Lend, Lent, Loan, Recall, Recalled,
                                    ReturnBlocks, Room, Settled, Swap, Swapped, Turn, Unresponsive, WantRoom, Yield,
                                    Yielded, sender_of)
from megakv.kvcache.rmanager import RManager, Transfer
from megakv.parallel.messaging import failed_peers

GMANAGER_INSTANCE = 0
# Messages an instance's control handles; the rest go to the gManager (or, on the front, to the front).
INSTANCE_MESSAGES = (Lend, Loan, ReturnBlocks, Yield, Turn, WantRoom, Recall, Recalled, Swap, Swapped, InstanceFailed,
                     Kept)
GMANAGER_MESSAGES = (Borrow, Lent, Settled, Room, Yielded, Unresponsive, KeptLoans)
# Marks a request that yielded: nothing is reported for it until it holds blocks again.
_YIELDED = -1


class InstanceControl:
    """One instance's side of the control plane, around its rManager.

    ``on_yield(request_id)`` must take the blocks away from a request that waits for blocks or for room and
    keep it out of the queue (True), or return False for one that needs nothing more or is not here;
    ``on_turn(request_id)`` lets it be admitted again, returning False if it had not yielded;
    ``on_recall(creditor, num_blocks)`` preempts requests holding blocks of ``creditor`` to free up to
    ``num_blocks`` of them (the Recall's answer counts the blocks that really go back: a cached block another
    request shares stays). DGFM swaps: ``on_swap_in(moves)`` copies each move's KV
    from the peer into this pool, and ``on_swapped(writes)`` writes the KV this instance copied out for its own
    swap (RManager.end_swap's writes), both before they return. ``on_lost(request_ids)`` preempts requests whose
    blocks on a failed instance are lost, to recompute them.
    """

    def __init__(self, rmanager: RManager, post: Callable[[int, object], None], on_yield: Callable[[str], bool],
                 on_turn: Callable[[str], bool], on_recall: Callable[[int, int], None],
                 on_swap_in: Callable[[list[Transfer]], None],
                 on_swapped: Callable[[list[tuple[int, int]]], None],
                 on_lost: Callable[[list[str]], None]) -> None:
        self.rmanager = rmanager
        self.post = post
        self.on_yield, self.on_turn, self.on_recall = on_yield, on_turn, on_recall
        self.on_swap_in, self.on_swapped, self.on_lost = on_swap_in, on_swapped, on_lost
        # Instances out of the cluster: what they sent is dropped.
        self.failed: set[int] = set()
        # Answers to Recalls (creditor, blocks freed), sent after the freed blocks go back.
        self._recall_answers: list[tuple[int, Recalled]] = []
        # Creditor side: the request, the blocks asked and the debtor of the Recall awaiting its answer.
        self._recall: tuple[str, int, int] | None = None
        # request id -> blocks the gManager was last told it needs (_YIELDED after a Yield)
        self._asked: dict[str, int] = {}
        # request id -> arrival, of the unfinished requests as of the last sync
        self._arrivals: Mapping[str, int] = {}
        self._room_wanted = False
        self._room_reported: tuple[int, int] | None = None
        # The kept loans the gManager and their creditors were last told of (KeptLoans, Kept), and the debtors that
        # keep loans of this pool: debtor -> blocks.
        self._kept_reported: dict[int, int] = {}
        self.kept_by: dict[int, int] = {}

    @property
    def instance_id(self) -> int:
        return self.rmanager.instance_id

    def handle(self, message: object) -> None:
        """Take one message from the gManager or another instance (dropped if that instance failed)."""
        rmanager, me = self.rmanager, self.instance_id
        if sender_of(message) in self.failed:
            return
        if isinstance(message, InstanceFailed):
            self._forget_instance(message.instance_id)
        elif isinstance(message, Lend):
            num_blocks = min(message.num_blocks, rmanager.num_fresh_lendable_blocks if message.fresh_only
                             else rmanager.num_lendable_blocks)
            block_ids = rmanager.lend(message.debtor, num_blocks) if num_blocks else []
            if block_ids:
                self.post(message.debtor, Loan(me, message.request_id, block_ids))
            self._tell_gmanager(Lent(me, message.debtor, message.request_id, num_blocks, *self._room()))
        elif isinstance(message, Loan):
            unused = rmanager.fill_pending(message.request_id, message.creditor, message.block_ids)
            if unused:
                self.post(message.creditor, ReturnBlocks(me, unused))
            asked = self._asked.get(message.request_id, 0) - (len(message.block_ids) - len(unused))
            if self._asked.get(message.request_id) == _YIELDED:
                pass  # a loan that crossed the Yield: its blocks went back above
            elif unused:
                # The gManager counts the whole loan as served: tell it what the request still needs.
                self._correct(message.request_id)
            elif asked > 0:
                self._asked[message.request_id] = asked
            else:
                self._asked.pop(message.request_id, None)
        elif isinstance(message, ReturnBlocks):
            rmanager.take_back(message.debtor, message.block_ids)
            self._tell_gmanager(Settled(me, message.debtor, len(message.block_ids), message.num_moved,
                                        *self._room()))
        elif isinstance(message, Yield):
            if self.on_yield(message.request_id):
                self._asked[message.request_id] = _YIELDED
                self.post(GMANAGER_INSTANCE, Yielded(me, message.request_id,
                                                     self._arrivals.get(message.request_id, 0)))
            else:
                self._correct(message.request_id)
        elif isinstance(message, Turn):
            if not self.on_turn(message.request_id):
                self._correct(message.request_id)
        elif isinstance(message, WantRoom):
            # No instance can lend to the first borrower: kept loans go back, to lend again.
            if message.wanted:
                rmanager.drop_kept()
            self._room_wanted = message.wanted
            self._room_reported = None
            self.report_room()
        elif isinstance(message, Recall):
            returning = rmanager.num_returning(message.creditor)
            freed = rmanager.drop_kept(message.creditor, message.num_blocks)
            if freed < message.num_blocks and not message.kept_only:
                self.on_recall(message.creditor, message.num_blocks - freed)
                # The preempted requests' cached blocks of the creditor became kept loans: they go back too.
                rmanager.drop_kept(message.creditor)
            freed = rmanager.num_returning(message.creditor) - returning
            self._recall_answers.append((message.creditor, Recalled(me, freed)))
        elif isinstance(message, Kept):
            self.kept_by[message.debtor] = message.num_blocks
            if not message.num_blocks:
                del self.kept_by[message.debtor]
        elif isinstance(message, Recalled):
            request_id, num_asked, _ = self._recall
            self._recall = None
            if message.num_blocks < num_asked:
                rmanager.end_reservation(request_id)
        elif isinstance(message, Swap):
            # While this instance waits for its Recall's answer from the peer, the blocks the peer frees for it
            # must come back as returns (which the answer follows), not as swapped blocks: decline.
            recalling = self._recall is not None and self._recall[2] == message.sender
            moves = [] if recalling else rmanager.swap_in(message.sender, message.block_ids)
            if moves:
                self.on_swap_in(moves)
                self._settle_swap(message.sender, len(moves))
            self.post(message.sender, Swapped(me, [(move.dst_block, move.src_block) for move in moves]))
        elif isinstance(message, Swapped):
            self.on_swapped(rmanager.end_swap(message.pairs))
            if message.pairs:
                self._settle_swap(message.sender, len(message.pairs))
        else:
            raise TypeError(f"instance {me} got an unexpected control message: {message!r}")

    def _forget_instance(self, failed: int) -> None:
        """An instance failed: the blocks it held come home, the requests here that held blocks there recompute, no
        Recall waits for it, and the gManager hears again what each request still needs (a loan it counted may
        have died with the instance)."""
        if failed in self.failed:
            return  # this instance found it out first (InstanceLoop), and the gManager has now declared it
        self.failed.add(failed)
        self.kept_by.pop(failed, None)
        self.on_lost(self.rmanager.forget_instance(failed))
        self._recall_answers = [(creditor, answer) for creditor, answer in self._recall_answers if creditor != failed]
        if self._recall is not None and self._recall[2] == failed:
            self.rmanager.end_reservation(self._recall[0])
            self._recall = None
        for request_id in self.rmanager.pending_needs():
            self._correct(request_id)
        self._room_reported = None
        self.report_room()

    def _correct(self, request_id: str) -> None:
        """The gManager waits on a request that needs other blocks than it thinks (a loan and a smaller need
        crossed, or the request ended): tell it the request's need now, so that its queue moves on."""
        need = self.rmanager.pending_needs().get(request_id, 0)
        self.post(GMANAGER_INSTANCE, Borrow(self.instance_id, request_id, self._arrivals.get(request_id, 0), need))
        if need:
            self._asked[request_id] = need
        else:
            self._asked.pop(request_id, None)

    def _settle_swap(self, peer: int, num_blocks: int) -> None:
        """The ledger drops this instance's loans to ``peer`` that a swap brought home (the peer settles its own)."""
        self._tell_gmanager(Settled(self.instance_id, peer, num_blocks, num_blocks, *self._room(),
                                    num_swapped=num_blocks))

    def _room(self) -> tuple[int, int]:
        """What this instance may lend, and of that the blocks that hold no cached prefix."""
        return self.rmanager.num_lendable_blocks, self.rmanager.num_fresh_lendable_blocks

    def _tell_gmanager(self, message: Lent | Settled) -> None:
        """Lent and Settled tell the gManager this instance's room too."""
        self._room_reported = message.num_lendable_blocks, message.num_fresh_blocks
        self.post(GMANAGER_INSTANCE, message)

    def report_room(self) -> None:
        """While the gManager wants room, tell it whenever what this instance may lend changed."""
        room = self._room()
        if self._room_wanted and room != self._room_reported:
            self._room_reported = room
            self.post(GMANAGER_INSTANCE, Room(self.instance_id, *room))

    def sync(self, arrivals: Mapping[str, int]) -> None:
        """Hand released blocks back, tell the gManager what each request now needs, report room.

        ``arrivals``: request id -> arrival of this instance's unfinished requests. Blocks that DGFM moved
        home go back here too: call this only once their KV has been copied.
        """
        rmanager, me = self.rmanager, self.instance_id
        self._arrivals = arrivals
        if self._room_wanted:
            rmanager.drop_kept()  # see WantRoom: loans kept since then go back too
        for creditor, (block_ids, num_moved) in rmanager.take_returns().items():
            self.post(creditor, ReturnBlocks(me, block_ids, num_moved))
        # Before the answers to Recalls: a creditor reads an answer knowing what this instance still keeps.
        kept = rmanager.kept_counts()
        if kept != self._kept_reported:
            for creditor in kept.keys() | self._kept_reported.keys():
                if kept.get(creditor, 0) != self._kept_reported.get(creditor, 0):
                    self.post(creditor, Kept(me, kept.get(creditor, 0)))
            self._kept_reported = kept
            self.post(GMANAGER_INSTANCE, KeptLoans(me, kept))
        # On the same channel as the returns, so that a creditor reads an answer only once it has the blocks.
        # Blocks a recalled request held in this instance's swap go back only when the swap ends.
        if not rmanager.swapping:
            for creditor, answer in self._recall_answers:
                self.post(creditor, answer)
            self._recall_answers = []
        needs = rmanager.pending_needs()
        for request_id in [*self._asked, *(rid for rid in needs if rid not in self._asked)]:
            need, asked = needs.get(request_id, 0), self._asked.get(request_id)
            if need == asked or (asked is None and need == 0):
                continue
            if asked == _YIELDED and not rmanager.block_table(request_id):
                continue  # still waiting for its turn
            self.post(GMANAGER_INSTANCE, Borrow(me, request_id, arrivals.get(request_id, 0), need))
            if need:
                self._asked[request_id] = need
            else:
                del self._asked[request_id]
        self.report_room()

    def recall(self, request_id: str, debtor: int, num_blocks: int, need: int, kept_only: bool = False) -> bool:
        """Ask ``debtor`` to give ``num_blocks`` of this pool back (``kept_only``: of its kept loans only), for
        ``request_id`` of this instance, which needs ``need`` blocks in all; False when ``debtor`` holds none, or
        while an earlier Recall awaits its answer (one at a time).

        Until the request ends, the blocks it does not hold yet are kept out of lending: on the front, the
        gManager's next Lend is handled with the returns, before the scheduler could admit the request, and a
        borrower would take the blocks the request needs to grow. The reservation ends at once if the answer
        shows fewer blocks freed than asked (the debtor's holders were recalled before, or have ended): the request
        then waits as it would without a recall, and reserving would only hold up the borrower it waits for.
        """
        if not self.rmanager.lent_to(debtor) or self._recall is not None:
            return False
        self.rmanager.reserve(request_id, need)
        self._recall = (request_id, num_blocks, debtor)
        self.post(debtor, Recall(self.instance_id, num_blocks, kept_only))
        return True

    def offer_swap(self, peer: int, block_ids: list[int]) -> None:
        """Offer ``peer`` a DGFM swap of these blocks of its pool (RManager.begin_swap), once their KV is copied
        out."""
        self.post(peer, Swap(self.instance_id, block_ids))

    @property
    def awaiting_recall(self) -> bool:
        """Whether a Recall this instance sent is still unanswered."""
        return self._recall is not None

    def forget(self, request_id: str) -> None:
        """The request ended (finished or aborted): it needs nothing more."""
        self.rmanager.end_reservation(request_id)
        if self._asked.pop(request_id, None) is not None:
            self.post(GMANAGER_INSTANCE, Borrow(self.instance_id, request_id, 0, 0))


@dataclass
class ControlTraffic:
    """Control messages one leader sent to other ranks, and their pickled bytes (for benchmarks)."""

    num_messages: int = 0
    num_bytes: int = 0

    def record(self, message: object) -> None:
        self.num_messages += 1
        self.num_bytes += len(pickle.dumps(message))


# See Pacer.
ACTIVE_SECONDS = 0.5
ACTIVE_POLL_SECONDS = 5e-4
DORMANT_AFTER_SECONDS = 1.0
DORMANT_POLL_SECONDS = 0.02
# Tags of control messages between leaders, between the leaders and the gManager service, and from the leaders
# to the front.
CONTROL_TAG = 11
GMANAGER_TAG = 12
FRONT_TAG = 14
# How long a rank with nothing to do sleeps between checks for a message. After BACKOFF_AFTER_SECONDS
# of waiting the sleep doubles up to the second bound, so that a long wait takes almost no CPU; a short
# wait keeps the short sleep, which oversleeps the message by little.
IDLE_POLL_SECONDS = 50e-6
MAX_IDLE_POLL_SECONDS = 5e-3
BACKOFF_AFTER_SECONDS = 0.02


class Mailbox:
    """Point-to-point control messages among the instances' leader ranks over their communicator (MPI's, or
    megakv.parallel.messaging's sockets where no mpirun started the job).

    Sends never block: a leader may be mid-step when another writes to it. A peer that MPI reports failed
    (ULFM) joins ``failed``: what is posted to it is dropped, and the owner decides what its loss means.
    """

    def __init__(self, comm, traffic: ControlTraffic | None = None, tag: int = CONTROL_TAG) -> None:
        self.comm = comm
        self.traffic = traffic
        self.tag = tag
        self.failed: set[int] = set()
        self._sends: list = []

    def _survive(self, err: Exception) -> None:
        """Record the failed peers an MPI error reports, or raise it if it reports something else."""
        failed = failed_peers(self.comm, err)
        if failed is None:
            raise err
        self.failed.update(failed)

    def _pending_sends(self) -> list:
        pending = []
        for send in self._sends:
            try:
                if not send.Test():
                    pending.append(send)
            except Exception as err:  # sent to a peer that failed: it is gone with it
                self._survive(err)
        return pending

    def post(self, rank: int, message: object) -> None:
        if rank in self.failed:
            return
        if self.traffic is not None:
            self.traffic.record(message)
        self._sends = self._pending_sends()
        try:
            self._sends.append(self.comm.isend(message, dest=rank, tag=self.tag))
        except Exception as err:
            self._survive(err)

    def has_mail(self) -> bool:
        try:
            return self.comm.iprobe(tag=self.tag)
        except Exception as err:
            self._survive(err)
            return True  # the caller's receive sees what is left

    def receive(self) -> list:
        """Every message that has arrived, in order of arrival per sender."""
        messages = []
        while True:
            try:
                if not self.comm.iprobe(tag=self.tag):
                    return messages
                messages.append(self.comm.recv(tag=self.tag))
            except Exception as err:
                self._survive(err)

    def flush(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) until every posted message has left."""
        deadline = time.monotonic() + timeout
        while self._sends and time.monotonic() < deadline:
            self._sends = self._pending_sends()
            time.sleep(1e-3)


def wait_quietly(done: Callable[[], bool], timeout: float | None = None,
                 max_pause: float = MAX_IDLE_POLL_SECONDS, wakeup: threading.Event | None = None,
                 first_pause: float = IDLE_POLL_SECONDS) -> bool:
    """Wait until ``done()`` (True) or ``timeout`` seconds (False) without spinning: MPI's blocking calls
    busy-poll, which takes a core from the instances still computing and burns one while the cluster is idle.
    The sleep between two checks starts at ``first_pause`` and, after BACKOFF_AFTER_SECONDS, doubles up to
    ``max_pause``, which bounds how late a wait may notice its message. ``wakeup``, set by a thread of this
    process after it brings what ``done`` waits for, ends a sleep at once."""
    pause = min(first_pause, max_pause)
    now = time.monotonic()
    backoff_at, deadline = now + BACKOFF_AFTER_SECONDS, None if timeout is None else now + timeout
    while not done():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        if wakeup is None:
            time.sleep(pause)
        elif wakeup.wait(pause):
            # Cleared here too: a producer may set it after its item was taken, and a set event never sleeps.
            wakeup.clear()
        if now > backoff_at:
            pause = min(2 * pause, max_pause)
    return True


class Pacer:
    """How late a waiting rank may notice its next message.

    Control traffic comes in bursts (a long prompt borrows chunk after chunk, a finished request settles with
    every creditor, DGFM moves block after block): for ACTIVE_SECONDS after its last message a rank checks at
    least every ACTIVE_POLL_SECONDS, a few percent of a core; quiet for longer, it backs off to ``idle_pause``
    between checks, which costs little; quiet for DORMANT_AFTER_SECONDS, to DORMANT_POLL_SECONDS, which costs
    almost nothing (an idle server's ranks), and the first message after such a spell waits up to that long.
    """

    def __init__(self, idle_pause: float = MAX_IDLE_POLL_SECONDS, active_pause: float = ACTIVE_POLL_SECONDS,
                 first_pause: float = IDLE_POLL_SECONDS) -> None:
        self._last_message = float("-inf")
        self._first_pause = first_pause
        # Until when (seconds of quiet) each pace holds; the dormant pace holds from then on.
        self._phases = ((ACTIVE_SECONDS, active_pause), (DORMANT_AFTER_SECONDS, idle_pause))
        self._dormant_pause = max(idle_pause, DORMANT_POLL_SECONDS)

    def saw_message(self) -> None:
        self._last_message = time.monotonic()

    def wait(self, done: Callable[[], bool], timeout: float | None = None,
             wakeup: threading.Event | None = None) -> bool:
        """wait_quietly at this rank's pace: True once ``done()``, False after ``timeout`` seconds."""
        quiet = time.monotonic() - self._last_message
        for ends_at, pause in self._phases:
            if quiet >= ends_at:
                continue
            window = ends_at - quiet if timeout is None else min(timeout, ends_at - quiet)
            if wait_quietly(done, window, pause, wakeup, self._first_pause):
                return True
            if timeout is not None:
                timeout -= window
                if timeout <= 0:
                    return False
            quiet = ends_at
        return wait_quietly(done, timeout, self._dormant_pause, wakeup, self._first_pause)
