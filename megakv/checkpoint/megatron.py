"""Reading Megatron-core / Megatron-LM checkpoints one layer at a time (``--source megatron``).

Two on-disk formats, both under ``CKPT_ROOT/iter_XXXXXXX`` (the iteration named by
``latest_checkpointed_iteration.txt`` unless ``--iteration`` says otherwise):

- legacy: ``mp_rank_TT/model_optim_rng.pt`` (``mp_rank_TT_PPP`` with pipeline stages),
  one ``torch.save`` dict per rank with ``model``, ``args``, ``checkpoint_version``.
  Each file is opened with ``torch.load(mmap=True)``, so its tensors are paged in
  from disk only when a layer touches them, and that layer's pieces are copied out.
- ``torch_dist``: ``.metadata``, ``*.distcp``, ``common.pt`` (torch.distributed.checkpoint,
  layers stacked on a leading axis). Each (layer, rank) chunk is read by its byte range.

Layout and hyper-parameter mapping live in :mod:`megakv.checkpoint.megatron_layout`.
"""
from __future__ import annotations

import argparse
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from megakv.checkpoint.format import CheckpointError
from megakv.checkpoint.megatron_layout import (EMBEDDING_NAMES, FINAL_NORM_NAMES, LAYER_PIECES, LAYER_PREFIXES,
                                               OUTPUT_NAMES, checkpoint_dtype, find_piece, layer_from_pieces,
                                               merge_rank_pieces, model_config_from_args)
from megakv.checkpoint.options import SourceOptions

LATEST_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
DIST_METADATA = ".metadata"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
LOOKED_FOR = (f"{LATEST_FILE} with iter_*/ folders, iter_*/mp_rank_XX[_YYY]/{RANK_FILE} (legacy per-rank), "
              f"iter_*/{DIST_METADATA} with *.distcp (torch_dist)")


def torch_load(path: Path, mmap: bool = True) -> Any:
    """Load a Megatron ``torch.save`` file without running arbitrary pickled code."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # saved without the zip format: no lazy paging possible
            return torch_load(path, mmap=False)
        raise CheckpointError(f"cannot read Megatron file {path}: {err}") from None
    except Exception as err:  # UnpicklingError and zip errors name the offending global or byte
        raise CheckpointError(f"cannot read Megatron file {path}: {err}") from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested Megatron-LM state dicts (``language_model -> encoder -> layers.0...``) to dotted names."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def args_dict(args: Any) -> dict[str, Any]:
    """The checkpoint's ``args`` (an argparse.Namespace, a dict, or absent) as a dict."""
    if args is None:
        return {}
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


def iteration_folder(root: Path, iteration: int | None) -> Path:
    """The ``iter_XXXXXXX`` (or ``release``) folder to read; ``root`` may already be one."""
    if not root.is_dir():
        raise CheckpointError(f"input folder {root} does not exist")
    if iteration is not None:
        folder = root / f"iter_{iteration:07d}"
        if not folder.is_dir():
            found = sorted(p.name for p in root.glob("iter_*"))
            raise CheckpointError(f"{root} has no {folder.name} folder (found: {', '.join(found) or 'none'})")
        return folder
    if (root / DIST_METADATA).is_file() or any(RANK_DIR.match(p.name) for p in root.iterdir()):
        return root
    latest = root / LATEST_FILE
    if not latest.is_file():
        raise CheckpointError(f"{root} is not a Megatron checkpoint: looked for {LOOKED_FOR}")
    text = latest.read_text().strip()
    folder = root / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not folder.is_dir():
        raise CheckpointError(f"{latest} names iteration {text}, but {folder} does not exist")
    return folder


