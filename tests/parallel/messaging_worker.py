"""One of the ranks started with RANK and WORLD_SIZE set, as deepspeed or torchrun would; run by
tests/parallel/test_messaging.py. With no argument (3 ranks), exits 0 after printing "rank R ok" when every
check holds. With "--die" (2 ranks), rank 1 sends rank 0 one message and dies without a goodbye, while rank 0
waits for a second one."""
import os
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

from megakv.parallel import state
from megakv.parallel.messaging import SocketComm, split, world_comm

env = state.init_distributed()
world = world_comm()
assert env.launcher == "env" and isinstance(world, SocketComm)
rank, size = world.Get_rank(), world.Get_size()
if sys.argv[1:] == ["--die"]:
    if rank == 1:
        world.send("first", dest=0, tag=1)
        os._exit(3)
    assert world.recv(source=1, tag=1) == "first"
    world.recv(source=1, tag=1)
    raise AssertionError("a receive from a dead rank returned")
others = [peer for peer in range(size) if peer != rank]

# Five messages to every other rank on tag 1, then one on tag 2: a receive matches the tag it asks for,
# and each sender's messages arrive in the order they were sent.
for dest in others:
    for number in range(5):
        assert world.isend((rank, number), dest=dest, tag=1).Test()
    world.send(("last", rank), dest=dest, tag=2)
assert sorted(world.recv(tag=2) for _ in others) == [("last", peer) for peer in others]
for source in reversed(others):
    assert [world.recv(source=source, tag=1) for _ in range(5)] == [(source, number) for number in range(5)]
assert not world.iprobe(tag=1) and not world.iprobe(tag=2)

assert world.gather(10 * rank, root=1) == ([0, 10, 20] if rank == 1 else None)

# Ranks 0 and 2 form a communicator ordered by descending key; rank 1 joins none. A message on it does not
# mix with one on the world that has the same source, destination and tag.
sub = split(world, None if rank == 1 else 7, -rank)
if rank == 1:
    assert sub is None
else:
    assert (sub.Get_size(), sub.Get_rank()) == (2, 0 if rank == 2 else 1)
    if rank == 2:
        world.send("on the world", dest=0, tag=3)
        sub.send("on the split", dest=1, tag=3)
    else:
        assert sub.recv(source=0, tag=3) == "on the split"
        assert world.recv(source=2, tag=3) == "on the world"

# A client without the job's key is refused, and the rank it knocked at keeps working.
if rank == 0:
    try:
        Client(world._node.peer_addresses[1], authkey=b"not the job's key")
    except AuthenticationError:
        pass
    else:
        raise AssertionError("a client with the wrong key was accepted")
    world.send("after the stranger", dest=1, tag=4)
elif rank == 1:
    assert world.recv(source=0, tag=4) == "after the stranger"
print(f"rank {rank} ok", flush=True)
