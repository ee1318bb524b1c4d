"""Prometheus metrics: vLLM's names under a ``megakv:`` prefix, labelled per instance, and DistKV's own.

Request metrics (tokens, finishes, latencies) are recorded as outputs reach the
server. Queue and pool gauges and the cluster's counters are read from the
engine's stats (megakv.engine.stats) at each scrape.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from megakv.engine.request import RequestOutput
from megakv.engine.stats import EngineStats

# vLLM's buckets for these histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
LABELS = ("model_name", "instance")


class EngineStatsCollector:
    """Yields the gauges and counters of the last engine stats snapshot (set before each scrape)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.snapshot: EngineStats | None = None

    def collect(self):
        """The metric families of the snapshot (prometheus-client's collector protocol)."""
        if self.snapshot is None:
            return
        per_instance = {
            "num_requests_running": (GaugeMetricFamily, "Requests in the running batch", "num_running"),
            "num_requests_waiting": (GaugeMetricFamily, "Requests waiting to be scheduled", "num_waiting"),
            "kv_blocks_total": (GaugeMetricFamily, "rBlocks of the instance's KV pool", "num_blocks"),
            "kv_blocks_free": (GaugeMetricFamily, "Free rBlocks of the instance's KV pool", "num_free_blocks"),
            "kv_blocks_lent": (GaugeMetricFamily, "rBlocks of this pool held by other instances' requests",
                               "num_lent_blocks"),
            "kv_blocks_borrowed": (GaugeMetricFamily, "rBlocks this instance's requests hold on other instances",
                                   "num_borrowed_blocks"),
            "num_preemptions": (CounterMetricFamily, "Requests preempted (blocks freed, prompt recomputed later)",
                                "num_preemptions"),
            "remote_micro_attentions": (CounterMetricFamily, "Micro-attentions this instance's steps asked of other "
                                        "instances: one per request chunk and creditor instance in a step, all "
                                        "layers together", "num_remote_micro_attentions"),
            "num_recalled": (CounterMetricFamily, "Requests of this instance preempted because the instance that "
                             "lent them blocks recalled them for a request of its own", "num_recalled"),
            "kv_blocks_cached": (GaugeMetricFamily, "rBlocks whose content the instance's prefix cache holds (in use "
                                 "or free; of its pool, or borrowed)", "num_cached_blocks"),
            "prefix_cache_queries": (CounterMetricFamily, "Prompt tokens looked up in the prefix cache",
                                     "num_prefix_cache_queries"),
            "prefix_cache_hits": (CounterMetricFamily, "Prompt tokens whose KV the prefix cache gave",
                                  "num_prefix_cache_hits"),
        }
        for name, (family_class, documentation, attribute) in per_instance.items():
            family = family_class(f"megakv:{name}", documentation, labels=LABELS)
            for instance in self.snapshot.instances:
                family.add_metric([self.model_name, str(instance.instance_id)], getattr(instance, attribute))
            yield family
        usage = GaugeMetricFamily("megakv:kv_cache_usage_perc", "KV-cache usage of the instance's pool: 1 means "
                                  "100 percent", labels=LABELS)
        for instance in self.snapshot.instances:
            used = instance.num_blocks - instance.num_free_blocks
            usage.add_metric([self.model_name, str(instance.instance_id)], used / max(instance.num_blocks, 1))
        yield usage
        cluster = [("borrow_events", "Grants of borrowed rBlocks by the gManager", self.snapshot.num_borrow_events),
                   ("blocks_borrowed", "rBlocks borrowed across instances", self.snapshot.num_blocks_borrowed),
                   ("dgfm_blocks_moved", "rBlocks moved home by DGFM", self.snapshot.num_blocks_moved),
                   ("dgfm_blocks_swapped", "rBlocks moved home by DGFM swaps (counted in dgfm_blocks_moved too)",
                    self.snapshot.num_blocks_swapped),
                   ("instance_failures", "Instances declared failed (dead, hung or cut off): the cluster goes on "
                    "without them", len(self.snapshot.failed_instances)),
                   ("requests_recomputed", "Requests run again on another instance because theirs failed",
                    self.snapshot.num_requests_recomputed)]
        for name, documentation, value in cluster:
            family = CounterMetricFamily(f"megakv:{name}", documentation, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        outstanding = GaugeMetricFamily("megakv:ledger_outstanding_blocks", "rBlocks owed in the gManager's ledger",
                                        labels=["model_name"])
        outstanding.add_metric([self.model_name], sum(self.snapshot.ledger_outstanding.values()))
        yield outstanding
        kept = GaugeMetricFamily("megakv:ledger_kept_blocks", "rBlocks owed in the gManager's ledger that a debtor "
                                 "keeps for their cached prefix, no request holding them (given back on demand)",
                                 labels=["model_name"])
        kept.add_metric([self.model_name], sum(self.snapshot.ledger_kept.values()))
        yield kept


class ServerMetrics:
    """The server's registry: request metrics recorded live, engine stats read at scrape time."""

    def __init__(self, model_name: str) -> None:
        # As vLLM: no "_created" series beside each counter and histogram (a process-wide setting).
        disable_created_metrics()
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.engine_stats = EngineStatsCollector(model_name)
        self.registry.register(self.engine_stats)
        self.prompt_tokens = Counter("megakv:prompt_tokens", "Prefilled prompt tokens", LABELS,
                                     registry=self.registry)
        self.generation_tokens = Counter("megakv:generation_tokens", "Generated tokens", LABELS,
                                         registry=self.registry)
        self.request_success = Counter("megakv:request_success", "Finished requests by finish reason",
                                       (*LABELS, "finished_reason"), registry=self.registry)
        self.time_to_first_token = Histogram("megakv:time_to_first_token_seconds", "Time to the first token",
                                             LABELS, buckets=TTFT_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("megakv:inter_token_latency_seconds", "Time between output tokens",
                                             LABELS, buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram("megakv:e2e_request_latency_seconds", "Time from arrival to finish",
                                             LABELS, buckets=E2E_BUCKETS, registry=self.registry)

    def track(self) -> RequestTracker:
        """Start timing a request that arrives now."""
        return RequestTracker(self)


class RequestTracker:
    """Records one request's tokens and latencies as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._arrival = self._last_token = time.perf_counter()
        self._labels: tuple[str, str] | None = None

    def on_output(self, output: RequestOutput) -> None:
        """Count the output's new tokens and time them."""
        now = time.perf_counter()
        if not output.new_token_ids:
            return
        metrics = self._metrics
        if self._labels is None:
            self._labels = (metrics.model_name, str(output.instance))
            metrics.prompt_tokens.labels(*self._labels).inc(len(output.prompt_ids))
            metrics.time_to_first_token.labels(*self._labels).observe(now - self._arrival)
        else:
            interval = (now - self._last_token) / len(output.new_token_ids)
            for _ in output.new_token_ids:
                metrics.inter_token_latency.labels(*self._labels).observe(interval)
        self._last_token = now
        metrics.generation_tokens.labels(*self._labels).inc(len(output.new_token_ids))

    def finish(self, reason: str, instance: int | None) -> None:
        """Record the request's end and why."""
        # A request that ended before its first token may not know its instance.
        labels = self._labels or (self._metrics.model_name, "" if instance is None else str(instance))
        self._metrics.request_success.labels(*labels, reason).inc()
        self._metrics.e2e_request_latency.labels(*labels).observe(time.perf_counter() - self._arrival)
