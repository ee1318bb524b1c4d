"""megakv's chat template rendering equals transformers' apply_chat_template on the same tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from megakv.chat import ChatTemplate, check_messages

# LLaMA-2 style: the BOS variable, raise_exception, and block tags on their own lines that
# trim_blocks / lstrip_blocks must swallow.
LLAMA2_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}
    {% set messages = messages[1:] %}
{% else %}
    {% set system = '' %}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
    {% else %}
        {{ ' ' + message['content'] + ' ' + eos_token }}
    {% endif %}
{% endfor %}
"""
# ChatML with tojson (no HTML escaping, non-ASCII kept), a namespace and loop controls.
CHATML_TEMPLATE = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] == 'tool' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
<|im_start|>{{ message['role'] }} {{ message['content'] | tojson }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant ({{ ns.count }} turns)
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief <b>& exact</b>."}, {"role": "user", "content": "Grüße, 世界!"},
     {"role": "assistant", "content": "Hallo."}, {"role": "user", "content": "  spaces\n and lines  "}],
    [{"role": "user", "content": "a"}, {"role": "tool", "content": "{\"x\": 1}"}, {"role": "assistant", "content": "b"}],
]


def save_hf_tokenizer(folder: Path, template: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with <s>/</s> and ``template``, saved by transformers into ``folder``."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.mark.parametrize("template", [LLAMA2_TEMPLATE, CHATML_TEMPLATE], ids=["llama2", "chatml"])
def test_chat_template_renders_as_transformers(template, tmp_path):
    reference = save_hf_tokenizer(tmp_path, template)
    chat = ChatTemplate.from_checkpoint(tmp_path)
    for messages in CONVERSATIONS:
        if template is LLAMA2_TEMPLATE and messages[-1]["role"] == "assistant":
            continue
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chat.render(messages) == expected


def test_chat_template_read_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML_TEMPLATE}],
         "eos_token": {"content": "<|im_end|>", "special": True}, "bos_token": "<s>"}))
    chat = ChatTemplate.from_checkpoint(tmp_path)
    assert chat.end_of_turn_token == "<|im_end|>"
    assert chat.render(CONVERSATIONS[0]).endswith("<|im_start|>assistant (1 turns)\n")
    assert ChatTemplate.from_checkpoint(tmp_path / "nothing-here") is None


def test_chat_template_raise_exception_is_a_value_error(tmp_path):
    save_hf_tokenizer(tmp_path, LLAMA2_TEMPLATE)
    chat = ChatTemplate.from_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="chat template rejected the messages: Conversation roles must alternate"):
        chat.render([{"role": "assistant", "content": "first"}])
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}", {})


@pytest.mark.parametrize("messages,fragment", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user"}], "message 0 must be an object with string \"role\" and \"content\""),
    ([{"role": "user", "content": "a"}, {"role": 1, "content": "b"}], "message 1"),
])
def test_chat_check_messages_names_the_bad_message(messages, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_messages(messages, "prompts.jsonl:3")
