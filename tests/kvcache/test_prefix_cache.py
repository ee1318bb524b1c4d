"""Prefix caching: block hashes chain every token before a block; the pool shares cached blocks, keeps them while
free and gives them up only when no other block is free, least recently released first; a random run of admissions, steps, finishes, aborts,
preemptions, loans and returns never gives a request a block whose content differs from its own tokens' and
leaves every block free; an engine with the cache gives the tokens of one without it."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.request import Request, RequestStatus
from megakv.engine.sampling import SamplingParams
from megakv.engine.scheduler import LocalAdmission, Scheduler
from megakv.kvcache.block_pool import BlockPool
from megakv.kvcache.prefix_cache import extend_block_hashes
from megakv.kvcache.rmanager import PENDING, RManager

BLOCK_SIZE = 4


def hashes_of(token_ids: list[int], salt: str | None = None) -> list[bytes]:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids, len(token_ids), BLOCK_SIZE, salt)
    return hashes


def test_block_hashes_cover_every_earlier_token_and_the_salt():
    tokens = list(range(12))
    base = hashes_of(tokens)
    assert len(base) == 3 and hashes_of(tokens + [99]) == base
    changed = hashes_of([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12])
    assert changed[:2] == base[:2] and changed[2] != base[2]
    early = hashes_of([1] + tokens[1:])
    assert all(a != b for a, b in zip(early, base))
    assert all(a != b for a, b in zip(hashes_of(tokens, "tenant"), base))
    incremental = hashes_of(tokens[:5])
    extend_block_hashes(incremental, tokens, 12, BLOCK_SIZE, None)
    assert incremental == base


def test_pool_shares_cached_blocks_keeps_them_while_free_and_gives_them_up_last():
    pool = BlockPool(6)
    first = pool.allocate(3)
    hashes = hashes_of(list(range(12)))
    for block_id, block_hash in zip(first, hashes):
        pool.cache(block_id, block_hash)
    pool.free(list(reversed(first)))
    assert pool.num_free_blocks == 6 and pool.num_cached_blocks == 3
    assert pool.cached_prefix(hashes) == first and pool.cached_prefix(hashes_of([9] * 4) + hashes) == []
    pool.share(first[:2])
    pool.share(first[:1])
    assert pool.num_free_blocks == 4 and not pool.is_free(first[0])
    # The three never-cached blocks go first, then the cached ones, least recently released first.
    taken = pool.allocate(4)
    assert taken[:3] == [3, 4, 5] and taken[3] == first[2]
    assert pool.cached_prefix(hashes) == first[:2] and pool.num_cached_blocks == 2
    pool.free(first[:1])
    pool.free(first[:2])
    pool.free(taken)
    assert pool.num_free_blocks == 6
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free(first[:1])


def test_a_block_whose_copy_failed_leaves_the_cache():
    """DGFM pulls a cached block home under its hash before its KV is copied; if the copy fails, the block holds
    nothing: uncache drops the hash, held or free, and a free one counts as a block without content."""
    pool = BlockPool(3)
    held, free = pool.allocate(2)
    first, second = hashes_of(list(range(8)))
    pool.cache(held, first)
    pool.cache(free, second)
    pool.free([free])
    assert pool.num_fresh_blocks == 1 and pool.cached_prefix([first, second]) == [held, free]
    pool.uncache({held, free})
    assert pool.cached_prefix([first]) == [] and pool.num_cached_blocks == 0 and pool.num_fresh_blocks == 2
    pool.free([held])
    assert pool.allocate(3) == [2, free, held]


def test_pool_takes_blocks_without_content_before_cached_ones():
    pool = BlockPool(3)
    cached, plain = pool.allocate(2)
    pool.cache(cached, hashes_of([1, 2, 3, 4])[0])
    pool.free([cached])
    pool.free([plain])
    # Released later, the block without content still goes first; the cached one only when nothing else is free.
    assert pool.allocate(2) == [2, plain]
    assert pool.cached_prefix(hashes_of([1, 2, 3, 4])) == [cached]
    assert pool.allocate(1) == [cached] and pool.num_cached_blocks == 0


class Shadow:
    """What each block of the pool holds, as the requests that computed it wrote it: the hash of the tokens."""

    def __init__(self) -> None:
        self.content: dict[int, bytes] = {}
        self.written: dict[str, int] = {}

    def check_and_write(self, rmanager: RManager, request: Request, chunk_start: int) -> None:
        """Blocks the request reused must hold its own tokens' content; those it computed now hold it. The first
        chunk after an admission starts where the cached prefix it was given ends."""
        expected = hashes_of(request.token_ids[:request.num_computed_tokens])
        table = rmanager.block_table(request.request_id)
        first_written = self.written.setdefault(request.request_id, chunk_start // BLOCK_SIZE)
        for index, block_hash in enumerate(expected):
            ref = table[index]
            if ref.instance_id != rmanager.instance_id:
                continue
            if index < first_written:
                assert self.content.get(ref.block_id) == block_hash, "a reused block holds other tokens"
            else:
                self.content[ref.block_id] = block_hash


@pytest.mark.parametrize("seed", range(12))
def test_random_runs_share_only_right_content_and_leave_every_block_free(seed):
    rng = random.Random(seed)
    pool = BlockPool(24)
    rmanager = RManager(0, pool, BLOCK_SIZE)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), rmanager, LocalAdmission(),
                          prefix_caching=True)
    shadow = Shadow()
    preempt = scheduler.preempt

    def preempt_and_forget(request: Request) -> None:
        # A preempted request computes its blocks anew (or reuses cached ones) when it is admitted again.
        shadow.written.pop(request.request_id, None)
        preempt(request)

    scheduler.preempt = preempt_and_forget
    documents = [[rng.randrange(50) for _ in range(rng.randrange(4, 30))] for _ in range(3)]
    lent: list[int] = []
    for step in range(300):
        if rng.random() < 0.3 and len(scheduler.waiting) < 6:
            prompt = rng.choice(documents)[:rng.randrange(1, 31)] + [rng.randrange(50) for _ in range(rng.randrange(3))]
            salt = rng.choice([None, None, "b"])
            scheduler.add(Request(f"r{step}", prompt or [1], SamplingParams(max_new_tokens=rng.randrange(1, 9),
                                                                          cache_salt=salt)))
        if rng.random() < 0.1 and rmanager.num_lendable_blocks:
            lent += rmanager.lend(1, rng.randrange(1, rmanager.num_lendable_blocks + 1))
        if lent and rng.random() < 0.1:
            returned, lent = lent[:rng.randrange(1, len(lent) + 1)], lent
            lent = lent[len(returned):]
            rmanager.take_back(1, returned)
        scheduled = scheduler.schedule()
        for chunk in scheduled.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            scheduler.cache_computed_blocks(request)
            shadow.check_and_write(rmanager, request, chunk.start)
            if chunk.samples_next_token:
                request.output_ids.append(rng.randrange(50))
                if len(request.output_ids) >= request.params.max_new_tokens:
                    scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
                    shadow.written.pop(request.request_id)
        if scheduler.running and rng.random() < 0.1:
            victim = rng.choice(scheduler.running)
            if rng.random() < 0.5:
                scheduler.preempt(victim)
            else:
                scheduler.abort(victim.request_id)
                shadow.written.pop(victim.request_id)
        holders = Counter(ref.block_id for request_id in rmanager.request_ids
                          for ref in rmanager.block_table(request_id) if ref != PENDING)
        holders.update(lent)
        assert all(pool._ref_counts[block_id] == holders[block_id] for block_id in range(pool.num_blocks))
        assert pool.num_free_blocks == sum(1 for block_id in range(pool.num_blocks) if not holders[block_id])
    for request in scheduler.unfinished():
        scheduler.abort(request.request_id)
    rmanager.take_back(1, lent)
    assert pool.num_free_blocks == pool.num_blocks and not any(pool._ref_counts)
    assert scheduler.num_prefix_cache_hits > 0


def engine_for(checkpoint, prefix_caching: bool, num_blocks: int = 64, max_num_seqs: int = 8) -> LLMEngine:
    return LLMEngine(read_checkpoint_info(checkpoint),
                     EngineConfig(cache=CacheConfig(block_size=16, num_blocks=num_blocks,
                                                    enable_prefix_caching=prefix_caching),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=max_num_seqs)))


def test_cached_prefixes_of_every_length_give_the_uncached_tokens(megakv_checkpoint):
    checkpoint = megakv_checkpoint("gqa", 1)
    cached, uncached = engine_for(checkpoint, True), engine_for(checkpoint, False)
    document = [(7 * index) % 251 + 1 for index in range(48)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert cached.generate([document], [params])[0].token_ids == uncached.generate([document], [params])[0].token_ids
    for shared in (15, 16, 17, 31, 32, 33, 47, 48):
        prompt = document[:shared] + [200, 201, 202][:3 if shared < 48 else 0]
        [hit] = cached.generate([prompt], [params])
        [reference] = uncached.generate([prompt], [params])
        assert hit.token_ids == reference.token_ids, shared
        # Whole blocks of the shared prefix are reused, leaving at least the prompt's last token to compute.
        assert hit.num_cached_tokens == min(shared, len(prompt) - 1) // 16 * 16, shared
    assert cached.rmanager.num_free_blocks == 64 and not any(cached.rmanager.pool._ref_counts)


def test_shared_prefix_under_preemption_and_abort_leaves_no_block_held(megakv_checkpoint):
    checkpoint = megakv_checkpoint("gqa", 1)
    # 12 blocks of 16 tokens for four requests of 40 shared + 8 own prompt tokens and 40 new ones: preemptions.
    cached, uncached = engine_for(checkpoint, True, num_blocks=12), engine_for(checkpoint, False, num_blocks=12)
    prefix = [(5 * index) % 240 + 3 for index in range(40)]
    prompts = [prefix + [10 + request] * 8 for request in range(4)]
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True)] * 4
    expected = [output.token_ids for output in uncached.generate(prompts, params)]
    request_ids = [cached.add_request(prompt, param) for prompt, param in zip(prompts, params)]
    finished, steps = {}, 0
    while cached.has_unfinished():
        for output in cached.step():
            if output.finished:
                finished[output.request_id] = output
        steps += 1
        if steps == 6:
            cached.abort(request_ids[2])
    assert cached.core.scheduler.num_preemptions > 0 and cached.core.scheduler.num_prefix_cache_hits > 0
    assert finished[request_ids[2]].finish_reason == "abort"
    assert [finished[request_ids[index]].token_ids for index in (0, 1, 3)] == [expected[0], expected[1], expected[3]]
    assert cached.rmanager.num_free_blocks == 12 and not any(cached.rmanager.pool._ref_counts)
