"""Control-plane messages between rManagers and the gManager (DistKV-LLM section 4.3).

Small typed records; the MPI transport pickles them, the in-process fake passes them as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class BlockRef(NamedTuple):
    """Where one logical block of a request lives: an instance and a physical block id there.

    A named tuple rather than a dataclass: tables hold thousands of them and are scanned every step.
    """

    instance_id: int
    block_id: int


# Placeholder for a block the rManager has promised but not yet borrowed.
PENDING = BlockRef(-1, -1)


@dataclass(frozen=True)
class RemoteBlock:
    """A debtor's block held by a creditor, as a candidate for a DGFM move."""

    request_id: str
    logical_index: int
    block_id: int


@dataclass(frozen=True)
class Heartbeat:
    """rManager -> gManager, every step: free room, what it needs to borrow, what it holds remotely."""

    instance_id: int
    num_free_blocks: int
    num_lendable_blocks: int
    # request id -> blocks it still needs from other instances
    needs: dict[str, int] = field(default_factory=dict)
    # creditor -> some of this instance's blocks it holds (up to the DGFM move bound)
    remote_blocks: dict[int, list[RemoteBlock]] = field(default_factory=dict)
    # creditor -> blocks returned to it this step (requests that ended)
    returned: dict[int, int] = field(default_factory=dict)
    # Free blocks the instance keeps for its own requests' growth rather than pulling blocks home.
    num_reserved_blocks: int = 0


@dataclass(frozen=True)
class Grant:
    """gManager -> debtor: borrow ``num_blocks`` for ``request_id`` from ``creditor``."""

    request_id: str
    creditor: int
    num_blocks: int


@dataclass(frozen=True)
class LendRequest:
    """Debtor -> creditor: lend me ``num_blocks`` for my request ``request_id``."""

    debtor: int
    request_id: str
    num_blocks: int


@dataclass(frozen=True)
class LendReply:
    """Creditor -> debtor: these physical blocks of mine now hold your request's KV."""

    creditor: int
    request_id: str
    block_ids: list[int]


@dataclass(frozen=True)
class ReturnBlocks:
    """Debtor -> creditor: the request ended; take these blocks back."""

    debtor: int
    block_ids: list[int]


@dataclass(frozen=True)
class Transfer:
    """One block's KV copied from (src_instance, src_block) to (dst_instance, dst_block)."""

    src_instance: int
    src_block: int
    dst_instance: int
    dst_block: int
    # Position of the move in the cluster-wide plan: both ends tag the copy with it.
    plan_index: int


@dataclass(frozen=True)
class Relocation:
    """DGFM: a request's logical block now lives at ``new``; the block it leaves is ``old``."""

    owner: int
    request_id: str
    logical_index: int
    old: BlockRef
    new: BlockRef


@dataclass(frozen=True)
class MovePlan:
    """gManager -> every rManager involved: the relocations of one DGFM step, each one block copy."""

    relocations: list[Relocation]


@dataclass(frozen=True)
class ClusterView:
    """gManager -> every rManager: how many blocks the other instances could lend it next step."""

    borrowable: int
