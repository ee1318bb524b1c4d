"""Reading a megakv checkpoint back as unsharded layers (``--source megakv``): resharding and export.

Every rank's shard file is opened with ``safe_open``, which memory-maps it; a
layer is assembled from the ranks' tensors with :func:`sharding.unshard_layer`,
so memory holds one layer at a time.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from megakv.checkpoint.format import CheckpointError, read_checkpoint_info
from megakv.checkpoint.options import SourceOptions
from megakv.checkpoint.sharding import (EMBEDDING, FINAL_NORM, OUTPUT_LAYER, layer_prefix, layer_shard_shapes,
                                        unshard_layer, unshard_vocab)


class MegakvReader:
    """A megakv checkpoint folder at any TP degree, read one unsharded layer at a time."""

    def __init__(self, path: str | os.PathLike, options: SourceOptions | None = None) -> None:
        self.info = read_checkpoint_info(path)
        self.path = self.info.path
        self.config = self.info.model
        self._shards: list[Any] = []
        for rank in range(self.info.tensor_parallel_size):
            try:
                self._shards.append(safe_open(self.info.shard_path(rank), framework="pt"))
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"checkpoint shard {self.info.shard_path(rank)} is corrupt: {err}") from None

    def _gather(self, name: str) -> list[torch.Tensor]:
        try:
            return [shard.get_tensor(name) for shard in self._shards]
        except SafetensorError as err:
            raise CheckpointError(f"checkpoint {self.path}: cannot read tensor {name!r}: {err}") from None

    def embedding(self) -> torch.Tensor:
        """The [vocab_size, H] token embedding without padding rows."""
        return unshard_vocab(self._gather(EMBEDDING), self.config)

    def layer(self, layer_index: int) -> dict[str, torch.Tensor]:
        """Layer ``layer_index`` unsharded to the canonical keys of ``sharding.LAYER_KEYS``."""
        prefix = layer_prefix(layer_index)
        per_key = {key: self._gather(prefix + key) for key in layer_shard_shapes(self.config, len(self._shards))}
        ranks = [{key: tensors[rank] for key, tensors in per_key.items()} for rank in range(len(self._shards))]
        return unshard_layer(ranks, self.config)

    def final_norm(self) -> torch.Tensor:
        """The [H] final norm (replicated on every rank)."""
        return self._gather(FINAL_NORM)[0]

    def lm_head(self) -> torch.Tensor | None:
        """The [vocab_size, H] output layer, or None when tied to the embedding."""
        return None if self.config.tie_word_embeddings else unshard_vocab(self._gather(OUTPUT_LAYER), self.config)

    def close(self) -> None:
        """Release the memory-mapped shard files."""
        self._shards = []
