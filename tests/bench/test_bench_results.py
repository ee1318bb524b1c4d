"""The load generator's figures: vLLM's definitions of throughput, TTFT, TPOT, ITL, E2EL and goodput."""
from __future__ import annotations

import pytest

from megakv.bench.client import RequestResult
from megakv.bench.results import format_table, parse_goodput, parse_percentiles, summarize


def results() -> list[RequestResult]:
    return [
        RequestResult(success=True, prompt_len=10, output_len=5, send_time=0.0, ttft=0.1, itl=[0.1] * 4, latency=0.5),
        RequestResult(success=True, prompt_len=20, output_len=1, send_time=0.5, ttft=0.3, latency=0.3),
        RequestResult(success=True, prompt_len=30, output_len=3, send_time=1.0, ttft=0.9, itl=[0.2, 0.4], latency=1.5),
        RequestResult(error="HTTP 400: too long", prompt_len=5000, send_time=1.5, latency=0.01),
    ]


def test_summarize_counts_failures_and_computes_vllm_figures():
    figures = summarize(results(), duration=2.0, slos={"ttft": 500, "tpot": 200}, percentiles=[50, 99])
    assert figures["completed"] == 3 and figures["failed"] == 1
    # Failed requests add no tokens.
    assert figures["total_input_tokens"] == 60 and figures["total_output_tokens"] == 9
    assert figures["request_throughput"] == 1.5 and figures["output_throughput"] == 4.5
    assert figures["total_token_throughput"] == 34.5
    assert figures["mean_ttft_ms"] == pytest.approx(433.333, abs=1e-3)
    assert figures["median_ttft_ms"] == pytest.approx(300) == figures["p50_ttft_ms"]
    # TPOT: (latency - ttft) / (tokens - 1), only for requests of two tokens or more: 100 and 300 ms.
    assert figures["mean_tpot_ms"] == pytest.approx(200)
    assert figures["mean_itl_ms"] == pytest.approx(1e3 * 1.0 / 6)
    assert figures["mean_e2el_ms"] == pytest.approx(766.667, abs=1e-3)
    # Goodput: the first two meet TTFT <= 500 ms and TPOT <= 200 ms (one token: no TPOT); the third does not.
    assert figures["request_goodput"] == 1.0
    assert figures["errors"] == ["", "", "", "HTTP 400: too long"] and len(figures["ttfts"]) == 4


def test_summarize_without_goodput_or_successes():
    figures = summarize([RequestResult(error="HTTP 500: boom")], 1.0, {}, [99])
    assert figures["request_goodput"] is None and figures["completed"] == 0 and figures["failed"] == 1
    assert figures["mean_ttft_ms"] == 0.0 and figures["p99_e2el_ms"] == 0.0
    assert "Failed requests:                        1" in format_table(figures, [99])


def test_parse_goodput_and_percentiles():
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:1000"]) == {"ttft": 500.0, "tpot": 50.5, "e2el": 1000.0}
    assert parse_goodput(None) == {}
    for bad in ("ttft", "latency:5", "tpot:-1", "tpot:fast"):
        with pytest.raises(ValueError, match=f"--goodput '{bad}'"):
            parse_goodput([bad])
    assert parse_percentiles("50,99.9") == [50.0, 99.9]
    with pytest.raises(ValueError, match="--metric-percentiles"):
        parse_percentiles("0,50")
