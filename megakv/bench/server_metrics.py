"""A megakv server's /metrics read back: what the benchmark harness, the quickstart and the tests check."""
from __future__ import annotations

from typing import NamedTuple

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Sample(NamedTuple):
    """One sample of a megakv: metric."""

    name: str
    labels: dict[str, str]
    value: float


def parse_samples(text: str) -> list[Sample]:
    """The megakv: samples of a Prometheus text exposition."""
    return [Sample(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text) if family.name.startswith("megakv:")
            for sample in family.samples]


def scrape(url: str, timeout: float = 30) -> list[Sample]:
    """The megakv: samples of the server at ``url`` (its base URL) now; httpx.HTTPError if it does not answer."""
    response = httpx.get(f"{url}/metrics", timeout=timeout)
    response.raise_for_status()
    return parse_samples(response.text)


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` (with ``_total`` for a counter) whose labels include ``labels``."""
    return sum(sample.value for sample in samples
               if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()))
