"""Each parameter of the guide's tables reaches vLLM's engine and changes what it does.

Through the official ``openai`` SDK (vLLM's extras via ``extra_body``, as a
user would send them). Greedy decoding (temperature 0) makes most effects
exact; small ``max_tokens`` keeps the CPU engine quick.
"""

from __future__ import annotations

import json

import pytest

from conformance import NO, PY, YES, Row

C = "POST /completions"
H = "POST /chat/completions"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say yes or no."}]


@pytest.fixture(scope="module")
def tok(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model_dir))


@pytest.fixture(scope="module")
def c(openai_client, runtime_server):
    """complete(**kw) -> CompletionResponse for the served model."""

    def complete(prompt=PROMPT, **kw):
        extra = {k: kw.pop(k) for k in list(kw) if k in EXTRAS}
        model = runtime_server.model
        return openai_client.completions.create(model=model, prompt=prompt, extra_body=extra or None, **kw)

    return complete


@pytest.fixture(scope="module")
def chat(openai_client, runtime_server):
    def create(messages=CHAT, **kw):
        extra = {k: kw.pop(k) for k in list(kw) if k in EXTRAS}
        return openai_client.chat.completions.create(
            model=runtime_server.model, messages=messages, extra_body=extra or None, **kw
        )

    return create


EXTRAS = {
    "best_of", "top_k", "ignore_eos", "use_beam_search", "stop_token_ids", "skip_special_tokens",
    "spaces_between_special_tokens", "add_generation_prompt", "echo", "repetition_penalty", "min_p",
    "length_penalty", "include_stop_str_in_output",
}  # fmt: skip


