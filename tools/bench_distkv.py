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
  layer that the spread runs imply.

    python tools/bench_distkv.py [--contexts 2048,16384] [--pool-blocks 32] [--decode-tokens 48] [--repeats 3]

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

from megakv.processes import run_session

BIN_DIR = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 16
NUM_LAYERS = 2
# Round trips of the transport-floor run, and the message each carries (bytes).
NUM_ROUND_TRIPS, ROUND_TRIP_BYTES = 2000, 4096


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
               mode: str = "single") -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model),
            "--instances", str(instances), "--pool-blocks", str(pool_blocks), "--prompt-len", str(prompt_len),
            "--decode-tokens", str(new_tokens), "--mode", mode]
    if instances > 1:
        argv = [str(BIN_DIR / "mpirun"), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                "-n", str(instances), *argv]
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
    ``round_trip``, the transport's floor (see round_trip).
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
        if args.mode == "single":
            outputs = engine.generate([prompt], [params], [0])
        else:
            outputs = engine.generate([prompt] * args.instances, [params] * args.instances,
                                      list(range(args.instances)))
        if args.mode == "traffic":
            traffic = engine.leaders_comm.gather((engine.control_traffic.num_messages,
                                                  engine.control_traffic.num_bytes, engine.num_steps), root=0)
    output = outputs[0] if outputs else None
    error = output.error if output is not None else None
    completed = output is not None and error is None
    if env.rank == 0:
        record = {"completed": completed, "error": error, "kv_tokens": args.prompt_len + args.decode_tokens - 1,
                  "num_remote_blocks": output.placement.num_remote_blocks if completed else None,
                  "decode_tokens_per_s": median_decode_tokens_per_s(engine.step_log)}
        if traffic is not None:
            record["per_instance"] = [{"messages_sent": messages, "bytes_sent": num_bytes, "steps": steps}
                                      for messages, num_bytes, steps in traffic]
        print(json.dumps(record), flush=True)
    state.destroy_model_parallel()


def round_trip(rank: int) -> None:
    """Instance 0 sends a message over its KV link to instance 1, which sends it back, as a remote
    micro-attention's query and answer travel, with no work between: the transport's own round trip."""
    import time

    import torch

    from megakv.parallel.kv_links import KVLinks, receive_into, send_all, tensor_bytes

    links = KVLinks()
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
    fits = run_worker(model, instances, pool_blocks, limit - new_tokens + 1, new_tokens)
    beyond = run_worker(model, instances, pool_blocks, limit - new_tokens + 1 + BLOCK_SIZE, new_tokens)
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--instances", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.worker:
        worker(args)
        return
    contexts = [int(context) for context in args.contexts.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        # Saving a Hugging Face model imports deepspeed, which logs to stdout: keep the JSON alone there.
        with contextlib.redirect_stdout(sys.stderr):
            model = build_model(Path(folder), max_positions=max(2 * max(contexts), 8192))
        results = {"block_size": BLOCK_SIZE, "max_context": [
            max_context(model, int(n), args.pool_blocks, 4) for n in args.instances_list.split(",")]}
        results["remote_overhead"] = [remote_overhead(model, context, args) for context in contexts]
        results["independence"] = independence(model, max(contexts), args)
        results["control_traffic"] = control_traffic(model, [int(n) for n in args.traffic_instances.split(",")])
        results["transport_round_trip"] = run_worker(model, 2, 16, 1, 1, mode="round_trip")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
