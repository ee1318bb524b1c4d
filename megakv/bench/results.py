"""A serving benchmark's figures from its requests, named and computed as ``vllm bench serve`` does.

TTFT is the time to the first token; TPOT the time per output token after the first,
(latency - TTFT) / (output tokens - 1), for requests of more than one token; ITL each gap
between token events; E2EL the whole request. Throughputs count successful requests only,
over the whole benchmark's duration. Goodput is the rate of successful requests that met
every service-level objective given with ``--goodput``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from megakv.bench.client import RequestResult

# --goodput keys -> what each bounds, in milliseconds.
GOODPUT_METRICS = {"ttft": "time to first token", "tpot": "time per output token", "e2el": "end-to-end latency"}
# Metric key -> the title of its block in the printed table.
LATENCY_METRICS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                   "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> {"ttft": 500.0, "tpot": 50.0}; ValueError naming the bad item."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in GOODPUT_METRICS:
            raise ValueError(f"--goodput {item!r}: the metric must be one of {', '.join(GOODPUT_METRICS)} "
                             f"(as ttft:MS)")
        try:
            slos[key] = float(value)
        except ValueError:
            slos[key] = -1.0
        if not slos[key] >= 0:
            raise ValueError(f"--goodput {item!r}: the bound must be a number of milliseconds >= 0")
    return slos


def parse_percentiles(text: str) -> list[float]:
    """``"50,90,99"`` -> [50.0, 90.0, 99.0]; ValueError naming --metric-percentiles."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < value <= 100 for value in values):
        raise ValueError(f"--metric-percentiles must be comma-separated numbers in (0, 100], got {text!r}")
    return values


def _tpot(result: RequestResult) -> float | None:
    return (result.latency - result.ttft) / (result.output_len - 1) if result.output_len > 1 else None


def _meets(result: RequestResult, slos: dict[str, float]) -> bool:
    measured = {"ttft": result.ttft, "tpot": _tpot(result) or 0.0, "e2el": result.latency}
    return all(measured[key] * 1e3 <= bound for key, bound in slos.items())


def _percentile_key(percentile: float) -> str:
    return f"p{percentile:g}"


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float],
              percentiles: list[float]) -> dict[str, Any]:
    """The benchmark's figures (vLLM's keys) and its per-request lists, from every request sent."""
    done = [result for result in results if result.success]
    total_input = sum(result.prompt_len or 0 for result in done)
    total_output = sum(result.output_len for result in done)
    figures: dict[str, Any] = {
        "duration": duration, "completed": len(done), "failed": len(results) - len(done),
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "request_goodput": sum(_meets(result, slos) for result in done) / duration if slos else None,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    samples = {"ttft": [result.ttft for result in done],
               "tpot": [tpot for tpot in map(_tpot, done) if tpot is not None],
               "itl": [gap for result in done for gap in result.itl],
               "e2el": [result.latency for result in done]}
    for metric, values in samples.items():
        values_ms = np.asarray(values, dtype=float) * 1e3 if values else np.zeros(1)
        figures[f"mean_{metric}_ms"] = float(values_ms.mean())
        figures[f"median_{metric}_ms"] = float(np.median(values_ms))
        figures[f"std_{metric}_ms"] = float(values_ms.std())
        for percentile in percentiles:
            figures[f"{_percentile_key(percentile)}_{metric}_ms"] = float(np.percentile(values_ms, percentile))
    figures.update({
        "input_lens": [result.prompt_len for result in results],
        "output_lens": [result.output_len for result in results],
        "send_times": [result.send_time for result in results],
        "ttfts": [result.ttft for result in results],
        "itls": [result.itl for result in results],
        "e2els": [result.latency for result in results],
        "errors": [result.error for result in results],
    })
    return figures


def format_table(figures: dict[str, Any], percentiles: list[float]) -> str:
    """The figures as vLLM prints them."""
    rows = [("Successful requests:", figures["completed"]), ("Failed requests:", figures["failed"]),
            ("Benchmark duration (s):", figures["duration"]),
            ("Total input tokens:", figures["total_input_tokens"]),
            ("Total generated tokens:", figures["total_output_tokens"]),
            ("Request throughput (req/s):", figures["request_throughput"])]
    if figures["request_goodput"] is not None:
        rows.append(("Request goodput (req/s):", figures["request_goodput"]))
    rows += [("Output token throughput (tok/s):", figures["output_throughput"]),
             ("Total token throughput (tok/s):", figures["total_token_throughput"])]
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}"
              for label, value in rows]
    for metric, title in LATENCY_METRICS.items():
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        name = metric.upper()
        lines.append(f"{'Mean ' + name + ' (ms):':<40}{figures[f'mean_{metric}_ms']:<10.2f}")
        lines.append(f"{'Median ' + name + ' (ms):':<40}{figures[f'median_{metric}_ms']:<10.2f}")
        for percentile in percentiles:
            key = _percentile_key(percentile)
            lines.append(f"{key.upper() + ' ' + name + ' (ms):':<40}{figures[f'{key}_{metric}_ms']:<10.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)
