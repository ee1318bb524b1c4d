"""Chat prompts: a checkpoint's chat template, rendered with jinja2 the way Hugging Face transformers renders it.

transformers (``apply_chat_template``) compiles the template in an immutable
sandbox with ``trim_blocks`` and ``lstrip_blocks``, the loop-control extension,
a ``raise_exception`` function, ``strftime_now`` and a ``tojson`` filter that does
not escape HTML, and renders it with the messages, ``add_generation_prompt`` and
the tokenizer's special tokens (``bos_token``, ``eos_token``, ...). The same is
done here, so a prompt tokenizes to the ids a transformers user would get.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from megakv.checkpoint.format import CHAT_TEMPLATE_FILE, SPECIAL_TOKEN_NAMES, TOKENIZER_CONFIG_FILE

MESSAGE_KEYS = ("role", "content")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's tokenizer_config.json, or {} when it has none."""
    config_path = os.path.join(checkpoint_dir, TOKENIZER_CONFIG_FILE)
    if not os.path.exists(config_path):
        return {}
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {config_path}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"cannot read {config_path}: it is not a JSON object")
    return config


def special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """The special tokens (bos_token, eos_token, ...) a tokenizer config names, as strings."""
    tokens = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: text for name, text in tokens.items() if text is not None}


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Raise ValueError unless ``messages`` is a non-empty list of {"role": str, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{\"role\", \"content\"}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not all(isinstance(message.get(key), str) for key in MESSAGE_KEYS):
            raise ValueError(f"{where}: message {index} must be an object with string \"role\" and \"content\", "
                             f"got {message!r}")
    return messages


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                                   extensions=[jinja2.ext.loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = environment.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise ValueError(f"chat template does not compile: {err} (line {err.lineno})") from None
        self.special_tokens = dict(special_tokens)
        self.source = source

    @property
    def end_of_turn_token(self) -> str | None:
        """The token that closes an assistant turn: the tokenizer's EOS, as Hugging Face chat models set it."""
        return self.special_tokens.get("eos_token")

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike) -> ChatTemplate | None:
        """The template of ``chat_template.jinja``, else of ``tokenizer_config.json``; None when there is none."""
        config = read_tokenizer_config(checkpoint_dir)
        template_path = os.path.join(checkpoint_dir, CHAT_TEMPLATE_FILE)
        if os.path.exists(template_path):
            with open(template_path) as f:
                source = f.read()
        else:
            source = config.get("chat_template")
            # Some tokenizers keep several named templates; "default" is the one chat uses.
            if isinstance(source, list):
                source = next((item.get("template") for item in source if item.get("name") == "default"), None)
        if not isinstance(source, str):
            return None
        return cls(source, special_tokens(config))

    def render(self, messages: list[dict[str, str]], continue_final_message: bool = False,
               variables: dict[str, Any] | None = None) -> str:
        """The prompt text of a conversation, ending where the assistant's next turn begins (the template's
        ``add_generation_prompt``, true unless ``variables`` say otherwise), or with ``continue_final_message``
        inside the last message, right after its text, as transformers cuts it."""
        variables = {"add_generation_prompt": True, **self.special_tokens, **(variables or {})}
        try:
            text = self._template.render(messages=messages, **variables)
        except jinja2.exceptions.TemplateError as err:
            raise ValueError(f"chat template rejected the messages: {err}") from None
        if continue_final_message:
            final = messages[-1]["content"].strip()
            end = text.rfind(final) if final else -1
            if end < 0:
                raise ValueError("continue_final_message: the last message's text is not in the rendered prompt "
                                 "(the template changed it)")
            text = text[:end + len(final)]
        return text