class LegacyMegatronReader:
    """Per-rank ``model_optim_rng.pt`` files of any TP x PP degree, merged one layer at a time."""

    def __init__(self, folder: Path, options: SourceOptions) -> None:
        self.path = folder
        ranks = {}
        for entry in folder.iterdir():
            match = RANK_DIR.match(entry.name)
            if match:
                ranks[int(match[1]), int(match[2] or 0)] = entry
        first = torch_load(ranks[min(ranks)] / RANK_FILE) if (ranks[min(ranks)] / RANK_FILE).is_file() else {}
        ckpt_args = args_dict(first.get("args"))
        version = first.get("checkpoint_version", 3.0)
        if version < 2.0:
            raise CheckpointError(f"Megatron checkpoint_version {version} (QKV in the pre-2020 ordering) is not "
                                  f"supported: re-save it with a recent Megatron-LM")
        self.tp = ckpt_args.get("tensor_model_parallel_size") or 1 + max(t for t, _ in ranks)
        self.pp = ckpt_args.get("pipeline_model_parallel_size") or 1 + max(p for _, p in ranks)
        # stage_files[p][t]: the state dict of TP rank t in pipeline stage p, tensors paged lazily.
        self.stage_files: list[list[dict[str, Any]]] = []
        for stage in range(self.pp):
            row = []
            for tp_rank in range(self.tp):
                name = f"mp_rank_{tp_rank:02d}" + (f"_{stage:03d}" if self.pp > 1 else "")
                path = folder / name / RANK_FILE
                if not path.is_file():
                    raise CheckpointError(f"Megatron checkpoint {folder} is missing rank file {name}/{RANK_FILE} "
                                          f"(tensor parallel {self.tp}, pipeline parallel {self.pp})")
                state = first if (tp_rank, stage) == min(ranks) else torch_load(path)
                row.append(flatten(state.get("model", state)))
            self.stage_files.append(row)
        self.layer_prefix, self.stage_layers = self._index_layers()
        merged = {**self._inferred_args(), **ckpt_args, **options.model_args}
        self.rotary_interleaved = bool(merged.get("rotary_interleaved", False))
        self.config = model_config_from_args(merged, checkpoint_dtype(merged))

    def _index_layers(self) -> tuple[str, list[tuple[int, int]]]:
        """Layer prefix in use, and (stage, local index) of every global layer in order."""
        for prefix in LAYER_PREFIXES:
            pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
            stage_layers = []
            for stage, row in enumerate(self.stage_files):
                local = sorted({int(m[1]) for name in row[0] for m in [pattern.match(name)] if m})
                stage_layers += [(stage, index) for index in local]
            if stage_layers:
                return prefix, stage_layers
        raise CheckpointError(f"Megatron checkpoint {self.path} holds no transformer layers "
                              f"(looked for {' or '.join(p + 'N.' for p in LAYER_PREFIXES)})")

    def _find(self, stage: int, names: tuple[str, ...]) -> str | None:
        return next((name for name in names if name in self.stage_files[stage][0]), None)

    def _inferred_args(self) -> dict[str, Any]:
        """Hyper-parameters that follow from tensor shapes alone."""
        embedding = self._find(0, EMBEDDING_NAMES)
        stage, index = self.stage_layers[0]
        fc2 = self.stage_files[stage][0][find_piece(self.stage_files[stage][0], f"{self.layer_prefix}{index}.",
                                                   "fc2")]
        inferred = {"num_layers": len(self.stage_layers), "ffn_hidden_size": fc2.shape[1] * self.tp,
                    "hidden_size": fc2.shape[0],
                    "untie_embeddings_and_output_weights": self._find(self.pp - 1, OUTPUT_NAMES) is not None}
        if embedding is not None:
            inferred["padded_vocab_size"] = self.stage_files[0][0][embedding].shape[0] * self.tp
        return inferred

    def _vocab(self, stage: int, names: tuple[str, ...], what: str) -> torch.Tensor:
        name = self._find(stage, names)
        if name is None:
            raise CheckpointError(f"Megatron checkpoint {self.path} has no {what} (looked for {', '.join(names)})")
        weight = torch.cat([row[name] for row in self.stage_files[stage]])  # [padded vocab, H]
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(weight.shape) != expected:
            raise CheckpointError(f"Megatron {what} has shape {tuple(weight.shape)}, but the hyper-parameters need "
                                  f"{expected}: fix them with --model-arg padded_vocab_size=... / hidden_size=...")
        return weight

    def embedding(self) -> torch.Tensor:
        """The [vocab, H] word embedding, from the first pipeline stage."""
        return self._vocab(0, EMBEDDING_NAMES, "word embedding")

    def layer(self, layer_index: int) -> dict[str, torch.Tensor]:
        """Global layer ``layer_index`` under megakv's canonical keys."""
        if len(self.stage_layers) != self.config.num_layers:
            raise CheckpointError(f"Megatron checkpoint {self.path} holds {len(self.stage_layers)} layers, "
                                  f"but num_layers is {self.config.num_layers}")
        stage, index = self.stage_layers[layer_index]
        prefix = f"{self.layer_prefix}{index}."
        ranks = [{piece: row[find_piece(row, prefix, piece)] for piece in LAYER_PIECES}
                 for row in self.stage_files[stage]]
        return layer_from_pieces(merge_rank_pieces(ranks), self.config, self.rotary_interleaved)

    def final_norm(self) -> torch.Tensor:
        """The [H] final norm, from the last pipeline stage."""
        name = self._find(self.pp - 1, FINAL_NORM_NAMES)
        if name is None:
            raise CheckpointError(f"Megatron checkpoint {self.path} has no final norm "
                                  f"(looked for {', '.join(FINAL_NORM_NAMES)})")
        return self.stage_files[self.pp - 1][0][name]

    def lm_head(self) -> torch.Tensor | None:
        """The [vocab, H] output layer from the last stage, or None when tied to the embedding."""
        if self.config.tie_word_embeddings:
            return None
        return self._vocab(self.pp - 1, OUTPUT_NAMES, "output layer")

    def close(self) -> None:
        """Drop the memory-mapped rank files."""
        self.stage_files = []


