"""Convert a training-framework checkpoint into a megakv checkpoint sharded for TP ranks.

The conversion streams: every rank's shard file is planned up front with
:class:`SafetensorsWriter`, then each source layer is read once, sharded for all
ranks, written, and dropped, so memory holds one layer at a time. Output goes to
a temporary folder next to the target and is renamed into place at the end, so a
failed or interrupted conversion (an error, Ctrl-C, SIGTERM) leaves nothing half-written.

Command line (``tools/convert_checkpoint.py``)::

    convert_checkpoint --source hf --input HF_DIR --output CKPT_DIR --tp 2 [--dtype bfloat16]
    convert_checkpoint --source megatron --input CKPT_ROOT [--iteration N] --output CKPT_DIR --tp 2
    convert_checkpoint --source deepspeed --input CKPT_ROOT [--tag global_stepN] --output CKPT_DIR --tp 2
    convert_checkpoint --source gguf --input MODEL.gguf --output CKPT_DIR --tp 3 [--dtype float32]
    convert_checkpoint --source megakv --input CKPT_DIR --output CKPT_DIR2 --tp 4      # reshard
    convert_checkpoint --source megakv --input CKPT_DIR --output HF_DIR --to hf       # export
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from megakv.checkpoint.format import (TOKENIZER_FILES, CheckpointInfo, read_checkpoint_info, shard_file_name,
                                      write_checkpoint_config)
from megakv.checkpoint.deepspeed_source import DeepSpeedReader
from megakv.checkpoint.gguf_source import GGUFReader
from megakv.checkpoint.hf import HFReader
from megakv.checkpoint.hf_export import write_hf_folder
from megakv.checkpoint.megakv_source import MegakvReader
from megakv.checkpoint.megatron import open_megatron
from megakv.checkpoint.options import SourceOptions, parse_model_arg
from megakv.checkpoint.safetensors_writer import SafetensorsWriter
from megakv.checkpoint.sharding import (EMBEDDING, FINAL_NORM, OUTPUT_LAYER, layer_prefix, shard_layer,
                                        shard_shapes, shard_vocab)
from megakv.config import ModelConfig, dtype_name, parse_dtype

PROG = "convert_checkpoint"


class SourceReader(Protocol):
    """An unsharded source checkpoint, read one piece at a time (see :class:`HFReader`)."""

    config: ModelConfig

    def embedding(self) -> torch.Tensor: ...

    def layer(self, layer_index: int) -> dict[str, torch.Tensor]: ...

    def final_norm(self) -> torch.Tensor: ...

    def lm_head(self) -> torch.Tensor | None: ...

    def close(self) -> None: ...


# Source name on the command line -> reader of a source folder.
SOURCES: dict[str, Callable[[Path, SourceOptions], SourceReader]] = {
    "hf": lambda path, options: HFReader(path),
    "megatron": open_megatron,
    "deepspeed": DeepSpeedReader,
    "megakv": MegakvReader,
    "gguf": GGUFReader,
}
TARGETS = ("megakv", "hf")


def _check_output(output_dir: Path, input_dir: Path, overwrite: bool) -> None:
    """Refuse outputs that would clobber something the user did not ask to replace."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a folder")
    if output_dir.exists() and output_dir.resolve() == input_dir.resolve():
        raise ValueError(f"output folder {output_dir} is the input folder: choose another --output")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"output folder {output_dir} already exists and is not empty: "
                         f"pass --overwrite to replace it")


def _write_shards(reader: SourceReader, cfg: ModelConfig, tp: int, folder: Path, progress: bool) -> None:
    """Write every rank's shard file into ``folder``, one source layer in memory at a time."""
    dtype = cfg.torch_dtype
    plan = [(name, shape, dtype) for name, shape in shard_shapes(cfg, tp).items()]
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(SafetensorsWriter(folder / shard_file_name(rank), plan,
                                                         metadata={"format": "pt"}))
                   for rank in range(tp)]

        def write_vocab(name: str, weight: torch.Tensor) -> None:
            weight = weight.to(dtype)
            for rank, writer in enumerate(writers):
                writer.write(name, shard_vocab(weight, cfg, tp, rank))

        write_vocab(EMBEDDING, reader.embedding())
        for layer_index in tqdm(range(cfg.num_layers), desc="converting", unit="layer", file=sys.stderr,
                                disable=not progress):
            full = {key: tensor.to(dtype) for key, tensor in reader.layer(layer_index).items()}
            prefix = layer_prefix(layer_index)
            for rank, writer in enumerate(writers):
                for key, tensor in shard_layer(full, cfg, tp, rank).items():
                    writer.write(prefix + key, tensor)
        final_norm = reader.final_norm().to(dtype)
        for writer in writers:
            writer.write(FINAL_NORM, final_norm)
        lm_head = reader.lm_head()
        if lm_head is not None:
            write_vocab(OUTPUT_LAYER, lm_head)


