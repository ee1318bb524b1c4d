"""What HTTP adds: time to first token and time per output token through ``megakv serve`` against the engine
in process, for the same greedy request; and the CPU an idle server uses. Prints one JSON object.

    python tools/bench_server.py [--model CKPT_DIR] [--prompt-tokens 256] [--max-tokens 64] [--repeats 5]

Without ``--model`` it builds the tiny random demo model (tools/make_demo_model.py --random) in a temporary
folder. The server runs as a separate process on 127.0.0.1 (one instance, the same pool); each figure is the
median of ``--repeats`` requests, in process and over HTTP in turn.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from megakv.processes import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
MEGAKV = str(Path(sys.executable).with_name("megakv"))
NUM_BLOCKS = 128
IDLE_SECONDS = 5.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timings(arrivals: list[float], start: float) -> tuple[float, float]:
    """(time to first token, mean time per output token after the first) from token arrival times."""
    ttft = arrivals[0] - start
    tpot = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) > 1 else 0.0
    return ttft, tpot


def in_process(model: Path, prompt_ids: list[int], max_tokens: int) -> tuple[float, float]:
    """One greedy request through LLMEngine.step(), timed per output."""
    from megakv.engine.sampling import SamplingParams

    engine = _engine(model)
    start = time.perf_counter()
    engine.add_request(prompt_ids, SamplingParams(max_new_tokens=max_tokens, ignore_eos=True))
    arrivals = []
    while engine.has_unfinished():
        for output in engine.step():
            arrivals += [time.perf_counter()] * len(output.new_token_ids)
    return timings(arrivals, start)


_ENGINES: dict[Path, object] = {}


def _engine(model: Path):
    if model not in _ENGINES:
        from megakv.checkpoint.format import read_checkpoint_info
        from megakv.config import CacheConfig, EngineConfig
        from megakv.engine.llm_engine import LLMEngine

        _ENGINES[model] = LLMEngine(read_checkpoint_info(model), EngineConfig(cache=CacheConfig(num_blocks=NUM_BLOCKS)))
    return _ENGINES[model]


def over_http(client: httpx.Client, prompt_ids: list[int], max_tokens: int) -> tuple[float, float]:
    """One greedy streamed completion; a token arrives with the SSE event that carries it. The client keeps its
    connection, as a real one does: a new httpx client per request would add its own setup (tens of ms, mostly
    its TLS context) to the figures."""
    body = {"model": "bench", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    arrivals = []
    start = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            for choice in json.loads(line[len("data: "):])["choices"]:
                arrivals += [now] * len(choice.get("token_ids") or [])
    return timings(arrivals, start)


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([MEGAKV, "serve", "--model", str(model), "--port", str(port), "--num-blocks",
                             str(NUM_BLOCKS), "--served-model-name", "bench", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"megakv serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("megakv serve did not answer /health within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="megakv checkpoint (default: the tiny random demo model)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for flag in ("prompt_tokens", "max_tokens", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            model = Path(folder) / "ckpt"
            subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_demo_model.py"), "--random", "--tp", "1",
                            "--output", str(model), "--hf-output", str(Path(folder) / "hf")],
                           check=True, capture_output=True)
        vocab = json.loads((model / "megakv_config.json").read_text())["model"]["vocab_size"]
        prompt_ids = torch.randint(3, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        proc, url = start_server(model)
        try:
            with httpx.Client(base_url=url, timeout=300) as client:
                in_process(model, prompt_ids, args.max_tokens)  # warm-up of both paths
                over_http(client, prompt_ids, args.max_tokens)
                local, http = [], []
                for _ in range(args.repeats):
                    local.append(in_process(model, prompt_ids, args.max_tokens))
                    http.append(over_http(client, prompt_ids, args.max_tokens))
            time.sleep(1.0)
            before = cpu_seconds(proc.pid)
            time.sleep(IDLE_SECONDS)
            idle_cpu = (cpu_seconds(proc.pid) - before) / IDLE_SECONDS
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    ttft_local, tpot_local = (statistics.median(run[i] for run in local) for i in (0, 1))
    ttft_http, tpot_http = (statistics.median(run[i] for run in http) for i in (0, 1))
    print(json.dumps({
        "model": str(args.model or "tiny random demo model"), "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "repeats": args.repeats,
        "ttft_ms": {"in_process": 1e3 * ttft_local, "http": 1e3 * ttft_http, "added": 1e3 * (ttft_http - ttft_local)},
        "tpot_ms": {"in_process": 1e3 * tpot_local, "http": 1e3 * tpot_http, "added": 1e3 * (tpot_http - tpot_local)},
        "idle_server_cpu_fraction_of_one_core": idle_cpu,
    }, indent=1))


if __name__ == "__main__":
    main()
