"""Prefix caching on a cluster: the front's directory remembers where each prompt block went, follow-up
questions about a document go to the instance that holds it and skip its prefill, and a cluster with the cache
gives the tokens of one without it."""
from __future__ import annotations

import pytest
from settled import assert_settled

from megakv.distkv.prefix_routing import MAX_EXTRA_LOAD, PrefixDirectory, prefix_holder

from test_cluster import random_prompt, run_cluster


def test_directory_finds_the_longest_run_on_one_instance_and_forgets_the_oldest():
    directory = PrefixDirectory(capacity=5)
    directory.record([b"a", b"b", b"c"], 1)
    directory.record([b"a", b"x"], 2)
    assert directory.longest_prefix([b"a", b"b", b"c"]) == (2, 1)
    directory.record([b"a", b"b", b"c"], 1)
    assert directory.longest_prefix([b"a", b"b", b"c", b"d"]) == (1, 3)
    assert directory.longest_prefix([b"z", b"a"]) == (None, 0) and directory.longest_prefix([]) == (None, 0)
    directory.record([b"d", b"e"], 0)
    assert len(directory) == 5 and directory.longest_prefix([b"x"]) == (None, 0)


def test_holder_serves_when_it_holds_half_the_prompt_and_is_not_much_busier():
    directory = PrefixDirectory(capacity=100)
    directory.record([b"a", b"b", b"c", b"d"], 2)
    assert prefix_holder(directory, [b"a", b"b", b"x", b"y"], [0, 0, 3]) == 2
    assert prefix_holder(directory, [b"a", b"x", b"y", b"z"], [0, 0, 0]) is None
    assert prefix_holder(directory, [b"a", b"b"], [1, 1, 1 + MAX_EXTRA_LOAD]) == 2
    assert prefix_holder(directory, [b"a", b"b"], [1, 1, 2 + MAX_EXTRA_LOAD]) is None
    assert prefix_holder(directory, [b"q"], [0, 0, 0]) is None


@pytest.mark.slow
@pytest.mark.mpi
def test_cluster_follow_ups_reuse_their_document_and_keep_the_uncached_tokens(megakv_checkpoint, run_mpi, tmp_path):
    checkpoint = megakv_checkpoint("gqa", 1)
    documents = [random_prompt(70, seed) for seed in (1, 2, 3)]
    # A question about each document, then a follow-up about each: the follow-ups share the first one's blocks.
    records = [{"prompt_ids": document + [5, 6, 7], "max_new_tokens": 8} for document in documents]
    records += [{"prompt_ids": document + [9, 10], "max_new_tokens": 8} for document in documents]
    flags = ("--max-num-seqs", "1")
    cached, report, _ = run_cluster(run_mpi, tmp_path, checkpoint, 1, 3, records, *flags, pool_blocks=24)
    uncached, _, _ = run_cluster(run_mpi, tmp_path, checkpoint, 1, 3, records, *flags, "--no-enable-prefix-caching",
                                 pool_blocks=24)
    assert [record["token_ids"] for record in cached] == [record["token_ids"] for record in uncached]
    # Each document went to its own instance, and its follow-up after it, skipping its 4 full blocks.
    assert sorted(record["instance"] for record in cached[:3]) == [0, 1, 2]
    assert [record["instance"] for record in cached[3:]] == [record["instance"] for record in cached[:3]]
    assert [record["num_cached_tokens"] for record in cached] == [0, 0, 0, 64, 64, 64]
    assert all(record["num_cached_tokens"] == 0 for record in uncached)
    assert_settled(report)


@pytest.mark.slow
@pytest.mark.mpi
def test_follow_ups_attend_to_their_document_on_three_instances_without_computing_it(megakv_checkpoint, run_mpi,
                                                                                     tmp_path):
    """A document of 21 blocks on pools of 8: its first question borrows from both other instances. The blocks
    it borrowed stay on loan, cached, when it ends; a follow-up reuses all 20 full blocks where they are (8 at
    home, 12 lent) and computes only its own tokens. Then prompts sharing the document up to lengths around
    block boundaries, near home and among the borrowed blocks: every answer is the uncached cluster's. All run on
    instance 0, one at a time: a request on a lender would take its kept loans back for room of its own."""
    checkpoint = megakv_checkpoint("gqa", 1)
    document = random_prompt(330, 4)
    shared = [330, 319, 320, 321, 127, 128, 129, 15, 16, 17]
    records = [{"prompt_ids": document + [5, 6, 7], "max_new_tokens": 8, "instance": 0}]
    records += [{"prompt_ids": document[:length] + [9, 10], "max_new_tokens": 8, "instance": 0} for length in shared]
    flags = ("--max-num-seqs", "1")
    cached, report, _ = run_cluster(run_mpi, tmp_path, checkpoint, 1, 3, records, *flags, pool_blocks=8)
    uncached, _, _ = run_cluster(run_mpi, tmp_path, checkpoint, 1, 3, records, *flags, "--no-enable-prefix-caching",
                                 pool_blocks=8)
    assert [record["token_ids"] for record in cached] == [record["token_ids"] for record in uncached]
    first, follow_up, *others = cached
    assert first["block_instances"] == [0, 1, 2] and first["num_cached_tokens"] == 0
    assert follow_up["block_instances"] == [0, 1, 2]
    assert follow_up["num_cached_tokens"] == 320
    # The others reuse whole blocks of the document, at most its blocks before their last token (growth may have
    # taken some of the cached ones since: least recently released first, as vLLM's pool).
    for length, record in zip(shared[1:], others):
        assert record["num_cached_tokens"] % 16 == 0 and record["num_cached_tokens"] <= length // 16 * 16
    assert any(record["num_cached_tokens"] > 8 * 16 for record in others), "no other prompt reused a borrowed block"
    assert all(record["num_cached_tokens"] == 0 for record in uncached)
    assert_settled(report)
    assert report["ledger_kept"], "the borrowed blocks of the document went back"