class TorchDistMegatronReader:
    """A ``torch_dist`` checkpoint: every (layer, TP rank) chunk is read by its byte range, layer by layer."""

    def __init__(self, folder: Path, options: SourceOptions) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.path = folder
        try:
            self.metadata = FileSystemReader(str(folder)).read_metadata()
        except Exception as err:
            raise CheckpointError(f"cannot read torch_dist metadata in {folder}: {err}") from None
        self.tensors = {fqn: md for fqn, md in self.metadata.state_dict_metadata.items() if hasattr(md, "chunks")}
        common = torch_load(folder / "common.pt", mmap=False) if (folder / "common.pt").is_file() else {}
        ckpt_args = args_dict(common.get("args"))
        self.prefix = next((p for p in LAYER_PREFIXES if any(f.startswith(p) for f in self.tensors)), None)
        if self.prefix is None:
            raise CheckpointError(f"torch_dist checkpoint {folder} holds no transformer layers")
        qkv = self.tensors[find_piece(self.tensors, self.prefix, "qkv")]
        fc2 = self.tensors[find_piece(self.tensors, self.prefix, "fc2")]
        inferred = {"num_layers": qkv.size[0], "hidden_size": fc2.size[1], "ffn_hidden_size": fc2.size[2],
                    "untie_embeddings_and_output_weights": any(n in self.tensors for n in OUTPUT_NAMES)}
        embedding = next((n for n in EMBEDDING_NAMES if n in self.tensors), None)
        if embedding is not None:
            inferred["padded_vocab_size"] = self.tensors[embedding].size[0]
        merged = {**inferred, **ckpt_args, **options.model_args}
        self.rotary_interleaved = bool(merged.get("rotary_interleaved", False))
        self.config = model_config_from_args(merged, checkpoint_dtype(merged))

    def _read(self, fqn: str, layer_index: int | None = None) -> torch.Tensor:
        """Tensor ``fqn`` (only layer ``layer_index`` of a stacked one), assembled from its chunks."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        md = self.tensors[fqn]
        size = list(md.size) if layer_index is None else list(md.size)[1:]
        out = torch.empty(size, dtype=md.properties.dtype)
        for chunk in md.chunks:
            offsets, sizes = list(chunk.offsets), list(chunk.sizes)
            if layer_index is not None:
                if not offsets[0] <= layer_index < offsets[0] + sizes[0]:
                    continue
            info = self.metadata.storage_data[MetadataIndex(fqn, chunk.offsets)]
            if info.transform_descriptors:
                raise CheckpointError(f"torch_dist file {info.relative_path} is stored with transforms "
                                      f"{info.transform_descriptors}, which megakv does not read")
            with open(self.path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
            if layer_index is not None:
                data = data[layer_index - offsets[0]]
                offsets, sizes = offsets[1:], sizes[1:]
            region = out
            for dim, (start, length) in enumerate(zip(offsets, sizes)):
                region = region.narrow(dim, start, length)
            region.copy_(data)
        return out

    def _vocab(self, names: tuple[str, ...], what: str) -> torch.Tensor:
        name = next((n for n in names if n in self.tensors), None)
        if name is None:
            raise CheckpointError(f"torch_dist checkpoint {self.path} has no {what} (looked for {', '.join(names)})")
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(self.tensors[name].size) != expected:
            raise CheckpointError(f"Megatron {what} has shape {tuple(self.tensors[name].size)}, but the "
                                  f"hyper-parameters need {expected}")
        return self._read(name)

    def embedding(self) -> torch.Tensor:
        """The [vocab, H] word embedding."""
        return self._vocab(EMBEDDING_NAMES, "word embedding")

    def layer(self, layer_index: int) -> dict[str, torch.Tensor]:
        """Layer ``layer_index`` under megakv's canonical keys (fc1 is already ``[all gates; all ups]``)."""
        pieces = {piece: self._read(find_piece(self.tensors, self.prefix, piece), layer_index)
                  for piece in LAYER_PIECES}
        return layer_from_pieces(pieces, self.config, self.rotary_interleaved)

    def final_norm(self) -> torch.Tensor:
        """The [H] final norm."""
        name = next((n for n in FINAL_NORM_NAMES if n in self.tensors), None)
        if name is None:
            raise CheckpointError(f"torch_dist checkpoint {self.path} has no final norm")
        return self._read(name)

    def lm_head(self) -> torch.Tensor | None:
        """The [vocab, H] output layer, or None when tied to the embedding."""
        return None if self.config.tie_word_embeddings else self._vocab(OUTPUT_NAMES, "output layer")

    def close(self) -> None:
        """Nothing stays open between reads."""


def open_megatron(path: str | os.PathLike, options: SourceOptions) -> LegacyMegatronReader | TorchDistMegatronReader:
    """Open the Megatron checkpoint at ``path`` in whichever format it was saved."""
    folder = iteration_folder(Path(path), options.iteration)
    if (folder / DIST_METADATA).is_file():
        return TorchDistMegatronReader(folder, options)
    if any(RANK_DIR.match(p.name) for p in folder.iterdir()):
        return LegacyMegatronReader(folder, options)
    raise CheckpointError(f"{folder} is not a Megatron checkpoint iteration: looked for {LOOKED_FOR}")
