"""The DistKV data plane's links: real processes under mpirun, on Unix sockets and on TCP."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from megakv.parallel.kv_links import receive_into, send_all

WORKER = Path(__file__).with_name("kv_links_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("mode,family", [("unix", "AF_UNIX"), ("tcp", "AF_INET")])
def test_kv_links_carry_small_and_large_requests_between_every_pair_of_instances(run_mpi, mode, family):
    proc = run_mpi(3, [sys.executable, str(WORKER), mode], timeout=120)
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank")) == [
        f"rank {rank} ok {family}" for rank in range(3)]


def test_a_link_that_ends_mid_exchange_names_the_peer():
    ours, theirs = socket.socketpair()
    send_all(theirs, [b"half"])
    theirs.close()
    with pytest.raises(ConnectionError, match="the DistKV link with instance 2 closed mid-exchange"):
        receive_into(ours, bytearray(8), "instance 2")
    ours.close()
