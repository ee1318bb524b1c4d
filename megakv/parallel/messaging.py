"""Pickled point-to-point messages between ranks, under mpirun or under a launcher without MPI.

The DistKV control plane, the step plans a leader hands its TP ranks, and the cluster's front speak
through an mpi4py-style communicator. Under mpirun that is MPI's world. The deepspeed and torchrun
launchers only set RANK and WORLD_SIZE, and give no MPI world, so :class:`SocketComm` offers the same
calls (send, isend, iprobe, recv, gather, Split, Abort) over TCP connections between the ranks, set up
through the default process group. Each rank listens on one socket and reads each peer in a thread of
its own: a message is taken in as soon as it arrives, whatever the main thread is doing, so a send
never waits for its receiver's step, and a receive waits on a condition variable instead of spinning.
Connections are authenticated (HMAC) with a key that rank 0 draws for the job.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener

import torch.distributed as dist

from megakv.parallel import state

ANY_SOURCE = -1
ANY_TAG = -1
# Connections a listener queues before accepting them: every rank may connect at once at startup.
_BACKLOG = 1024
# Tags of SocketComm's own collectives; a caller's tags are >= 0, as in MPI.
_GATHER_TAG = -2
_SPLIT_TAG = -3


@dataclass(frozen=True)
class _Envelope:
    comm_id: tuple
    source: int
    tag: int
    payload: object


class _Sent:
    """What isend returns: the message has left when isend returns (a peer's reader thread takes it in)."""

    @staticmethod
    def Test() -> bool:  # noqa: N802 (mpi4py's name)
        return True


class _Node:
    """This process's end of the sockets: its listener, its connections to peers, and the messages received.

    A connection starts with the sender's global rank and ends with a goodbye (None), sent when the sender's
    interpreter exits. A connection that ends without one means its sender was killed or failed: as MPI
    would, this rank then ends at once, naming it (the launcher stops the others), rather than wait for
    messages that will never come.
    """

    def __init__(self, rank: int, listen_host: str, authkey: bytes) -> None:
        self.rank = rank
        self.authkey = authkey
        self.listener = Listener((listen_host, 0), backlog=_BACKLOG, authkey=authkey)
        self.peer_addresses: list[tuple[str, int]] = []
        self._connections: dict[int, Connection] = {}
        self._connect_lock = threading.Lock()
        self._send_locks: dict[int, threading.Lock] = {}
        # comm id -> messages not yet received, in order of arrival (so in order of sending, per sender)
        self._inbox: dict[tuple, list[_Envelope]] = {}
        self._arrived = threading.Condition()
        threading.Thread(target=self._accept, name="megakv-messaging-accept", daemon=True).start()
        atexit.register(self._say_goodbye)

    def _accept(self) -> None:
        while True:
            try:
                connection = self.listener.accept()
            except (AuthenticationError, EOFError, ConnectionError):
                continue  # a client without the job's key, or one that left during the handshake
            threading.Thread(target=self._read, args=(connection,), name="megakv-messaging-read",
                             daemon=True).start()

    def _read(self, connection: Connection) -> None:
        peer = "?"
        try:
            peer = connection.recv()
            while (envelope := connection.recv()) is not None:
                with self._arrived:
                    self._inbox.setdefault(envelope.comm_id, []).append(envelope)
                    self._arrived.notify_all()
        except (EOFError, OSError) as err:
            print(f"megakv: rank {self.rank}: rank {peer} is gone (its connection closed without a goodbye: "
                  f"{type(err).__name__}; it was killed or failed): ending this rank", file=sys.stderr, flush=True)
            os._exit(1)

    def _say_goodbye(self) -> None:
        with self._connect_lock:
            for connection in self._connections.values():
                with contextlib.suppress(OSError):
                    connection.send(None)
                    connection.close()

    def send(self, dest: int, envelope: _Envelope) -> None:
        with self._connect_lock:
            if dest not in self._connections:
                connection = Client(self.peer_addresses[dest], authkey=self.authkey)
                connection.send(self.rank)
                self._connections[dest] = connection
                self._send_locks[dest] = threading.Lock()
            connection, lock = self._connections[dest], self._send_locks[dest]
        with lock:
            connection.send(envelope)

    def _find(self, comm_id: tuple, source: int, tag: int) -> int | None:
        for index, envelope in enumerate(self._inbox.get(comm_id, ())):
            if source in (ANY_SOURCE, envelope.source) and tag in (ANY_TAG, envelope.tag):
                return index
        return None

    def probe(self, comm_id: tuple, source: int, tag: int) -> bool:
        with self._arrived:
            return self._find(comm_id, source, tag) is not None

    def take(self, comm_id: tuple, source: int, tag: int) -> object:
        with self._arrived:
            while (index := self._find(comm_id, source, tag)) is None:
                self._arrived.wait()
            return self._inbox[comm_id].pop(index).payload


class SocketComm:
    """A communicator over :class:`_Node` sockets with the mpi4py calls megakv uses (lowercase: pickled
    objects). Every rank of a communicator calls its collectives (gather, Split) in the same order."""

    def __init__(self, node: _Node, comm_id: tuple, global_ranks: Sequence[int]) -> None:
        self._node = node
        self._comm_id = comm_id
        self._global_ranks = list(global_ranks)
        self._rank = self._global_ranks.index(node.rank)
        self._num_splits = 0

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's names, so that callers take either communicator)
        return self._rank

    def Get_size(self) -> int:  # noqa: N802
        return len(self._global_ranks)

    def send(self, obj: object, dest: int, tag: int = 0) -> None:
        self._node.send(self._global_ranks[dest], _Envelope(self._comm_id, self._rank, tag, obj))

    def isend(self, obj: object, dest: int, tag: int = 0) -> _Sent:
        self.send(obj, dest, tag)
        return _Sent()

    def iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> bool:
        return self._node.probe(self._comm_id, source, tag)

    def recv(self, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> object:
        return self._node.take(self._comm_id, source, tag)

    def gather(self, obj: object, root: int = 0) -> list | None:
        if self._rank != root:
            self.send(obj, root, _GATHER_TAG)
            return None
        return [obj if source == root else self.recv(source, _GATHER_TAG) for source in range(self.Get_size())]

    def Split(self, color: int | None, key: int = 0) -> SocketComm | None:  # noqa: N802
        """The ranks that pass the same ``color``, ordered by ``key``; None for a color of None."""
        self._num_splits += 1
        entries = self.gather((color, key))
        if self._rank == 0:
            for dest in range(1, self.Get_size()):
                self.send(entries, dest, _SPLIT_TAG)
        else:
            entries = self.recv(0, _SPLIT_TAG)
        if color is None:
            return None
        members = sorted((member_key, rank) for rank, (member_color, member_key) in enumerate(entries)
                         if member_color == color)
        return SocketComm(self._node, (*self._comm_id, self._num_splits, color),
                          [self._global_ranks[rank] for _, rank in members])

    @staticmethod
    def Abort(errorcode: int = 1) -> None:  # noqa: N802
        """End this process at once; the launcher (deepspeed, torchrun) then stops the job's other ranks."""
        os._exit(errorcode)


_world: SocketComm | None = None


def _create_socket_world() -> SocketComm:
    """Every rank's node, connected through the default process group (a collective over all ranks)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    key = [secrets.token_bytes(32) if rank == 0 else None]
    dist.broadcast_object_list(key, src=0)
    hostnames: list[str | None] = [None] * world_size
    dist.all_gather_object(hostnames, socket.gethostname())
    single_host = len(set(hostnames)) == 1
    node = _Node(rank, "127.0.0.1" if single_host else "0.0.0.0", key[0])
    host = "127.0.0.1" if single_host else state.host_address()
    addresses: list[tuple[str, int] | None] = [None] * world_size
    dist.all_gather_object(addresses, (host, node.listener.address[1]))
    node.peer_addresses = addresses
    return SocketComm(node, ("world",), range(world_size))


def world_comm():
    """The communicator of every rank: MPI's world under mpirun, else sockets set up on the first call (which
    every rank must make, as it is a collective over the default process group)."""
    global _world
    if state.is_mpi_launch():
        from mpi4py import MPI
        return MPI.COMM_WORLD
    if _world is None:
        _world = _create_socket_world()
    return _world


def members_fail_alone() -> bool:
    """Whether a rank's failure leaves the other ranks running: under mpirun only with ULFM (``mpirun --with-ft
    ulfm``, which sets mpi_ft_enable for the ranks); elsewhere the launcher (deepspeed, torchrun) ends the job."""
    return state.is_mpi_launch() and os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() in ("1", "true")


def end_this_rank() -> NoReturn:
    """End this process at once, leaving the job's other ranks running where members fail alone. By SIGKILL rather
    than a non-zero exit: under ``mpirun --with-ft ulfm``, Open MPI 5.0's runtime waits forever for a job one of
    whose ranks exited with a non-zero status, while it goes on after a rank killed by a signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def failed_peers(comm, err: BaseException) -> list[int] | None:
    """When ``err`` is MPI's report that peers of ``comm`` failed (ULFM), acknowledge it, so that receives from
    any source go on, and return the ranks of ``comm`` that have failed so far; None for any other error."""
    if not state.is_mpi_launch():
        return None
    from mpi4py import MPI
    if not isinstance(err, MPI.Exception) or err.Get_error_class() not in (MPI.ERR_PROC_FAILED,
                                                                           MPI.ERR_PROC_FAILED_PENDING):
        return None
    state.note_failed_peer()
    comm.Ack_failed()
    group = comm.Get_failed()
    return sorted(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), comm.Get_group()))


def split(comm, color: int | None, key: int):
    """``comm.Split`` for either communicator; the ranks whose color is None join no new one and get None."""
    if isinstance(comm, SocketComm):
        return comm.Split(color, key)
    from mpi4py import MPI
    return comm.Split(MPI.UNDEFINED if color is None else color, key)
