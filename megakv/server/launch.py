"""``megakv serve``: every rank loads its shard; global rank 0 serves HTTP, the other ranks follow its steps.

One process runs an LLMEngine; several ranks (under mpirun) run a ClusterEngine,
whose front, rank 0, drives the cluster from the AsyncEngine's loop thread while
uvicorn runs the event loop in the main thread. SIGINT or SIGTERM on rank 0
stops the HTTP server (open responses get a few seconds to finish), then the
engine loop, then the cluster: every rank leaves serve_forever and exits 0. An
engine loop that fails stops the HTTP server too (at once, with a line naming the
error) and the job is aborted with status 2: requests never wait on a dead engine.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys

import torch
import uvicorn

from megakv.chat import ChatTemplate, read_tokenizer_config
from megakv.checkpoint.format import CheckpointInfo
from megakv.config import EngineConfig, ServerConfig, dtype_name
from megakv.engine.async_engine import AsyncEngine
from megakv.engine.llm_engine import LLMEngine
from megakv.options import UsageError, engine_config, is_set, option_source, resolve_options, server_config
from megakv.parallel import state
from megakv.parallel.state import RankLocalError
from megakv.server.app import build_app
from megakv.server.metrics import ServerMetrics
from megakv.server.serving import ServingContext
from megakv.startup import chat_stop_token_ids, check_kv_pool_fits, open_checkpoint, run_dtype
from megakv.tokenizer import TextTokenizer

# Seconds open responses may take to finish once the server is asked to stop.
GRACEFUL_SHUTDOWN_SECONDS = 5
# Options of the command that are the defaults of requests that do not set them (max_new_tokens only when the
# flag or the config gives it: else requests get vLLM's defaults, see megakv.server.serving).
REQUEST_DEFAULTS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos")


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling (it would raise the signal again once stopped, killing
    the process before the cluster is shut down), which stops when the engine loop does, and whose open
    responses end with an error event (or a 503) as soon as it stops, rather than being cut after the grace
    period."""

    def __init__(self, config: uvicorn.Config, context: ServingContext) -> None:
        super().__init__(config)
        self.engine = context.engine
        self.context = context

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.context.shutting_down.set()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def on_tick(self, counter: int) -> bool:
        # uvicorn ticks every 0.1 s. A server whose engine has failed would only answer errors from then on.
        if not self.should_exit and not self.engine.is_running:
            print(f"megakv serve: the engine loop failed ({describe_error(self.engine.error)}): stopping the "
                  f"server", file=sys.stderr, flush=True)
            self.should_exit = True
        return await super().on_tick(counter)


def describe_error(error: BaseException | None) -> str:
    """An exception as one line: its type and message."""
    return f"{type(error).__name__}: {error}"


def bind_socket(settings: ServerConfig, args: argparse.Namespace) -> socket.socket:
    """The HTTP socket, bound but not yet listening: a port in use or a host that is not this machine's stops
    the server before the model loads, and clients are refused, not kept waiting, until the server starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise UsageError(f"{option_source(args, 'host')}: cannot resolve host {settings.host!r}: "
                         f"{err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restarted server may listen while the last one's connections linger in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {settings.host} port {settings.port} ({option_source(args, 'host')}, "
                         f"{option_source(args, 'port')}): {err.strerror}") from None
    return sock


def startup_lines(model_dir: str, info: CheckpointInfo, dtype: torch.dtype, config: EngineConfig,
                  context: ServingContext) -> list[str]:
    """What an operator checks first: the model, the cluster's shape, its KV memory and what one request may use."""
    model, parallel, block_size = info.model, config.parallel, config.cache.block_size
    num_instances = parallel.num_instances
    instances = f"{num_instances} instance{'s' if num_instances > 1 else ''}"
    limit = context.context_limit
    capacity = limit.capacity
    num_blocks = capacity.num_local_blocks
    lent = "" if num_instances == 1 else \
        f" (each instance lends up to {capacity.num_lendable_blocks_per_instance:,} blocks)"
    return [
        f"model {model_dir} ({model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} "
        f"heads, {dtype_name(dtype)}) as {context.model_name!r}: {instances} x TP {parallel.tensor_parallel_size}",
        f"KV cache: {num_blocks:,} blocks of {block_size} tokens per instance ({num_blocks * block_size:,} tokens); "
        f"cluster KV capacity {num_instances * num_blocks * block_size:,} tokens; lending cap "
        f"{config.distkv.lending_cap}{lent}; a request may hold {limit.max_model_len:,} tokens ({limit.reason})",
    ]


