"""The gManager as a service: a thread of the front's rank with a communicator of its own.

Hosted in instance 0's step loop, the gManager would answer a Borrow only between two of instance 0's
steps, so every borrower in the cluster would wait for the front's forward pass. On its own thread it
answers whatever instance 0 is computing: torch releases the GIL in its kernels, and Python hands it over
at its switch interval otherwise (lowering that interval answers sooner but slows the front's own decode,
docs/benchmarks.md). The thread alone touches the gManager's communicator on this rank and the ``GManager``
itself; instance 0 hands it its messages through a queue, gets the answers through ``deliver_home``, and
reads the ledger under a lock.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from megakv.distkv.control import GMANAGER_INSTANCE, Mailbox, Pacer
from megakv.distkv.gmanager import GManager
from megakv.distkv.messages import Left

# Between two checks of a quiet service (see Pacer): each check probes MPI, which costs a leader's idle check
# again on a rank that may have nothing else to do; the first Borrow after a quiet spell waits up to this long.
IDLE_PAUSE_SECONDS = 0.02


class GManagerService:
    """Runs ``gmanager`` on a thread until every other instance has Left and ``stop`` is called.

    ``mailbox`` reaches every instance's leader (rank i of its communicator is instance i). The instance that
    hosts the service, GMANAGER_INSTANCE, sends through ``submit`` and gets its answers through ``deliver_home``,
    called from the service's thread.
    """

    def __init__(self, gmanager: GManager, mailbox: Mailbox, deliver_home: Callable[[object], None]) -> None:
        self.gmanager = gmanager
        self._mailbox = mailbox
        self._deliver_home = deliver_home
        # Held while the thread handles a message, so that the front reads a ledger between two messages.
        self.lock = threading.Lock()
        self._home: deque[object] = deque()
        self._left = {GMANAGER_INSTANCE}
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self._pacer = Pacer(IDLE_PAUSE_SECONDS)
        self._thread = threading.Thread(target=self._serve, name="megakv-gmanager", daemon=True)
        self._thread.start()

    def submit(self, message: object) -> None:
        """A message from the home instance (any thread)."""
        self._home.append(message)

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
        return self._stopping.is_set() and len(self._left) == self.gmanager.num_instances and not self._home

    def _has_work(self) -> bool:
        return bool(self._home) or self._mailbox.has_mail() or self._finished()

    def _serve(self) -> None:
        try:
            while not self._finished():
                self._pacer.wait(self._has_work)
                while self._home:
                    self._handle(self._home.popleft())
                for message in self._mailbox.receive():
                    self._handle(message)
        except Exception as err:  # reported on the front's next step (check)
            self.error = err

    def _handle(self, message: object) -> None:
        self._pacer.saw_message()
        if isinstance(message, Left):
            self._left.add(message.instance_id)
            return
        with self.lock:
            sends = self.gmanager.handle(message)
        for instance_id, reply in sends:
            if instance_id == GMANAGER_INSTANCE:
                self._deliver_home(reply)
            else:
                self._mailbox.post(instance_id, reply)
