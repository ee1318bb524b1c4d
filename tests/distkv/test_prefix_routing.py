"""Prefix caching on a cluster: the front's directory remembers where each prompt block went, follow-up
questions about a document go to the instance that holds it and skip its prefill, and a cluster with the cache
gives the tokens of one without it."""
from __future__ import annotations

import pytest

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
    assert report["ledger_outstanding"] == {}