def convert_checkpoint(source: str, input_dir: str | os.PathLike, output_dir: str | os.PathLike, tp: int | None,
                       dtype: str | None = None, overwrite: bool = False, progress: bool = False,
                       options: SourceOptions | None = None, to: str = "megakv") -> CheckpointInfo | Path:
    """Convert the ``source``-format checkpoint in ``input_dir`` into a megakv checkpoint for ``tp`` ranks.

    With ``to="hf"`` write a Hugging Face LLaMA folder instead (``tp`` is ignored) and return its path.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: expected one of {', '.join(SOURCES)}")
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}: expected one of {', '.join(TARGETS)}")
    if to == "megakv" and tp is None:
        raise ValueError("--tp is required when converting to a megakv checkpoint")
    input_path, output_path = Path(input_dir), Path(output_dir)
    reader = SOURCES[source](input_path, options or SourceOptions())
    try:
        cfg = reader.config
        if dtype is not None:
            cfg = dataclasses.replace(cfg, dtype=dtype_name(parse_dtype(dtype)))
        if to == "megakv":
            cfg.check_tensor_parallel_size(tp)
        _check_output(output_path, input_path, overwrite)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        # mkdir rather than tempfile.mkdtemp, whose 0700 mode would stick to the renamed output.
        temp_path = output_path.parent / f"{output_path.name}.tmp-{secrets.token_hex(4)}"
        try:
            # Inside the try: a signal that lands just after the folder is made still removes it.
            temp_path.mkdir()
            if to == "megakv":
                _write_shards(reader, cfg, tp, temp_path, progress)
                write_checkpoint_config(temp_path, cfg, tp)
            else:
                write_hf_folder(reader, cfg, temp_path, progress)
            if isinstance(reader, GGUFReader):
                reader.write_tokenizer(temp_path)
            for name in TOKENIZER_FILES:
                if (input_path / name).is_file():
                    shutil.copy2(input_path / name, temp_path / name)
            # Move the old output aside before renaming, so it is only deleted once the new one is in place.
            old_path = temp_path.with_name(temp_path.name + ".old")
            if output_path.exists():
                output_path.rename(old_path)
            try:
                temp_path.rename(output_path)
            except OSError:
                if old_path.exists():
                    old_path.rename(output_path)
                raise
            shutil.rmtree(old_path, ignore_errors=True)
        except BaseException:
            shutil.rmtree(temp_path, ignore_errors=True)
            raise
    finally:
        reader.close()
    return read_checkpoint_info(output_path) if to == "megakv" else output_path


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``tools/convert_checkpoint.py``."""
    parser = argparse.ArgumentParser(prog=PROG, description="Convert a checkpoint into megakv's TP-sharded format.")
    parser.add_argument("--source", choices=sorted(SOURCES), required=True, help="format of the input checkpoint")
    parser.add_argument("--input", required=True, help="input checkpoint folder (gguf: the .gguf file)")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--tp", type=int, help="tensor-parallel ranks to shard for (required unless --to hf)")
    parser.add_argument("--to", choices=TARGETS, default="megakv",
                        help="output format: a megakv checkpoint (default) or a Hugging Face LLaMA folder")
    parser.add_argument("--dtype", help="stored dtype: float32, bfloat16 or float16 (default: the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    parser.add_argument("--iteration", type=int, help="megatron: iteration to read (default: the latest)")
    parser.add_argument("--tag", help="deepspeed: tag folder to read (default: the one named in 'latest')")
    parser.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="megatron: a hyper-parameter by Megatron-LM argument name (num_query_groups=8, "
                             "rotary_interleaved=true, ...), supplying or overriding the checkpoint's args")
    parser.add_argument("--hf-config", type=Path, help="deepspeed: the wrapped model's Hugging Face config.json")
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so that the conversion's cleanup removes its temporary folder."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: convert, or print one ``error:`` line and exit 2 on a bad input (130 when interrupted)."""
    args = build_parser().parse_args(argv)
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        options = SourceOptions(iteration=args.iteration, tag=args.tag, hf_config=args.hf_config,
                                model_args=dict(parse_model_arg(text) for text in args.model_arg))
        info = convert_checkpoint(args.source, args.input, args.output, args.tp, dtype=args.dtype,
                                  overwrite=args.overwrite, progress=sys.stderr.isatty(), options=options,
                                  to=args.to)
    except (ValueError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted; {args.output} was not written", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if isinstance(info, Path):
        print(f"wrote Hugging Face LLaMA folder {info}")
        return
    print(f"wrote megakv checkpoint {info.path} (tp={info.tensor_parallel_size}, {info.model.dtype}, "
          f"{info.model.num_layers} layers)")
