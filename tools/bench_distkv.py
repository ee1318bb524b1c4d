"""DistKV benchmark: longest request per cluster size, and the cost of remote micro-attention.

Prints one JSON object. In one run it measures

* max context: for I = 1, 2, 4 instances with the same per-instance pool and a
  lending cap of 100%, the longest single request (in KV tokens) that completes,
  against the physical limit I x pool tokens (without borrowing it stays at 1 x pool);
* remote overhead: decode tokens/s (from the median decode step) of one request held on one
  instance, against the same context spread over 2 instances (TP=1 each), at each of
  ``--contexts``, in back-to-back pairs; the median slowdown of the pairs is the figure;
* independence: instance 0's decode tokens/s while instance 1 serves a request of its own
  (no blocks shared), against instance 0 alone;
* control traffic: control messages and bytes each instance's leader sends per step (the mean
  over instances, and the most any one sends), with one short request per instance, at each of
  ``--traffic-instances`` (oversubscribed);
* the transport's floor: the round trip of a 4 KB message (one decode step's query of a layer, with
  room to spare) between two instances over their KV link, to set beside the remote overhead per
  layer that the spread runs imply;
* borrow latency: on a cluster of 3, instance 1 serves ``--borrow-samples`` requests one after
  another, each one block longer than its pool, and times each from its Borrow to its first Loan,
  with instance 0 (the front's, beside the gManager service) idle and decoding a batch of 16; the
  median and p99 must not depend on instance 0's step.

    python tools/bench_distkv.py [--contexts 2048,16384] [--pool-blocks 32] [--decode-tokens 48] [--repeats 3]
                                 [--parts max_context,borrow_latency,...]

The model is a random LLaMA built here (transformers, fixed seed) and converted with
tools/convert_checkpoint.py. Each configuration runs under mpirun as a worker
(``--worker``) that prints its own JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from megakv.processes import mpirun_command, run_session

REPO_ROOT = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 16
NUM_LAYERS = 2
# Round trips of the transport-floor run, and the message each carries (bytes).
NUM_ROUND_TRIPS, ROUND_TRIP_BYTES = 2000, 4096
PARTS = ("max_context", "remote_overhead", "independence", "control_traffic", "transport_round_trip",
         "borrow_latency")
# Borrow-latency runs: every pool's blocks, the batch instance 0 decodes in the busy run, and its requests.
BORROW_POOL_BLOCKS, BUSY_BATCH, BUSY_PROMPT_LEN, BUSY_NEW_TOKENS = 96, 16, 8, 64


def build_model(folder: Path, max_positions: int) -> Path:
    """A random LLaMA (4 KV heads of 64 dims, NUM_LAYERS layers) converted to a megakv checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
                         initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder / "hf")
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), "--source", "hf",
                    "--input", str(folder / "hf"), "--output", str(folder / "ckpt"), "--tp", "1"],
                   check=True, capture_output=True)
    return folder / "ckpt"


