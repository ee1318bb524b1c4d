"""Reading /metrics back: megakv's samples only, summed by name and labels."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from megakv.bench.server_metrics import parse_samples, total


def test_parse_samples_keeps_megakv_metrics_and_total_sums_them_by_labels():
    registry = CollectorRegistry()
    free = Gauge("megakv:kv_blocks_free", "free blocks", ["instance"], registry=registry)
    free.labels("0").set(3)
    free.labels("1").set(5)
    Counter("megakv:request_success", "finished", ["finished_reason"], registry=registry).labels("stop").inc(2)
    Gauge("other_metric", "not megakv's", registry=registry).set(7)
    samples = parse_samples(generate_latest(registry).decode())
    assert {sample.name for sample in samples} == {"megakv:kv_blocks_free", "megakv:request_success_total",
                                                   "megakv:request_success_created"}
    assert total(samples, "megakv:kv_blocks_free") == 8
    assert total(samples, "megakv:kv_blocks_free", instance="1") == 5
    assert total(samples, "megakv:request_success_total", finished_reason="stop") == 2
    assert total(samples, "megakv:request_success_total", finished_reason="length") == 0
