"""The flags of ``megakv bench serve``, spelled as ``vllm bench serve`` spells them where it has them."""
from __future__ import annotations

import argparse

DATASETS = ("random", "documents", "sharegpt", "jsonl")
ENDPOINTS = ("completions", "chat")
# vLLM's random-dataset lengths, used when neither the length nor a distribution is given.
DEFAULT_RANDOM_INPUT_LEN = 1024
DEFAULT_RANDOM_OUTPUT_LEN = 128


def add_bench_serve_options(parser: argparse.ArgumentParser) -> None:
    """Server, workload, arrival, sampling and output flags of the load generator."""
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="the server's address, without /v1 (default http://127.0.0.1:8000)")
    server.add_argument("--model", help="model name in requests (default: the first entry of /v1/models)")
    server.add_argument("--endpoint", choices=ENDPOINTS, default="completions",
                        help="/v1/completions or /v1/chat/completions (default completions)")
    server.add_argument("--request-timeout", type=float, default=3600.0,
                        help="seconds a request may wait for the server's next bytes before it counts as failed "
                             "(default 3600)")
    data = parser.add_argument_group("workload")
    data.add_argument("--dataset", "--dataset-name", dest="dataset", choices=DATASETS, default="random",
                      help="random token ids, questions about random documents (their prompts share the "
                           "document: a prefix-caching workload), a ShareGPT JSON file, or a JSONL file of prompts "
                           "(default random)")
    data.add_argument("--dataset-path", help="the ShareGPT or JSONL file")
    data.add_argument("--num-prompts", type=int, default=1000, help="requests to send (default 1000)")
    data.add_argument("--random-input-len", type=int,
                      help=f"random dataset: prompt tokens (default {DEFAULT_RANDOM_INPUT_LEN}), spread by "
                           f"--random-range-ratio")
    data.add_argument("--random-output-len", type=int,
                      help=f"random and documents datasets: max_tokens of each request "
                           f"(default {DEFAULT_RANDOM_OUTPUT_LEN}), spread by --random-range-ratio")
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="random dataset: lengths uniform over len * [1 - r, 1 + r] (default 0: fixed)")
    data.add_argument("--input-len-dist", help="random dataset: prompt lengths as fixed:N, uniform:LO:HI, or "
                                               "longtail:LO:HI:LONG_LO:LONG_HI:FRACTION (that share of the requests "
                                               "uniform over LONG_LO..LONG_HI, the rest over LO..HI); instead "
                                               "of --random-input-len")
    data.add_argument("--output-len-dist", help="random and documents datasets: max_tokens as --input-len-dist; "
                                                "instead of --random-output-len")
    data.add_argument("--document-len-dist", default="uniform:2500:4000",
                      help="documents dataset: document lengths, as --input-len-dist (default uniform:2500:4000)")
    data.add_argument("--questions-per-document", type=int, default=10,
                      help="documents dataset: requests about each document (default 10)")
    data.add_argument("--question-len", type=int, default=32,
                      help="documents dataset: tokens of each question, after its document (default 32)")
    data.add_argument("--sharegpt-output-len", type=int,
                      help="sharegpt: max_tokens of every request (default: the length of the recorded reply)")
    data.add_argument("--jsonl-output-len", type=int, default=256,
                      help="jsonl: max_tokens of lines that set no max_tokens (default 256)")
    load = parser.add_argument_group("arrivals")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="requests per second, as a Poisson process (gamma with --burstiness); "
                           "inf sends every request at once (default inf)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="shape of the gamma-distributed gaps between requests: 1 Poisson, below 1 burstier, "
                           "above 1 more even (default 1)")
    load.add_argument("--max-concurrency", type=int,
                      help="requests in flight at most; later arrivals wait for one to finish (default: no limit)")
    load.add_argument("--seed", type=int, default=0, help="seed of the dataset and the arrivals (default 0)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    sampling.add_argument("--ignore-eos", action="store_true",
                          help="ask the server to generate max_tokens even past EOS (vLLM's extension)")
    results = parser.add_argument_group("results")
    results.add_argument("--goodput", nargs="+", metavar="KEY:MS",
                         help="service-level objectives of goodput, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el; "
                              "milliseconds)")
    results.add_argument("--metric-percentiles", default="99",
                         help="comma-separated percentiles reported beside mean and median (default 99)")
    results.add_argument("--json", metavar="FILE", help="also write the results (and per-request lists) as JSON")
    results.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