@pytest.mark.conformance(
    Row(C, "max_tokens", PY, NO),
    Row(H, "max_tokens", PY, NO),
)
def test_max_tokens_bounds_completion_tokens(c, chat):
    r = c(max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = chat(max_tokens=2, temperature=0, ignore_eos=True)
    assert r.usage.completion_tokens == 2


@pytest.mark.conformance(Row(C, "temperature", PY, NO))
def test_temperature_zero_is_deterministic(c):
    a = c(max_tokens=8, temperature=0).choices[0].text
    b = c(max_tokens=8, temperature=0).choices[0].text
    assert a == b and a


@pytest.mark.conformance(Row(C, "seed", PY, NO))
def test_seed_reproduces_a_sampled_answer(c):
    kw = dict(max_tokens=12, temperature=1.5, top_p=1.0)
    a = c(seed=1234, **kw).choices[0].text
    b = c(seed=1234, **kw).choices[0].text
    assert a == b
    # Different seeds give different samples (at temperature 1.5, 12 tokens).
    others = {c(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert len(others | {a}) > 1


@pytest.mark.conformance(Row(C, "n", PY, NO), Row(H, "n", PY, NO))
def test_n_gives_n_choices(c, chat):
    r = c(n=3, max_tokens=2, temperature=1.0, seed=5)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert len(chat(n=2, max_tokens=2).choices) == 2


@pytest.mark.conformance(
    Row(C, "stop (string and list)", PY, NO),
    Row(C, "include_stop_str_in_output", PY, NO),
)
def test_stop_string_and_list_and_include_stop_str(c):
    full = c(max_tokens=10, temperature=0).choices[0].text  # " Paris.\n\nThe answer is:" or so
    word = full.strip().split()[0][:3]  # a piece of the first word
    assert word
    r = c(max_tokens=10, temperature=0, stop=word)
    assert word not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    assert full.startswith(r.choices[0].text)
    r = c(max_tokens=10, temperature=0, stop=["zzzz-never", word])
    assert word not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    r = c(max_tokens=10, temperature=0, stop=[word], include_stop_str_in_output=True)
    assert r.choices[0].text.endswith(word)


@pytest.mark.conformance(Row(C, "echo", PY, NO))
def test_echo_prefixes_the_prompt(c):
    r = c(max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].text) > len(PROMPT)


@pytest.mark.conformance(
    Row(C, "logprobs", PY, NO),
    Row(H, "logprobs, top_logprobs", PY, NO),
)
def test_logprobs_are_returned(c, chat):
    r = c(max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    r = chat(max_tokens=2, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 2 and all(len(t.top_logprobs) == 2 for t in content)


@pytest.mark.conformance(
    Row(C, "top_p", PY, NO),
    Row(C, "top_k", PY, NO),
    Row(C, "min_p", PY, NO),
)
def test_top_p_top_k_min_p_narrow_sampling_to_greedy(c):
    greedy = c(max_tokens=8, temperature=0).choices[0].text
    # Each of these alone leaves only the most likely token at every step, so
    # a hot temperature still gives the greedy text: the value reached the sampler.
    for kw in ({"top_p": 1e-6}, {"top_k": 1}, {"min_p": 1.0}):
        assert c(max_tokens=8, temperature=2.0, seed=7, **kw).choices[0].text == greedy, kw


@pytest.mark.conformance(
    Row(C, "presence_penalty", PY, NO),
    Row(C, "frequency_penalty", PY, NO),
    Row(C, "repetition_penalty", PY, NO),
)
def test_penalties_change_greedy_output(c):
    prompt = "one two one two one two one two one two"
    base = c(prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 2.0}):
        assert c(prompt=prompt, max_tokens=8, temperature=0, **kw).choices[0].text != base, kw


@pytest.mark.conformance(Row(C, "logit_bias", PY, NO))
def test_logit_bias_forces_a_token(c, tok):
    token_id = tok.encode(" banana", add_special_tokens=False)[0]
    r = c(max_tokens=3, temperature=0, logit_bias={str(token_id): 100})
    assert r.choices[0].text == tok.decode([token_id] * 3)


@pytest.mark.conformance(Row(C, "user", PY, NO), Row(H, "user", PY, NO))
def test_user_is_accepted(c, chat):
    assert c(max_tokens=1, user="user-123").choices[0].text is not None
    assert chat(max_tokens=1, user="user-123").choices


@pytest.mark.conformance(Row(H, "ignore_eos", PY, NO))
def test_ignore_eos_generates_past_the_end(chat):
    r = chat(max_tokens=48, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 48  # the model stops by itself
    r = chat(max_tokens=48, temperature=0, ignore_eos=True)
    assert r.usage.completion_tokens == 48 and r.choices[0].finish_reason == "length"


@pytest.mark.conformance(Row(C, "stop_token_ids", PY, NO))
def test_stop_token_ids_end_generation(c, tok):
    full = c(max_tokens=10, temperature=0)
    ids = tok.encode(full.choices[0].text, add_special_tokens=False)
    stop_id = ids[2]
    r = c(max_tokens=10, temperature=0, stop_token_ids=[stop_id])
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.usage.completion_tokens


@pytest.mark.conformance(Row(C, "skip_special_tokens", PY, NO))
def test_skip_special_tokens(c, tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    kw = dict(max_tokens=3, temperature=0, logit_bias={str(im_end): 100}, ignore_eos=True)
    assert c(**kw).choices[0].text == ""  # default: special tokens skipped
    assert c(skip_special_tokens=False, **kw).choices[0].text == "<|im_end|>" * 3
    # spaces_between_special_tokens: with this model's fast tokenizer vLLM's
    # detokenizer gives the same text either way, so no output here can show
    # it; tests/unit/test_runtime_app.py checks at our seam that the value
    # reaches vLLM's SamplingParams.


@pytest.mark.conformance(Row(H, "add_generation_prompt", PY, NO))
def test_add_generation_prompt_changes_the_prompt(chat):
    with_prompt = chat(max_tokens=1, temperature=0).usage.prompt_tokens
    without = chat(max_tokens=1, temperature=0, add_generation_prompt=False).usage.prompt_tokens
    assert with_prompt > without  # "<|im_start|>assistant\n" is no longer appended


@pytest.mark.conformance(
    Row(C, "use_beam_search, best_of (beam width)", PY, NO),
    Row(H, "use_beam_search, length_penalty", PY, NO),
)
def test_beam_search_best_of_and_length_penalty(c, chat):
    r = c(max_tokens=8, temperature=0, use_beam_search=True, n=2)
    assert len(r.choices) == 2 and r.choices[0].text != r.choices[1].text
    # best_of is the beam width; the best n come back.
    r = c(max_tokens=8, temperature=0, use_beam_search=True, best_of=2)
    assert len(r.choices) == 1
    short = chat(max_tokens=20, temperature=0, use_beam_search=True, n=4, length_penalty=0.0)
    long = chat(max_tokens=20, temperature=0, use_beam_search=True, n=4, length_penalty=5.0)
    # A high length penalty favours longer finished beams.
    assert sum(len(ch.message.content) for ch in long.choices) > sum(len(ch.message.content) for ch in short.choices)


def test_best_of_without_beam_search(c):
    assert len(c(max_tokens=2, n=2, best_of=2).choices) == 2  # best_of == n: fine


@pytest.mark.conformance(
    Row(C, "best_of (highest cumulative logprob)", PY, NO),
    Row(H, "best_of (highest cumulative logprob)", PY, NO),
)
def test_best_of_returns_the_sample_with_the_highest_cumulative_logprob(c, chat):
    # best_of=3 samples 3 sequences in the engine and returns the most likely
    # one. With a seed, the same request with n=3 and logprobs shows the three
    # samples it chose from.
    kw = dict(prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=99)
    samples = c(n=3, logprobs=0, **kw)
    by_index = sorted(samples.choices, key=lambda ch: ch.index)
    assert len({ch.text for ch in by_index}) > 1  # they differ: the choice matters
    sums = [sum(ch.logprobs.token_logprobs) for ch in by_index]
    best = max(range(3), key=lambda i: (sums[i], -i))
    r = c(best_of=3, **kw)
    (choice,) = r.choices
    assert choice.text == by_index[best].text and choice.index == 0
    assert choice.logprobs is None  # used for ranking, not asked for
    assert r.usage.completion_tokens == samples.usage.completion_tokens  # every sample is counted

    ckw = dict(max_tokens=6, temperature=1.0, seed=7)
    samples = chat(n=2, logprobs=True, top_logprobs=0, **ckw)
    by_index = sorted(samples.choices, key=lambda ch: ch.index)
    sums = [sum(t.logprob for t in ch.logprobs.content) for ch in by_index]
    best = max(range(2), key=lambda i: (sums[i], -i))
    (choice,) = chat(best_of=2, **ckw).choices
    assert choice.message.content == by_index[best].message.content and choice.logprobs is None

    # A list of prompts: each prompt gets its own best, numbered as OpenAI
    # does (echo shows which prompt each choice continues).
    prompts = ["Once upon a time", "The capital of France"]
    batch = c(prompt=prompts, best_of=2, echo=True, max_tokens=4, temperature=1.0, seed=5)
    assert [ch.index for ch in batch.choices] == [0, 1]
    assert [ch.text.startswith(p) for ch, p in zip(batch.choices, prompts, strict=True)] == [True, True]


@pytest.mark.conformance(Row(C, "temperature omitted: the guide's 0.7", PY, NO))
def test_omitted_temperature_defaults_to_the_guides_0_7(c, runtime_server):
    # The runtime passes the guide's default through vLLM's
    # --override-generation-config: a request without temperature samples
    # exactly like one with 0.7, not like vLLM's 1.0.
    kw = dict(prompt="Once upon a time", max_tokens=16)
    differs = False
    for seed in (1, 2, 3):
        default = c(seed=seed, **kw).choices[0].text
        assert default == c(seed=seed, temperature=0.7, **kw).choices[0].text, seed
        differs = differs or default != c(seed=seed, temperature=1.0, **kw).choices[0].text
    assert differs  # otherwise the comparison could not tell 0.7 from 1.0
    # The runtime logs the defaults vLLM's serving layer applies, LIMIT_MAX_TOKENS as
    # the default max_tokens among them (the cap holds when max_tokens is omitted), and
    # nothing from the model's generation_config.json (vLLM's --generation-config vllm).
    (line,) = {ln for ln in runtime_server.log_text().splitlines() if '"sampling defaults"' in ln}
    fields = json.loads(line)
    assert fields["defaults"] == {"temperature": 0.7, "max_tokens": 1024}, line
    assert fields["generation_config"] == "vllm", line


def _greedy(chat, **kw):
    return chat(max_tokens=10, temperature=0, **kw).choices[0]


def _chat_stop(chat, tok):
    full = _greedy(chat).message.content
    word = full.strip().split()[0][:2]
    r = _greedy(chat, stop=[word])
    assert word not in r.message.content and r.finish_reason == "stop" and full.startswith(r.message.content)


def _chat_include_stop_str(chat, tok):
    word = _greedy(chat).message.content.strip().split()[0][:2]
    r = _greedy(chat, stop=word, include_stop_str_in_output=True)
    assert r.message.content.endswith(word) and r.finish_reason == "stop"


def _chat_seed(chat, tok):
    kw = dict(max_tokens=12, temperature=1.5)
    a = chat(seed=42, **kw).choices[0].message.content
    assert a == chat(seed=42, **kw).choices[0].message.content
    assert len({chat(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)} | {a}) > 1


def _chat_top_k_min_p(chat, tok):
    greedy = _greedy(chat).message.content
    for kw in ({"top_k": 1}, {"min_p": 1.0}):
        assert chat(max_tokens=10, temperature=2.0, seed=3, **kw).choices[0].message.content == greedy, kw


def _chat_logit_bias(chat, tok):
    token_id = tok.encode(" banana", add_special_tokens=False)[0]
    r = chat(max_tokens=3, temperature=0, logit_bias={str(token_id): 100})
    assert r.choices[0].message.content == tok.decode([token_id] * 3)


def _chat_stop_token_ids(chat, tok):
    full = _greedy(chat)
    stop_id = tok.encode(full.message.content, add_special_tokens=False)[1]
    r = chat(max_tokens=10, temperature=0, stop_token_ids=[stop_id])
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 10


def _chat_skip_special_tokens(chat, tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    kw = dict(max_tokens=3, temperature=0, logit_bias={str(im_end): 100}, ignore_eos=True)
    assert chat(**kw).choices[0].message.content == ""
    assert chat(skip_special_tokens=False, **kw).choices[0].message.content == "<|im_end|>" * 3


def _case(check, *features: str):
    return pytest.param(check, id=check.__name__.removeprefix("_chat_"),
                        marks=pytest.mark.conformance(*(Row(H, f, PY, NO) for f in features)))  # fmt: skip


@pytest.mark.parametrize(
    "check",
    [
        _case(_chat_stop, "stop (list)"),
        _case(_chat_include_stop_str, "stop (string), include_stop_str_in_output"),
        _case(_chat_seed, "seed"),
        _case(_chat_top_k_min_p, "top_k", "min_p"),
        _case(_chat_logit_bias, "logit_bias"),
        _case(_chat_stop_token_ids, "stop_token_ids"),
        _case(_chat_skip_special_tokens, "skip_special_tokens"),
    ],
)
def test_chat_parameters_reach_the_engine(chat, tok, check):
    check(chat, tok)


@pytest.mark.conformance(Row(H, "stream, stream_options.include_usage, role in the first delta", PY, YES))
def test_stream_options_include_usage_and_role_in_deltas(openai_client, runtime_server):
    stream = openai_client.chat.completions.create(
        model=runtime_server.model, messages=CHAT, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    # Without include_usage no usage chunk is sent.
    stream = openai_client.chat.completions.create(
        model=runtime_server.model, messages=CHAT, max_tokens=2, temperature=0, stream=True
    )
    assert all(ch.usage is None for ch in stream)


@pytest.mark.conformance(Row(C, "stream: the same text as not streamed", PY, YES))
def test_streamed_text_equals_non_streamed_text(openai_client, runtime_server, c):
    full = c(max_tokens=8, temperature=0).choices[0].text
    stream = openai_client.completions.create(
        model=runtime_server.model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == full
