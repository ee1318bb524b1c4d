"""The checkpoint's tokenizer (``tokenizer.json``), read with the ``tokenizers`` library."""
from __future__ import annotations

import os

from tokenizers import Tokenizer


class TextTokenizer:
    """Encodes prompts and decodes generated ids with the tokenizer shipped in a checkpoint."""

    def __init__(self, path: str) -> None:
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as err:  # the tokenizers library raises a bare Exception for a bad file
            raise ValueError(f"cannot read tokenizer {path}: {err}") from None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str) -> TextTokenizer | None:
        path = os.path.join(checkpoint_dir, "tokenizer.json")
        return cls(path) if os.path.exists(path) else None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)
