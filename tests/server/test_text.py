"""Incremental detokenization equals decoding the whole output; stop strings cut the text at their first match; a
text over a token limit is refused, by its length alone where that suffices."""
from __future__ import annotations

import pytest

from megakv.server.text import IncrementalDecoder, StopStringMatcher
from megakv.tokenizer import TextTokenizer, TooManyTokensError, max_bytes_per_token

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


def test_encode_with_max_tokens_counts_exactly_or_bounds_by_length(tokenizer):
    text = "ab " * 50
    num_tokens = len(tokenizer.encode(text))
    assert tokenizer.encode(text, max_tokens=num_tokens) == tokenizer.encode(text)
    with pytest.raises(TooManyTokensError) as exact:
        tokenizer.encode(text, max_tokens=num_tokens - 1)
    assert exact.value.num_tokens == num_tokens and exact.value.count == str(num_tokens)
    # A byte-level BPE token covers at most its longest entry's bytes: a long text is refused before encoding.
    with pytest.raises(TooManyTokensError) as bounded:
        tokenizer.encode("é" * 10_000, max_tokens=100)
    assert bounded.value.count.startswith("at least ") and bounded.value.num_tokens > 100


def test_max_bytes_per_token_only_for_byte_level_bpe_without_normalizer():
    vocab = {"a": 0, "ab": 1, "Ġabc": 2}
    config = {"normalizer": None, "pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": vocab},
              "added_tokens": [{"content": "<|im_start|>"}]}
    assert max_bytes_per_token(config) == len("<|im_start|>")
    assert max_bytes_per_token({**config, "added_tokens": []}) == 4
    assert max_bytes_per_token({**config, "normalizer": {"type": "NFKC"}}) is None
    assert max_bytes_per_token({**config, "pre_tokenizer": {"type": "Metaspace"}}) is None
