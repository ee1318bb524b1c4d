"""Incremental detokenization equals decoding the whole output; stop strings cut the text at their first match."""
from __future__ import annotations

import pytest

from megakv.server.text import IncrementalDecoder, StopStringMatcher
from megakv.tokenizer import TextTokenizer

TEXT = "Grüße, 世界! naïve café 🙂 end"


@pytest.fixture(scope="module")
def tokenizer(chat_model) -> TextTokenizer:
    return TextTokenizer(str(chat_model[1] / "tokenizer.json"))


@pytest.mark.parametrize("step", [1, 2, 3])
def test_incremental_decoder_concatenates_to_the_whole_decoding(tokenizer, step):
    prompt = tokenizer.encode("Say: ")
    # Byte-level tokens: the multi-byte characters arrive a byte at a time.
    output = tokenizer.encode(TEXT, add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer, prompt)
    pieces = [decoder.push(output[start:start + step]) for start in range(0, len(output), step)]
    assert "".join(pieces) == tokenizer.decode(output) == TEXT
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_string_matcher_holds_back_a_partial_match_and_cuts_at_the_first():
    matcher = StopStringMatcher(["STOP", "xy"])
    released = [matcher.feed(piece, final=False) for piece in ("ab", "c", "ST", "O", "Pxyz")]
    # Up to 3 characters (one fewer than "STOP") wait until they cannot start it.
    assert released == ["", "", "ab", "c", ""]
    assert matcher.matched == "STOP"


def test_stop_string_matcher_releases_everything_at_the_end_without_a_match():
    matcher = StopStringMatcher(["nevermore"])
    # The last 8 characters (one fewer than "nevermore") wait.
    assert matcher.feed("once and for all, never", final=False) == "once and for al"
    assert matcher.feed(" again", final=True) == "l, never again" and matcher.matched is None
    assert StopStringMatcher([]).feed("all at once", final=False) == "all at once"
