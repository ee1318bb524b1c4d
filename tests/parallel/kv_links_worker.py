"""One rank of a 3-instance world (TP 1) under mpirun; run by tests/parallel/test_kv_links.py. Sets up the KV
links ("unix": every rank on one host; "tcp": each rank claims a host of its own), then every instance sends
every other one a small and a large request at once and checks the answers. Prints "rank R ok <family>"."""
import socket
import sys
import threading

import torch

from megakv.parallel import state

mode = sys.argv[1]
env = state.init_distributed()
state.initialize_model_parallel(1, 3)
me = state.get_instance_id()
if mode == "tcp":
    socket.gethostname = lambda: f"host-{me}"
    state.host_address = lambda: "127.0.0.1"

from megakv.parallel.kv_links import KVLinks, receive_into, send_all, tensor_bytes  # noqa: E402

# A wait past this many seconds fails the test instead of hanging it.
links = KVLinks(timeout=60.0)
# Larger than a socket's buffer, so that a send takes several calls and the receiver reads it in pieces.
SIZES = [3, 5 << 20]


def serve(peer: int, link: socket.socket) -> None:
    """Answer one instance's requests: a size (int64), that many int32, answered with them plus 1000 x me. A thread
    per instance: one server for all would wait on one instance's request while its answer to another fills the
    socket, unread until that instance has sent all its requests (three instances can wait on each other so)."""
    for _ in SIZES:
        size = torch.zeros(1, dtype=torch.long)
        receive_into(link, tensor_bytes(size), f"instance {peer}")
        request = torch.empty(int(size), dtype=torch.int32)
        receive_into(link, tensor_bytes(request), f"instance {peer}")
        send_all(link, [tensor_bytes(request + 1000 * me)])


servers = [threading.Thread(target=serve, args=(peer, link)) for peer, link in links.incoming.items()]
for server in servers:
    server.start()
for size in SIZES:
    for peer, link in links.outgoing.items():
        request = torch.arange(size, dtype=torch.int32) + me
        send_all(link, [tensor_bytes(torch.tensor([size])), tensor_bytes(request)])
    for peer, link in links.outgoing.items():
        answer = torch.empty(size, dtype=torch.int32)
        receive_into(link, tensor_bytes(answer), f"instance {peer}")
        assert torch.equal(answer, torch.arange(size, dtype=torch.int32) + me + 1000 * peer), (me, peer, size)
for server in servers:
    server.join()
families = {link.family for link in (*links.outgoing.values(), *links.incoming.values())}
assert sorted(links.outgoing) == sorted(links.incoming) == [peer for peer in range(3) if peer != me]
links.close()
print(f"rank {me} ok {'/'.join(sorted(family.name for family in families))}", flush=True)
state.destroy_model_parallel()
