"""The tokenizer and chat template of a GGUF file, written as Hugging Face tokenizer files.

transformers rebuilds a ``tokenizers`` tokenizer from the ``tokenizer.ggml.*``
metadata (vocabulary, merges, pre-tokenizer, special tokens); it is saved as
``tokenizer.json``, the special tokens as ``tokenizer_config.json`` and the
``tokenizer.chat_template`` metadata as ``chat_template.jinja``, so a converted
checkpoint encodes text and renders chats without the GGUF file.
"""
from __future__ import annotations

import json
from pathlib import Path

from megakv.checkpoint.format import CHAT_TEMPLATE_FILE, SPECIAL_TOKEN_NAMES, TOKENIZER_CONFIG_FILE, CheckpointError


def write_gguf_tokenizer(gguf_path: Path, folder: Path, chat_template: str | None) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and (with a template) ``chat_template.jinja``."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(f"GGUF file {gguf_path} has a tokenizer, and converting it needs transformers: "
                              f"pip install transformers") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"cannot convert the tokenizer of GGUF file {gguf_path}: {err}") from None
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    config.update({name: getattr(tokenizer, name) for name in SPECIAL_TOKEN_NAMES
                   if getattr(tokenizer, name, None) is not None})
    with open(folder / TOKENIZER_CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if chat_template is not None:
        (folder / CHAT_TEMPLATE_FILE).write_text(chat_template)
