"""The gManager as a service: a thread of the front's rank with a communicator of its own.

Hosted in instance 0's step loop, the gManager would answer a Borrow only between two of instance 0's
steps, so every borrower in the cluster would wait for the front's forward pass. On its own thread it
answers whatever instance 0 is computing: torch releases the GIL in its kernels, and Python hands it over
at its switch interval otherwise (lowering that interval answers sooner but slows the front's own decode,
docs/benchmarks.md). The thread alone touches the gManager's communicator on this rank and the ``GManager``
itself; instance 0 hands it its messages through a queue, gets the answers through ``deliver_home``, and
reads the ledger under a lock.

The service also keeps the cluster's membership: an instance whose leader MPI reports failed (ULFM),
that another instance reports unresponsive, or that has sent nothing (not even its heartbeat,
``Alive``) for the peer timeout is declared failed, and every instance hears of it.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from megakv.distkv.control import GMANAGER_INSTANCE, Mailbox, Pacer
from megakv.distkv.gmanager import GManager
from megakv.distkv.messages import Alive, Left, Unresponsive, sender_of

# Between two checks of a quiet service (see Pacer): each check probes MPI, which costs a leader's idle check
# again on a rank that may have nothing else to do; the first Borrow after a quiet spell waits up to this long.
IDLE_PAUSE_SECONDS = 0.02


class GManagerService:
    """Runs ``gmanager`` on a thread until every other instance has Left and ``stop`` is called.

    ``mailbox`` reaches every instance's leader (rank i of its communicator is instance i). The instance that
    hosts the service, GMANAGER_INSTANCE, sends through ``submit`` and gets its answers through ``deliver_home``,
    called from the service's thread. Another instance silent for ``peer_timeout`` seconds is declared failed.
    """

    def __init__(self, gmanager: GManager, mailbox: Mailbox, deliver_home: Callable[[object], None],
                 peer_timeout: float) -> None:
        self.gmanager = gmanager
        self._mailbox = mailbox
        self._deliver_home = deliver_home
        self.peer_timeout = peer_timeout
        # When each instance was last heard from (its own host counts as always heard).
        self._heard = [time.monotonic()] * gmanager.num_instances
        self._next_liveness_check = time.monotonic()
        # Held while the thread handles a message, so that the front reads a ledger between two messages.
        self.lock = threading.Lock()
        self._home: deque[object] = deque()
        self._home_event = threading.Event()
        self._left = {GMANAGER_INSTANCE}
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self._pacer = Pacer(IDLE_PAUSE_SECONDS)
        self._thread = threading.Thread(target=self._serve, name="megakv-gmanager", daemon=True)
        self._thread.start()

    def submit(self, message: object) -> None:
        """A message from the home instance (any thread)."""
        self._home.append(message)
        self._home_event.set()

    @property
    def is_busy(self) -> bool:
        """True while the gManager has work outstanding or a message of the home instance is unread."""
        with self.lock:
            return bool(self._home) or self.gmanager.is_busy

    def describe(self) -> str:
        with self.lock:
            return self.gmanager.describe()

    def check(self) -> None:
        """Raise if the service's thread failed: the cluster cannot borrow or settle without it."""
        if self.error is not None:
            raise RuntimeError(f"the gManager failed: {self.error!r}") from self.error

    def stop(self, timeout: float) -> None:
        """Let the thread end once every instance has Left (waiting ``timeout`` seconds at most for them), then
        wait for its last answers to leave."""
        self._stopping.set()
        self._thread.join(timeout)
        self._mailbox.flush(timeout)

    def _finished(self) -> bool:
        gone = self._left | set(self.gmanager.failed)
        return self._stopping.is_set() and len(gone) == self.gmanager.num_instances and not self._home

    def _has_work(self) -> bool:
        return (bool(self._home) or self._mailbox.has_mail() or self._finished()
                or time.monotonic() >= self._next_liveness_check)

    def _serve(self) -> None:
        try:
            while not self._finished():
                self._pacer.wait(self._has_work, None, self._home_event)
                self._home_event.clear()
                while self._home:
                    self._handle(self._home.popleft())
                for message in self._mailbox.receive():
                    self._handle(message)
                self._check_liveness()
        except Exception as err:  # reported on the front's next step (check)
            self.error = err

    def _check_liveness(self) -> None:
        """Declare failed the instances MPI reports failed and those silent for the peer timeout."""
        for instance in sorted(self._mailbox.failed - set(self.gmanager.failed) - self._left):
            self._declare(instance, "its leader rank died (MPI reports it failed)")
        now = time.monotonic()
        if now < self._next_liveness_check:
            return
        self._next_liveness_check = now + self.peer_timeout / 8
        for instance, heard in enumerate(self._heard):
            if (instance != GMANAGER_INSTANCE and instance not in self._left and instance not in self.gmanager.failed
                    and now - heard > self.peer_timeout):
                self._declare(instance, f"nothing from it, not even its heartbeat, for {now - heard:.1f} s")

    def _declare(self, instance: int, reason: str) -> None:
        print(f"megakv: the gManager declares instance {instance} failed ({reason}): its requests run again on the "
              "other instances", file=sys.stderr, flush=True)
        with self.lock:
            sends = self.gmanager.fail_instance(instance)
        self._send(sends)

    def _handle(self, message: object) -> None:
        sender = sender_of(message)
        if sender is not None:
            self._heard[sender] = time.monotonic()
        if isinstance(message, Alive):
            return  # no burst of control traffic follows a heartbeat: the pace stays idle
        self._pacer.saw_message()
        if isinstance(message, Left):
            self._left.add(message.instance_id)
            return
        if isinstance(message, Unresponsive):
            if message.instance_id not in self.gmanager.failed:
                self._declare(message.instance_id, f"instance {message.reporter} got no answer from it within "
                                                   f"{self.peer_timeout:g} s, or its link ended")
            return
        with self.lock:
            sends = self.gmanager.handle(message)
        self._send(sends)

    def _send(self, sends: list[tuple[int, object]]) -> None:
        for instance_id, reply in sends:
            if instance_id == GMANAGER_INSTANCE:
                self._deliver_home(reply)
            else:
                self._mailbox.post(instance_id, reply)
