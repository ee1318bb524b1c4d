"""megakv serve on one process, through the real openai client: tokens equal Hugging Face's greedy decode, and
`megakv generate`'s for the same prompts."""
from __future__ import annotations

import json
import subprocess

import httpx
import pytest
from openai import OpenAI
from transformers import PreTrainedTokenizerFast

from server_process import CHAT_TEMPLATE, MEGAKV

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference_tokenizer(chat_model) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(chat_model[0])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_completions_greedy_text_prompt_equals_hugging_face(client, chat_model, hf_greedy, reference_tokenizer):
    prompt_ids = reference_tokenizer.encode("Once upon a time")
    (expected,) = hf_greedy(chat_model[0], [prompt_ids], MAX_TOKENS)
    response = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=MAX_TOKENS,
                                         temperature=0, extra_body={"return_token_ids": True})
    (choice,) = response.choices
    assert choice.token_ids == expected and choice.prompt_token_ids == prompt_ids
    assert choice.text == reference_tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if len(expected) < MAX_TOKENS else "length")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt_ids), len(expected))
    assert response.usage.total_tokens == len(prompt_ids) + len(expected)
    assert response.model == "tiny" and response.object == "text_completion"


def test_completions_token_id_prompts_give_one_choice_each(client, chat_model, hf_greedy):
    prompts = [[5, 80, 33, 120, 7], list(range(40, 70))]
    expected = hf_greedy(chat_model[0], prompts, MAX_TOKENS)
    response = client.completions.create(model="tiny", prompt=prompts, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"return_token_ids": True})
    assert [choice.index for choice in response.choices] == [0, 1]
    assert [choice.token_ids for choice in response.choices] == expected
    assert response.usage.prompt_tokens == 35 and response.usage.completion_tokens == sum(map(len, expected))


def test_completions_stream_concatenates_to_the_whole_response_with_usage(client):
    whole = client.completions.create(model="tiny", prompt="The sky", max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="The sky", max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == whole.choices[0].text
    assert [choice.finish_reason for chunk in chunks for choice in chunk.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_completions_echo_prepends_the_prompt(client):
    plain = client.completions.create(model="tiny", prompt="Echo me", max_tokens=4, temperature=0)
    echoed = client.completions.create(model="tiny", prompt="Echo me", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "Echo me" + plain.choices[0].text


def test_completions_stop_string_cuts_the_text_and_stop_token_ends_it(client, reference_tokenizer):
    whole = client.completions.create(model="tiny", prompt="Stop here", max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0]
    stop = whole.text[4:6]
    expected_text = whole.text[:whole.text.index(stop)]
    for stream in (False, True):
        response = client.completions.create(model="tiny", prompt="Stop here", max_tokens=MAX_TOKENS, temperature=0,
                                             stop=[stop], stream=stream, extra_body={"ignore_eos": True})
        choices = [choice for chunk in response for choice in chunk.choices] if stream else response.choices
        assert "".join(choice.text for choice in choices) == expected_text
        assert choices[-1].finish_reason == "stop" and choices[-1].stop_reason == stop
    stop_token = whole.token_ids[5]
    first = whole.token_ids.index(stop_token)
    response = client.completions.create(model="tiny", prompt="Stop here", max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"return_token_ids": True, "ignore_eos": True,
                                                     "stop_token_ids": [stop_token]})
    choice = response.choices[0]
    assert choice.token_ids == whole.token_ids[:first + 1]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop_token


def test_kv_placement_is_reported_when_asked_whole_streamed_and_cut_by_a_stop_string(client):
    plain = client.completions.create(model="tiny", prompt=list(range(40, 70)), max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert "kv_placement" not in plain.choices[0].model_extra
    # One instance of 16-token blocks: every block local, and the last token sampled has no KV yet.
    expected = {"instance": 0, "num_local_blocks": -(-(30 + MAX_TOKENS - 1) // 16), "num_remote_blocks": 0,
                "block_instances": [0]}
    whole = client.completions.create(model="tiny", prompt=list(range(40, 70)), max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True, "return_kv_placement": True})
    assert whole.choices[0].kv_placement == expected
    chunks = list(client.completions.create(model="tiny", prompt=list(range(40, 70)), max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True, "return_kv_placement": True}))
    assert [choice.model_extra.get("kv_placement") for chunk in chunks for choice in chunk.choices][-1] == expected
    assert all("kv_placement" not in choice.model_extra for chunk in chunks[:-1] for choice in chunk.choices)
    cut = client.completions.create(model="tiny", prompt=list(range(40, 70)), max_tokens=MAX_TOKENS, temperature=0,
                                    stop=[plain.choices[0].text[2:4]],
                                    extra_body={"ignore_eos": True, "return_kv_placement": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].kv_placement["num_local_blocks"] >= 2


def test_completions_seeded_sampling_repeats(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="tiny", prompt="Random", max_tokens=MAX_TOKENS, temperature=1.0,
                                         top_p=0.9, seed=seed, extra_body={"top_k": 50, "ignore_eos": True,
                                                                           "return_token_ids": True}
                                         ).choices[0].token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_completions_n_samples_each_prompt_as_vllm_seeds_them(client):
    prompts = [[5, 80, 33], list(range(40, 60))]

    def sample(prompt: list[int], seed: int) -> list[int]:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True, "return_token_ids": True}
                                         ).choices[0].token_ids

    response = client.completions.create(model="tiny", prompt=prompts, n=3, max_tokens=6, temperature=1.0, seed=7,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    # Choice i * n + j is sample j of prompt i, seeded with seed + j.
    assert [choice.index for choice in response.choices] == list(range(6))
    assert [choice.token_ids for choice in response.choices] == \
        [sample(prompt, 7 + index) for prompt in prompts for index in range(3)]
    assert len({tuple(choice.token_ids) for choice in response.choices[:3]}) > 1
    # Each prompt counts once, each choice's tokens once.
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (23, 36)

    greedy = client.completions.create(model="tiny", prompt="The sky", n=2, max_tokens=MAX_TOKENS, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text


def assert_same_counts_and_cached_prompt(again, first) -> None:
    """A request sent again counts the same tokens, and its prompt's full blocks (16 tokens each, its last token
    left out) came from the prefix cache that the first one filled."""
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(again, key) for key in counts] == [getattr(first, key) for key in counts]
    assert first.prompt_tokens_details.cached_tokens == 0
    assert again.prompt_tokens_details.cached_tokens == (again.prompt_tokens - 1) // 16 * 16


def test_chat_n_streams_each_choice_under_its_index(client):
    messages = [{"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=MAX_TOKENS,
                                           temperature=1.0, seed=3)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=MAX_TOKENS,
                                                 temperature=1.0, seed=3, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = ["".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices
                        if choice.index == index) for index in range(2)]
    assert streamed == [choice.message.content for choice in whole.choices]
    assert_same_counts_and_cached_prompt(chunks[-1].usage, whole.usage)


def test_chat_renders_the_template_and_decodes_greedily(client, chat_model, hf_greedy, reference_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt_ids = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]
    (expected,) = hf_greedy(chat_model[0], [prompt_ids], MAX_TOKENS)
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"return_token_ids": True})
    (choice,) = response.choices
    assert choice.prompt_token_ids == prompt_ids and choice.token_ids == expected
    assert choice.message.role == "assistant"
    assert choice.message.content == reference_tokenizer.decode(expected, skip_special_tokens=True)
    assert response.usage.prompt_tokens == len(prompt_ids) and response.object == "chat.completion"

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == \
        choice.message.content
    assert_same_counts_and_cached_prompt(chunks[-1].usage, response.usage)
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason


