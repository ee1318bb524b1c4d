"""ClusterAdmission: only a request that its own pool cannot hold borrows, to be admitted or to grow."""
from __future__ import annotations

from megakv.config import SchedulerConfig
from megakv.distkv.policy import ClusterAdmission
from megakv.engine.request import Request, RequestStatus
from megakv.engine.sampling import SamplingParams
from megakv.engine.scheduler import Scheduler
from megakv.kvcache.block_pool import BlockPool
from megakv.kvcache.rmanager import PENDING, RManager

BLOCK_SIZE = 4
POOL_BLOCKS = 8


def instance(borrowable: int = 16) -> Scheduler:
    """One cluster instance's scheduler whose pool holds 8 blocks, the others able to lend ``borrowable``."""
    rmanager = RManager(0, BlockPool(POOL_BLOCKS), BLOCK_SIZE)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=512), rmanager, ClusterAdmission(rmanager, borrowable))


def request(name: str, num_tokens: int) -> Request:
    return Request(name, list(range(num_tokens)), SamplingParams(max_new_tokens=4))


def admitted(scheduler: Scheduler) -> list[str]:
    return [chunk.request.request_id for chunk in scheduler.schedule().chunks]


def test_a_request_that_fits_the_pool_waits_for_local_room_instead_of_borrowing():
    scheduler = instance()
    scheduler.add(request("first", 6 * BLOCK_SIZE))
    scheduler.add(request("second", 4 * BLOCK_SIZE))
    # 6 of 8 blocks go to the first; the second would need 2 more than the pool has free.
    assert admitted(scheduler) == ["first"]
    assert scheduler.rmanager.num_pending_blocks == 0
    assert [r.request_id for r in scheduler.waiting] == ["second"]
    scheduler.finish(scheduler.running[0], RequestStatus.FINISHED_STOPPED)
    assert "second" in admitted(scheduler)
    assert scheduler.rmanager.num_pending_blocks == 0


def test_a_request_longer_than_the_pool_is_admitted_on_borrowed_blocks():
    scheduler = instance()
    scheduler.add(request("long", 12 * BLOCK_SIZE))
    assert admitted(scheduler) == ["long"]
    table = scheduler.rmanager.block_table("long")
    assert table.count(PENDING) == 4 and len(table) == 12


def decoded(request: Request) -> None:
    """As if the step computed every token of the request and sampled one more."""
    request.num_computed_tokens = request.num_tokens
    request.output_ids.append(0)


def test_a_running_request_that_outgrows_the_pool_borrows_to_grow():
    scheduler = instance()
    scheduler.add(request("grows", POOL_BLOCKS * BLOCK_SIZE))
    assert admitted(scheduler) == ["grows"]
    decoded(scheduler.running[0])
    assert admitted(scheduler) == ["grows"]
    assert scheduler.rmanager.num_pending_blocks == 1 and scheduler.num_preemptions == 0


def test_a_running_request_that_fits_the_pool_preempts_rather_than_borrows():
    scheduler = instance()
    scheduler.add(request("first", 4 * BLOCK_SIZE))
    scheduler.add(request("second", 4 * BLOCK_SIZE))
    assert admitted(scheduler) == ["first", "second"]
    first = scheduler.running[0]
    decoded(first)
    decoded(scheduler.running[1])
    # The pool is full: the first request's fifth block comes from preempting the later one, as on an
    # independent instance.
    assert admitted(scheduler) == ["first"]
    assert scheduler.num_preemptions == 1 and scheduler.rmanager.num_pending_blocks == 0
    assert len(scheduler.rmanager.block_table("first")) == 5


def test_a_request_whose_turn_it_is_may_borrow():
    scheduler = instance()
    scheduler.add(request("holder", 6 * BLOCK_SIZE))
    assert admitted(scheduler) == ["holder"]
    scheduler.admission.give_turn("turn")
    scheduler.add(request("turn", 4 * BLOCK_SIZE))
    assert admitted(scheduler) == ["holder", "turn"]
    assert scheduler.rmanager.block_table("turn").count(PENDING) == 2
