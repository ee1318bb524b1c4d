"""The DistKV data plane's links: a stream socket from each rank to the same TP rank of every other instance.

A remote micro-attention is one round trip per layer on the asking instance's critical path, so the
transport's latency is paid per layer of every step of a request with remote blocks. Between two blocked
processes of a 2-vCPU host, a 4 KB round trip over gloo took 160-170 us, as much as a whole layer of a small
model's decode step; over a Unix socket it takes 44-62 us, most of it the two wake-ups (tools/bench_distkv.py).
So ranks on one host link over Unix sockets (in the abstract namespace: nothing on disk to leak when a rank is
killed), and ranks on different hosts over TCP with Nagle off.
Links are authenticated with multiprocessing.connection's HMAC handshake, under a key instance 0 draws
for the job.

Each ordered pair of instances has a link of its own, used by one thread at each end: the asking rank's
step sends a request and reads its answer, and the lending rank's KV server reads the request and answers.
A link therefore carries one exchange at a time and needs no tags. A link that ends means its peer is gone;
one that stays silent mid-exchange for the peer timeout (every operation on a link is bounded by it) means
its peer hung or was cut off. Either way the link is shut for good (``shut``), and only it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
from collections.abc import Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener

import torch
import torch.distributed as dist

from megakv.parallel import state

# Connections a listener queues before accepting them: every other instance connects at once.
_BACKLOG = 1024


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous (for sendmsg and recv_into)."""
    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


def send_all(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """Send the buffers back to back, in one system call when the socket takes them whole."""
    views = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def receive_into(sock: socket.socket, buffer: bytearray | memoryview, peer: str) -> None:
    """Fill the buffer from the socket; a link that ends first means the peer was killed or failed (and one silent
    for the socket's timeout raises TimeoutError, an OSError too)."""
    view = memoryview(buffer).cast("B")
    while view:
        received = sock.recv_into(view)
        if received == 0:
            raise ConnectionError(f"the DistKV link with {peer} closed mid-exchange: it was killed or failed")
        view = view[received:]


def _as_socket(connection: Connection, timeout: float) -> socket.socket:
    """The socket under a connection that has passed the handshake; megakv frames its own messages on it, each
    send and receive bounded by ``timeout`` seconds."""
    sock = socket.socket(fileno=os.dup(connection.fileno()))
    connection.close()
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    return sock


class KVLinks:
    """This rank's links with its counterparts in the other instances.

    ``outgoing[i]`` carries this rank's requests to instance i's KV server, ``incoming[i]`` instance i's
    requests to this rank's KV server. Creating them is a collective over the DistAttention group. Every
    operation on a link gives up after ``timeout`` seconds.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        group, me = state.get_dist_attention_group(), state.get_instance_id()
        num_instances = state.get_num_instances()
        # Rank 0 of the world is TP rank 0 of instance 0, a member of only one DistAttention group.
        owners: list[tuple | None] = [None] * num_instances
        dist.all_gather_object(owners, (socket.gethostname(), secrets.token_bytes(32)), group=group)
        hostname, authkey = socket.gethostname(), owners[0][1]
        single_host = all(host == hostname for host, _ in owners)
        if single_host:
            listener = Listener(f"\0megakv-kv-{os.getpid()}-{secrets.token_hex(8)}", "AF_UNIX", _BACKLOG, authkey)
        else:
            listener = Listener((state.host_address(), 0), "AF_INET", _BACKLOG, authkey)
        addresses: list[object] = [None] * num_instances
        dist.all_gather_object(addresses, listener.address, group=group)
        self.incoming: dict[int, socket.socket] = {}
        accepting = threading.Thread(target=self._accept, args=(listener, num_instances - 1),
                                     name="megakv-kv-links-accept", daemon=True)
        accepting.start()
        self.outgoing: dict[int, socket.socket] = {}
        for instance, address in enumerate(addresses):
            if instance != me:
                connection = Client(address, authkey=authkey)
                connection.send_bytes(me.to_bytes(4, "little"))
                self.outgoing[instance] = _as_socket(connection, timeout)
        accepting.join()
        listener.close()
        if len(self.incoming) != num_instances - 1:
            raise ConnectionError(f"instance {me} got {len(self.incoming)} of the {num_instances - 1} DistKV links "
                                  "it waits for: another instance failed while connecting")

    def _accept(self, listener: Listener, count: int) -> None:
        while len(self.incoming) < count:
            try:
                connection = listener.accept()
                instance = int.from_bytes(connection.recv_bytes(), "little")
            except (AuthenticationError, EOFError, ConnectionError):
                continue  # a stranger without the job's key, or one that left during the handshake
            self.incoming[instance] = _as_socket(connection, self.timeout)

    @staticmethod
    def peer_name(instance: int) -> str:
        """How errors name this rank's counterpart in ``instance``."""
        rank = instance * state.get_tensor_model_parallel_world_size() + state.get_tensor_model_parallel_rank()
        return f"rank {rank} (instance {instance})"

    def shut(self, instance: int) -> None:
        """End both links with ``instance`` (it failed): a wait on either returns at once, here and there."""
        for links in (self.outgoing, self.incoming):
            if instance in links:
                with contextlib.suppress(OSError):
                    links[instance].shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in (*self.outgoing.values(), *self.incoming.values()):
            sock.close()