def test_chat_text_parts_equal_a_string_content(client):
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    as_parts = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                              max_tokens=4, temperature=0)
    as_string = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi there"}],
                                               max_tokens=4, temperature=0)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def test_models_health_version_tokenize_detokenize(server, client, reference_tokenizer):
    (card,) = client.models.list().data
    assert card.id == "tiny" and card.max_model_len == 1024  # 64 blocks of 16 tokens
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    text = "Grüße, megakv!"
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "prompt": text}).json()
    assert tokens["tokens"] == reference_tokenizer.encode(text) and tokens["count"] == len(tokens["tokens"])
    messages = [{"role": "user", "content": "Hi"}]
    chat_tokens = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    assert chat_tokens == reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                  tokenize=True, return_dict=True)["input_ids"]
    decoded = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert decoded == {"prompt": text}


def test_max_tokens_defaults_to_vllm_s_or_to_the_operator_s(chat_model, start_server):
    def default_lengths(server) -> tuple[int, int]:
        """Tokens generated for a completion and a chat that set no max_tokens, and the room the chat's prompt
        leaves."""
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
        completion = client.completions.create(model="tiny", prompt=[5, 6, 7], extra_body={"ignore_eos": True})
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              extra_body={"ignore_eos": True})
        assert chat.choices[0].finish_reason == "length"
        return completion.usage.completion_tokens, chat.usage.completion_tokens, 128 - chat.usage.prompt_tokens

    # Pools of 8 blocks of 16 tokens: a request may hold 128 tokens.
    completion, chat, room = default_lengths(start_server(chat_model[1], "--num-blocks", "8",
                                                          "--served-model-name", "tiny"))
    assert (completion, chat) == (16, room)
    operator_set = start_server(chat_model[1], "--num-blocks", "8", "--served-model-name", "tiny",
                                "--max-new-tokens", "5")
    assert default_lengths(operator_set)[:2] == (5, 5)


def test_greedy_tokens_equal_megakv_generate_for_the_same_prompts(client, chat_model, tmp_path):
    messages = [{"role": "user", "content": "Hi there"}]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "Once upon a time"}, {"prompt_ids": [5, 80, 33, 120, 7]}, {"messages": messages}]) + "\n")
    generated = subprocess.run([MEGAKV, "generate", "--model", str(chat_model[1]), "--prompts-file",
                                str(prompts_file), "--max-new-tokens", str(MAX_TOKENS), "--json", "--dtype", "float32"],
                               capture_output=True, text=True, check=True, timeout=120)
    expected = [json.loads(line)["token_ids"] for line in generated.stdout.splitlines()]
    served = [client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"return_token_ids": True}).choices[0].token_ids
              for prompt in ("Once upon a time", [5, 80, 33, 120, 7])]
    served.append(client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, extra_body={"return_token_ids": True}
                                                 ).choices[0].token_ids)
    assert served == expected