def run_serve(args: argparse.Namespace) -> int:
    """Load the model on every rank and serve until rank 0 is stopped; returns the exit status."""
    options = resolve_options(args)
    config = engine_config(options)
    settings = server_config(options)
    info, requested_dtype = open_checkpoint(args.model, options, config)
    tokenizer = TextTokenizer.from_checkpoint(args.model)
    chat = ChatTemplate.from_checkpoint(args.model) if tokenizer is not None else None
    num_instances = config.parallel.num_instances
    env = state.init_distributed(layout=(config.parallel.tensor_parallel_size, num_instances))
    try:
        state.initialize_model_parallel(config.parallel.tensor_parallel_size, num_instances)
        dtype = run_dtype(requested_dtype, info, env.device)
        try:
            sock = bind_socket(settings, args) if env.rank == 0 else None
            check_kv_pool_fits(args, info, config, dtype, env.device)
            if env.world_size > 1:
                from megakv.distkv.cluster_engine import ClusterEngine

                engine = ClusterEngine(info, config, dtype=dtype, device=env.device)
            else:
                engine = LLMEngine(info, config, dtype=dtype, device=env.device)
        except (ValueError, RuntimeError, OSError) as err:
            raise RankLocalError(f"[rank {env.rank}] {err}") from err
        if env.rank != 0:
            # The front ends the cluster: a Ctrl-C typed in the terminal reaches every rank.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                engine.serve_forever()
            except (ValueError, RuntimeError) as err:
                # The other ranks wait for this one's step: the whole job must stop, naming why.
                raise RankLocalError(f"[rank {env.rank}] the cluster step failed ({describe_error(err)}): "
                                     f"stopping every rank") from err
            return 0
        async_engine = AsyncEngine(engine)
        model_name = settings.served_model_name or args.model
        request_defaults = {key: options[key] for key in REQUEST_DEFAULTS
                            if key != "max_new_tokens" or is_set(args, key)}
        context = ServingContext(async_engine, model_name, info.model.vocab_size, tokenizer, chat,
                                 ServerMetrics(model_name), settings.request_limits, request_defaults,
                                 chat_stop_token_ids(tokenizer, chat), read_tokenizer_config(args.model),
                                 config.cache.enable_prefix_caching)
        for line in startup_lines(args.model, info, dtype, config, context):
            print(f"megakv serve: {line}", file=sys.stderr, flush=True)
        try:
            serve_http(context, settings, sock)
        finally:
            async_engine.shutdown()
            # A failed engine cannot step the cluster to its end: its ranks are stopped below, by the launcher.
            if env.world_size > 1 and async_engine.error is None:
                engine.shutdown()
        if async_engine.error is not None:
            raise RankLocalError(f"[rank {env.rank}] the engine loop failed ({describe_error(async_engine.error)}): "
                                 f"the server stopped") from async_engine.error
    finally:
        state.destroy_model_parallel()
    return 0


def serve_http(context: ServingContext, settings: ServerConfig, sock: socket.socket) -> None:
    """Run the HTTP server on ``sock`` in this thread until SIGINT or SIGTERM."""
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(build_app(context), host=settings.host, port=port, log_level=settings.log_level,
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS), context)

    def stop(signum: int, frame: object) -> None:
        # A second Ctrl-C stops without waiting for open responses.
        server.force_exit = server.should_exit
        server.should_exit = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"megakv serve: serving on http://{host}:{port} (pid {os.getpid()})", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
