"""The checkpoint's tokenizer (``tokenizer.json``), read with the ``tokenizers`` library."""
from __future__ import annotations

import json
import os
import re

from tokenizers import Tokenizer

# A SentencePiece byte-fallback token (LLaMA 2, Mistral): one byte of a character the vocabulary lacks.
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte in the vocabulary's entries
    (printable bytes stand for themselves, the others for characters from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{chr(byte): byte for byte in printable}, **{chr(256 + index): byte for index, byte in enumerate(others)}}


_BYTE_LEVEL_ALPHABET = byte_level_alphabet()


class TooManyTokensError(ValueError):
    """A text has more tokens than its caller accepts: ``num_tokens`` of them, or at least that many."""

    def __init__(self, num_tokens: int, exact: bool = True) -> None:
        self.count = f"{'' if exact else 'at least '}{num_tokens}"
        super().__init__(f"{self.count} tokens")
        self.num_tokens = num_tokens


def max_bytes_per_token(config: dict) -> int | None:
    """The most bytes of text one token covers, for a byte-level BPE tokenizer without a normalizer (GPT-2, LLaMA 3,
    SmolLM2, Qwen): each character of its vocabulary's entries stands for one byte, and an added token covers its
    own content. None for other tokenizers, whose normalizer or pre-tokenizer may change the text's length."""
    pre_tokenizer, model = config.get("pre_tokenizer") or {}, config.get("model") or {}
    if config.get("normalizer") is not None or pre_tokenizer.get("type") != "ByteLevel" or model.get("type") != "BPE":
        return None
    added = [len(token["content"].encode("utf-8")) for token in config.get("added_tokens") or ()]
    return max([*map(len, model["vocab"]), *added], default=None)


class TextTokenizer:
    """Encodes prompts and decodes generated ids with the tokenizer shipped in a checkpoint."""

    def __init__(self, path: str) -> None:
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as err:  # the tokenizers library raises a bare Exception for a bad file
            raise ValueError(f"cannot read tokenizer {path}: {err}") from None
        config = json.loads(self._tokenizer.to_str())
        self._max_bytes_per_token = max_bytes_per_token(config)
        self._byte_level = (config.get("model") or {}).get("type") == "BPE" and "ByteLevel" in json.dumps(
            config.get("decoder"))
        self._added_tokens = {token["id"] for token in config.get("added_tokens") or ()}

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str) -> TextTokenizer | None:
        path = os.path.join(checkpoint_dir, "tokenizer.json")
        return cls(path) if os.path.exists(path) else None

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """Token ids of ``text``; a chat prompt passes False, as its template already wrote the special tokens.

        The tokenizers library releases the GIL in its batch calls only, so a long text is encoded as a batch of
        one: the server's event loop runs meanwhile. With ``max_tokens``, a text of more tokens raises
        TooManyTokensError before its ids become a Python list, and one that has more tokens by its length alone
        (see max_bytes_per_token) before it is encoded: both the list and freeing an encoding hold the GIL, for
        a fraction of a second at millions of tokens.
        """
        if max_tokens is not None and self._max_bytes_per_token is not None:
            at_least = -(-len(text.encode("utf-8", "surrogatepass")) // self._max_bytes_per_token)
            if at_least > max_tokens:
                raise TooManyTokensError(at_least, exact=False)
        encoding = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        if max_tokens is not None and len(encoding) > max_tokens:
            raise TooManyTokensError(len(encoding))
        return encoding.ids

    def token_to_id(self, token: str) -> int | None:
        """The id of one token of the vocabulary, or None when it has no such token."""
        return self._tokenizer.token_to_id(token)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``, special tokens left out unless asked (a batch of one releases the GIL, see
        encode)."""
        return self._tokenizer.decode_batch([token_ids], skip_special_tokens=skip_special_tokens)[0]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text one token stands for, also when they are part of a character (which its decoding
        alone shows as U+FFFD): what OpenAI's chat logprobs report as a token's ``bytes``."""
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None or token_id in self._added_tokens:
            return self.decode([token_id], skip_special_tokens=False).encode("utf-8")
        if self._byte_level:
            alphabet = _BYTE_LEVEL_ALPHABET
            if all(character in alphabet for character in piece):
                return bytes(alphabet[character] for character in piece)
        fallback = BYTE_FALLBACK.fullmatch(piece)
        if fallback is not None:
            return bytes([int(fallback.group(1), 16)])
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")
