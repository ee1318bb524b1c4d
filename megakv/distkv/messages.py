"""Control-plane messages between rManagers and the gManager (DistKV-LLM section 4.3).

Small typed records sent point to point when blocks are borrowed, returned or moved; the MPI
mailbox pickles them, the in-process cluster of the tests passes them as they are.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Borrow:
    """Debtor -> gManager: ``request_id`` still needs ``num_blocks`` from other instances (0: nothing more)."""

    debtor: int
    request_id: str
    # The request's arrival at the front: the gManager serves borrowers first come, first served.
    arrival: int
    num_blocks: int


@dataclass(frozen=True)
class Lend:
    """gManager -> creditor: lend up to ``num_blocks`` to ``debtor`` for its request ``request_id`` (``fresh_only``:
    only blocks that hold no cached prefix)."""

    debtor: int
    request_id: str
    num_blocks: int
    fresh_only: bool


@dataclass(frozen=True)
class Loan:
    """Creditor -> debtor: these physical blocks of mine now hold your request's KV."""

    creditor: int
    request_id: str
    block_ids: list[int]


@dataclass(frozen=True)
class Lent:
    """Creditor -> gManager: what it lent for one Lend (maybe fewer blocks than asked), and what it may still lend."""

    creditor: int
    debtor: int
    request_id: str
    num_blocks: int
    num_lendable_blocks: int
    # Of those, the blocks that hold no cached prefix (RManager.num_fresh_lendable_blocks).
    num_fresh_blocks: int


@dataclass(frozen=True)
class ReturnBlocks:
    """Debtor -> creditor: take these blocks back (their request ended, or DGFM moved them home)."""

    debtor: int
    block_ids: list[int]
    # How many of them DGFM moved home (their KV now lives on the debtor).
    num_moved: int = 0


@dataclass(frozen=True)
class Settled:
    """Creditor -> gManager: a debtor returned blocks; the ledger drops them."""

    creditor: int
    debtor: int
    num_blocks: int
    num_moved: int
    num_lendable_blocks: int
    num_fresh_blocks: int
    # How many of the moved blocks a DGFM swap moved.
    num_swapped: int = 0


@dataclass(frozen=True)
class KeptLoans:
    """Debtor -> gManager: of its debts, the blocks it keeps on loan for their cached content while no request holds
    them, by creditor (all of them, whenever they change). They go back when asked, so they keep nobody busy."""

    debtor: int
    counts: dict[int, int]


@dataclass(frozen=True)
class Kept:
    """Debtor -> creditor: how many blocks of the creditor's pool it keeps on loan for their cached content, no
    request holding them (whenever that changes): the creditor may take them back at once (Recall, kept_only)."""

    debtor: int
    num_blocks: int


@dataclass(frozen=True)
class Recall:
    """Creditor -> debtor: a request of the creditor's own waits for room that it lent you; give back up to
    ``num_blocks``, kept loans first, then (unless ``kept_only``) by preempting requests that hold them (none that
    was recalled before)."""

    creditor: int
    num_blocks: int
    kept_only: bool = False


@dataclass(frozen=True)
class Recalled:
    """Debtor -> creditor, after the returns of a Recall: how many blocks of the creditor's it freed."""

    debtor: int
    num_blocks: int


@dataclass(frozen=True)
class Yield:
    """gManager -> debtor: a request that came first needs room; give up this waiting request's blocks."""

    request_id: str


@dataclass(frozen=True)
class Yielded:
    """Debtor -> gManager: the request gave its blocks back and waits for its Turn.

    The gManager may have asked a request to yield that has since asked again (messages from the
    debtor and the gManager cross): this tells it which requests really wait for a turn.
    """

    debtor: int
    request_id: str
    arrival: int


@dataclass(frozen=True)
class Turn:
    """gManager -> debtor: the request that yielded may run again; it is first in line for room."""

    request_id: str


@dataclass(frozen=True)
class WantRoom:
    """gManager -> every instance: report (with Room) whenever the blocks you may lend change, or stop."""

    wanted: bool


@dataclass(frozen=True)
class Room:
    """Instance -> gManager: the blocks it may lend now, and of those the blocks that hold no cached prefix."""

    instance_id: int
    num_lendable_blocks: int
    num_fresh_blocks: int


@dataclass(frozen=True)
class Alive:
    """Instance leader -> gManager service, every quarter of the peer timeout from a thread of its own: the
    instance runs, whatever its step is doing. An instance silent for the peer timeout is declared failed."""

    instance_id: int


@dataclass(frozen=True)
class Left:
    """Instance leader -> gManager service, its last message: it has stopped and will send nothing more."""

    instance_id: int


@dataclass(frozen=True)
class InstanceFailed:
    """gManager -> every instance (and the front): ``instance_id`` is out of the cluster (it died, hung or was cut
    off). Its loans leave the ledger either way, and nothing it sent from now on is read; if it still runs, it ends
    when it reads this."""

    instance_id: int


@dataclass(frozen=True)
class Unresponsive:
    """Instance -> gManager: ``instance_id`` did not answer one of the reporter's ranks within the peer timeout, or
    its link ended: declare it failed (the reporter already treats it so)."""

    reporter: int
    instance_id: int


@dataclass(frozen=True)
class Swap:
    """Instance -> a peer that holds blocks of its requests while it holds blocks of the peer's (a cycle of two
    in the debt graph; DGFM swaps instead of pulling home, which needs free room): the sender has copied its KV
    out of these blocks of the peer's pool and reads them no more; fill them with the KV of the peer's blocks
    it holds, one for one."""

    sender: int
    block_ids: list[int]


@dataclass(frozen=True)
class Swapped:
    """Answer to a Swap, once the KV has moved: ``pairs`` of (block of the Swap, block of the Swap's sender
    whose KV it now holds); each second block now belongs to the sender again, empty. Fewer pairs than offered
    blocks when the peer holds fewer of the sender's blocks by then."""

    sender: int
    pairs: list[tuple[int, int]]


def sender_of(message: object) -> int | None:
    """The instance that sent a control message; None for the gManager's own (Lend, Yield, Turn, WantRoom,
    InstanceFailed)."""
    if isinstance(message, (Borrow, ReturnBlocks, Yielded, Recalled, KeptLoans, Kept)):
        return message.debtor
    if isinstance(message, Unresponsive):
        return message.reporter
    if isinstance(message, (Loan, Lent, Settled, Recall)):
        return message.creditor
    if isinstance(message, (Swap, Swapped)):
        return message.sender
    if isinstance(message, (Room, Left, Alive)):
        return message.instance_id
    return None
