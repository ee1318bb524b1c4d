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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; a chat prompt passes False, as its template already wrote the special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def token_to_id(self, token: str) -> int | None:
        """The id of one token of the vocabulary, or None when it has no such token."""
        return self._tokenizer.token_to_id(token)

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)
