"""Generated tokens to text as they arrive: incremental detokenization, and stop strings.

Decoding each new token alone breaks characters that span tokens (a byte-level BPE
splits UTF-8) and spaces that a tokenizer's decoder adds or drops at word starts.
As vLLM does, the new text is the decoding of a short window that starts a few
tokens back, minus the decoding of that window without the new tokens, and text
ending in an incomplete character (U+FFFD) waits for the next token.
"""
from __future__ import annotations

from megakv.tokenizer import TextTokenizer

# Tokens decoded before the new ones, so that the decoder sees their context.
CONTEXT_TOKENS = 5
INCOMPLETE_CHARACTER = "\ufffd"


class IncrementalDecoder:
    """Turns a growing list of token ids into the text each addition appends."""

    def __init__(self, tokenizer: TextTokenizer, context_ids: list[int] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The prompt's last tokens give the first generated ones their context.
        self._ids = list(context_ids)[-CONTEXT_TOKENS:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, new_ids: list[int]) -> str:
        """The text that ``new_ids`` add ("" while a character is incomplete)."""
        self._ids.extend(new_ids)
        skip = self._skip_special_tokens
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], skip)
        text = self._tokenizer.decode(self._ids[self._prefix_offset:], skip)
        if len(text) <= len(prefix_text) or text.endswith(INCOMPLETE_CHARACTER):
            return ""
        self._prefix_offset = max(self._prefix_offset, self._read_offset - CONTEXT_TOKENS)
        self._read_offset = len(self._ids)
        return text[len(prefix_text):]


class StopStringMatcher:
    """Holds back text that may be the start of a stop string, and cuts the text at the first one (after it, with
    ``include_stop_string``)."""

    def __init__(self, stop_strings: list[str], include_stop_string: bool = False) -> None:
        self.stop_strings = [stop for stop in stop_strings if stop]
        self._include = include_stop_string
        self._hold = max((len(stop) for stop in self.stop_strings), default=1) - 1
        self._text = ""
        self._num_released = 0
        # The stop string that ended the text, once one appeared.
        self.matched: str | None = None

    def feed(self, new_text: str, final: bool, match: bool = True) -> str:
        """Add generated text; returns what can be released now (all of it when ``final``). Without ``match``
        (before min_tokens), the new text is not searched, though a stop string may start in it, as in vLLM."""
        search_from = max(0, len(self._text) - self._hold)
        self._text += new_text
        found = [(self._text.find(stop, search_from), stop) for stop in self.stop_strings] if match else []
        found = [(index, stop) for index, stop in found if index >= 0]
        if found:
            index, self.matched = min(found)
            self._text = self._text[:index + (len(self.matched) if self._include else 0)]
            final = True
        end = len(self._text) if final else max(self._num_released, len(self._text) - self._hold)
        released, self._num_released = self._text[self._num_released:end], end
        return released