def run_worker(model: Path, instances: int, pool_blocks: int, prompt_len: int, new_tokens: int,
               mode: str = "single", extra: tuple[str, ...] = ()) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model),
            "--instances", str(instances), "--pool-blocks", str(pool_blocks), "--prompt-len", str(prompt_len),
            "--decode-tokens", str(new_tokens), "--mode", mode, *extra]
    if instances > 1:
        argv = mpirun_command(instances, argv)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = run_session(argv, 3600, env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def median_decode_tokens_per_s(step_log: list[tuple[int, float]]) -> float | None:
    """Tokens/s of the median one-token step: robust to the odd step slowed by another process."""
    decode = sorted(seconds for num_tokens, seconds in step_log if num_tokens == 1)
    return 1 / decode[len(decode) // 2] if decode else None


def worker(args: argparse.Namespace) -> None:
    """One configuration, inside mpirun; rank 0 prints its JSON line.

    Modes: ``single``, one request on instance 0 (borrowing when its pool is short); ``independent``, one
    request per instance, each fitting its own pool; ``traffic``, the same with control-traffic counting;
    ``round_trip``, the transport's floor (see round_trip); ``borrow_latency`` (see borrow_latency_worker).
    """
    import torch

    from megakv.checkpoint.format import read_checkpoint_info
    from megakv.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
    from megakv.engine.llm_engine import LLMEngine
    from megakv.engine.sampling import SamplingParams
    from megakv.parallel import state

    torch.set_num_threads(1)
    env = state.init_distributed()
    state.initialize_model_parallel(1, args.instances)
    if args.mode == "round_trip":
        round_trip(env.rank)
        state.destroy_model_parallel()
        return
    info = read_checkpoint_info(args.model)
    config = EngineConfig(cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=args.pool_blocks),
                          scheduler=SchedulerConfig(max_num_batched_tokens=512),
                          parallel=ParallelConfig(1, args.instances))
    prompt = torch.randint(0, 256, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=args.decode_tokens)
    traffic = None
    if args.instances == 1:
        engine = LLMEngine(info, config, device=env.device)
        outputs = engine.generate([prompt], [params])
    else:
        from megakv.distkv.cluster_engine import ClusterEngine

        engine = ClusterEngine(info, config, device=env.device, count_traffic=args.mode == "traffic")
        if args.mode == "borrow_latency":
            borrow_latency_worker(engine, args)
            state.destroy_model_parallel()
            return
        if args.mode == "single":
            outputs = engine.generate([prompt], [params], [0])
        else:
            outputs = engine.generate([prompt] * args.instances, [params] * args.instances,
                                      list(range(args.instances)))
        if args.mode == "traffic":
            loop = engine.loop
            traffic = engine.leaders_comm.gather((loop.control_traffic.num_messages, loop.control_traffic.num_bytes,
                                                  loop.num_steps), root=0)
    output = outputs[0] if outputs else None
    error = output.error if output is not None else None
    completed = output is not None and error is None
    if env.rank == 0:
        record = {"completed": completed, "error": error, "kv_tokens": args.prompt_len + args.decode_tokens,
                  "num_remote_blocks": output.placement.num_remote_blocks if completed else None,
                  "decode_tokens_per_s": median_decode_tokens_per_s(engine.step_log)}
        if traffic is not None:
            record["per_instance"] = [{"messages_sent": messages, "bytes_sent": num_bytes, "steps": steps}
                                      for messages, num_bytes, steps in traffic]
        print(json.dumps(record), flush=True)
    state.destroy_model_parallel()


def borrow_latency_worker(engine, args: argparse.Namespace) -> None:
    """Instance 1 times each borrower from its Borrow to its first Loan (the first borrower is a warm-up: the
    gManager learns there what instance 0 may lend); the front keeps ``--front-batch`` requests decoding on
    instance 0 and sends the next borrower when the last one ends."""
    import time

    import torch

    from megakv.distkv.messages import Borrow, Loan
    from megakv.engine.sampling import SamplingParams

    if engine.instance_id == 1:
        sent, samples = {}, []
        post, handle = engine.control.post, engine.control.handle

        def timed_post(instance_id: int, message: object) -> None:
            if isinstance(message, Borrow) and message.num_blocks:
                sent.setdefault(message.request_id, time.perf_counter())
            post(instance_id, message)

        def timed_handle(message: object) -> None:
            if isinstance(message, Loan) and message.request_id in sent:
                samples.append((time.perf_counter() - sent.pop(message.request_id), message.creditor))
            handle(message)

        engine.control.post, engine.control.handle = timed_post, timed_handle
    if not engine.is_front:
        engine.serve_forever()
        engine.leaders_comm.gather(samples if engine.instance_id == 1 else None, root=0)
        return
    generator = torch.Generator().manual_seed(1)
    borrower_prompt = torch.randint(0, 256, (args.prompt_len,), generator=generator).tolist()
    busy_prompt = borrower_prompt[:BUSY_PROMPT_LEN]
    busy, borrower, done = set(), None, 0
    while done < args.borrow_samples + 1:
        while len(busy) < args.front_batch:
            busy.add(engine.add_request(busy_prompt, SamplingParams(max_new_tokens=BUSY_NEW_TOKENS), instance=0))
        if borrower is None:
            borrower = engine.add_request(borrower_prompt, SamplingParams(max_new_tokens=1), instance=1)
        for output in engine.step():
            if output.finished and output.request_id == borrower:
                borrower, done = None, done + 1
            elif output.finished:
                busy.discard(output.request_id)
    engine.shutdown()
    samples = engine.leaders_comm.gather(None, root=0)[1][1:]
    latencies_ms = sorted(1e3 * seconds for seconds, _ in samples)
    creditors = sorted({creditor for _, creditor in samples})
    print(json.dumps({"front_batch": args.front_batch, "samples": len(latencies_ms),
                      "median_ms": statistics.median(latencies_ms),
                      "p99_ms": statistics.quantiles(latencies_ms, n=100, method="inclusive")[98],
                      "max_ms": latencies_ms[-1],
                      "creditors": creditors,
                      "front_decode_step_ms": 1e3 * statistics.median(
                          seconds for _, seconds in engine.step_log) if engine.step_log else None}), flush=True)


def borrow_latency(model: Path, front_batch: int, num_samples: int) -> dict:
    """Borrow-to-Loan latency on instance 1 with the front's instance running ``front_batch`` requests."""
    return run_worker(model, 3, BORROW_POOL_BLOCKS, BORROW_POOL_BLOCKS * BLOCK_SIZE + 1, 1, mode="borrow_latency",
                      extra=("--front-batch", str(front_batch), "--borrow-samples", str(num_samples)))


def round_trip(rank: int) -> None:
    """Instance 0 sends a message over its KV link to instance 1, which sends it back, as a remote
    micro-attention's query and answer travel, with no work between: the transport's own round trip."""
    import time

    import torch

    from megakv.config import PEER_TIMEOUT_SECONDS
    from megakv.parallel.kv_links import KVLinks, receive_into, send_all, tensor_bytes

    links = KVLinks(PEER_TIMEOUT_SECONDS)
    message = tensor_bytes(torch.zeros(ROUND_TRIP_BYTES, dtype=torch.uint8))
    times = []
    for _ in range(NUM_ROUND_TRIPS):
        started = time.perf_counter()
        if rank == 0:
            send_all(links.outgoing[1], [message])
            receive_into(links.outgoing[1], message, "instance 1")
        else:
            receive_into(links.incoming[0], message, "instance 0")
            send_all(links.incoming[0], [message])
        times.append(time.perf_counter() - started)
    links.close()
    if rank == 0:
        print(json.dumps({"round_trip_us": 1e6 * statistics.median(times), "bytes": ROUND_TRIP_BYTES,
                          "round_trips": NUM_ROUND_TRIPS}), flush=True)


def max_context(model: Path, instances: int, pool_blocks: int, new_tokens: int) -> dict:
    """The longest request that completes: the full I x pool fits, one more block does not."""
    limit = instances * pool_blocks * BLOCK_SIZE
    fits = run_worker(model, instances, pool_blocks, limit - new_tokens, new_tokens)
    beyond = run_worker(model, instances, pool_blocks, limit - new_tokens + BLOCK_SIZE, new_tokens)
    longest = fits["kv_tokens"] if fits["completed"] else 0
    return {"instances": instances, "pool_tokens_per_instance": pool_blocks * BLOCK_SIZE,
            "max_context_tokens": longest, "physical_limit_tokens": limit,
            "ratio_to_physical_limit": longest / limit, "one_block_more_rejected": not beyond["completed"]}


def remote_overhead(model: Path, context: int, args: argparse.Namespace) -> dict:
    """One request all local against the same request spread over 2 instances, in back-to-back pairs."""
    context_blocks = -(-(context + args.decode_tokens) // BLOCK_SIZE)
    runs = []
    for _ in range(args.repeats):
        local = run_worker(model, 1, context_blocks + 4, context, args.decode_tokens)
        # Two instances whose pools each hold a bit more than half the context: it must spread.
        spread = run_worker(model, 2, context_blocks // 2 + 4, context, args.decode_tokens)
        runs.append({"local_decode_tokens_per_s": local["decode_tokens_per_s"],
                     "spread_decode_tokens_per_s": spread["decode_tokens_per_s"],
                     "spread_num_remote_blocks": spread["num_remote_blocks"],
                     "slowdown": local["decode_tokens_per_s"] / spread["decode_tokens_per_s"]})
    medians = {key: statistics.median(run[key] for run in runs)
               for key in ("local_decode_tokens_per_s", "spread_decode_tokens_per_s", "slowdown")}
    # What each remote layer adds to a decode step, and what the 1.15x target would leave it.
    local_step_us = 1e6 / medians["local_decode_tokens_per_s"]
    return {"context": context, "runs": runs, **medians,
            "remote_layer_overhead_us": (medians["slowdown"] - 1) * local_step_us / NUM_LAYERS,
            "remote_layer_budget_at_1.15x_us": 0.15 * local_step_us / NUM_LAYERS}


def independence(model: Path, context: int, args: argparse.Namespace) -> dict:
    """Instance 0's decode rate while instance 1 serves its own request (nothing shared) against alone."""
    context_blocks = -(-(context + args.decode_tokens) // BLOCK_SIZE)
    runs = []
    for _ in range(args.repeats):
        alone = run_worker(model, 1, context_blocks + 4, context, args.decode_tokens)
        beside = run_worker(model, 2, context_blocks + 4, context, args.decode_tokens, mode="independent")
        runs.append({"alone_decode_tokens_per_s": alone["decode_tokens_per_s"],
                     "beside_decode_tokens_per_s": beside["decode_tokens_per_s"],
                     "ratio": beside["decode_tokens_per_s"] / alone["decode_tokens_per_s"]})
    return {"context": context, "runs": runs, "ratio": statistics.median(run["ratio"] for run in runs)}


def control_traffic(model: Path, cluster_sizes: list[int]) -> list[dict]:
    """Control messages and bytes each leader sends per step, one short request per instance."""
    rows = []
    for instances in cluster_sizes:
        if instances == 1:
            # One instance runs the plain engine: it has no control plane at all.
            rows.append({"instances": 1, "messages_per_step_per_instance": 0, "bytes_per_step_per_instance": 0,
                         "max_messages_per_step": 0})
            continue
        result = run_worker(model, instances, 16, 64, 32, mode="traffic")
        per_instance = result["per_instance"]
        messages = [row["messages_sent"] / row["steps"] for row in per_instance]
        rows.append({"instances": instances, "messages_per_step_per_instance": statistics.mean(messages),
                     "bytes_per_step_per_instance": statistics.mean(row["bytes_sent"] / row["steps"]
                                                                    for row in per_instance),
                     "max_messages_per_step": max(messages)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="2048,16384", help="contexts of the remote-overhead runs")
    parser.add_argument("--pool-blocks", type=int, default=32, help="per-instance pool of the max-context runs")
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--instances-list", default="1,2,4")
    parser.add_argument("--traffic-instances", default="1,2,4,8",
                        help="cluster sizes of the control-traffic runs (tiny requests, oversubscribed)")
    parser.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3,
                        help="local/spread pairs of the remote-overhead run (each pair back to back, so that a "
                             "change in the machine's load hits both sides; the median slowdown is reported)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which measurements to run (of {', '.join(PARTS)})")
    parser.add_argument("--borrow-samples", type=int, default=100, help="borrowers timed per borrow-latency run")
    parser.add_argument("--front-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--instances", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.borrow_samples < 2:
        parser.error(f"--borrow-samples must be at least 2, got {args.borrow_samples}")
    parts = args.parts.split(",")
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown --parts {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    if args.worker:
        worker(args)
        return
    contexts = [int(context) for context in args.contexts.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        # Saving a Hugging Face model imports deepspeed, which logs to stdout: keep the JSON alone there.
        with contextlib.redirect_stdout(sys.stderr):
            model = build_model(Path(folder), max_positions=max(2 * max(contexts), 8192))
        results = {"block_size": BLOCK_SIZE}
        if "max_context" in parts:
            results["max_context"] = [max_context(model, int(n), args.pool_blocks, 4)
                                      for n in args.instances_list.split(",")]
        if "remote_overhead" in parts:
            results["remote_overhead"] = [remote_overhead(model, context, args) for context in contexts]
        if "independence" in parts:
            results["independence"] = independence(model, max(contexts), args)
        if "control_traffic" in parts:
            results["control_traffic"] = control_traffic(model,
                                                         [int(n) for n in args.traffic_instances.split(",")])
        if "transport_round_trip" in parts:
            results["transport_round_trip"] = run_worker(model, 2, 16, 1, 1, mode="round_trip")
        if "borrow_latency" in parts:
            results["borrow_latency"] = [borrow_latency(model, batch, args.borrow_samples)
                                         for batch in (0, BUSY_BATCH)]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
