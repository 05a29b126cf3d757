"""Tests for tpnet.api.schemas: every bound at its edge and just past it,
message and prompt shapes, and the errors' messages and field paths."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tpnet.api.schemas import (
    MAX_CHOICES_PER_REQUEST,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_PROMPTS,
    MAX_STOP_CHARS,
    MAX_TOKEN_ID,
    SEED_RANGE,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    RequestError,
    parse_chat_request,
    parse_completion_request,
    sampling_params,
)
from tpnet.engine.types import SamplingParams

USER_HELLO = [{"role": "user", "content": "hello"}]


def chat(**fields: Any) -> ChatRequest:
    return parse_chat_request({"messages": USER_HELLO, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return parse_completion_request({"prompt": "Once upon", **fields})


def chat_error(body: Any) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_chat_request(body)
    return caught.value


def completion_error(body: Any) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_completion_request(body)
    return caught.value


# --- the body as a whole -----------------------------------------------------


def test_a_minimal_chat_request_gets_openai_defaults() -> None:
    request = chat()

    assert request.messages == (ChatMessage("user", "hello"),)
    assert request.max_tokens is None
    assert request.temperature == 1.0
    assert request.top_p == 1.0
    assert request.n == 1
    assert request.stop == ()
    assert request.stream is False
    assert request.include_usage is False
    assert request.logprobs is False
    assert request.speculative is True


@pytest.mark.parametrize("body", [[], "text", 3, None, True])
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    error = chat_error(body)

    assert "must be a JSON object" in error.message
    assert error.param is None
    assert error.status == 400


def test_unknown_fields_are_ignored() -> None:
    request = chat(metadata={"a": 1}, store=False, parallel_tool_calls=True)

    assert request.n == 1


def test_null_fields_mean_their_defaults() -> None:
    nulls = dict.fromkeys(
        [
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "max_tokens",
            "max_completion_tokens",
            "n",
            "stop",
            "stream",
            "stream_options",
            "logprobs",
            "top_logprobs",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "user",
            "model",
            "speculative",
        ]
    )

    request = chat(**nulls)

    assert request == chat()


def test_any_model_name_is_accepted_and_kept() -> None:
    assert chat(model="gpt-4o").model == "gpt-4o"


def test_a_model_that_is_not_a_string_is_refused() -> None:
    error = chat_error({"messages": USER_HELLO, "model": 7})

    assert error.param == "model"


# --- numeric bounds ------------------------------------------------------------

# (field, value at the edge that passes, value just past it, words of the bound)
FLOAT_EDGES = [
    ("temperature", 0, -0.01, "between 0 and 2"),
    ("temperature", 2, 2.01, "between 0 and 2"),
    ("top_p", 1, 1.0001, "greater than 0 and at most 1"),
    ("top_p", 1e-9, 0, "greater than 0 and at most 1"),
    ("min_p", 0, -1e-9, "between 0 and 1"),
    ("min_p", 1, 1.5, "between 0 and 1"),
    ("presence_penalty", -2, -2.5, "between -2 and 2"),
    ("presence_penalty", 2, 2.001, "between -2 and 2"),
    ("frequency_penalty", -2, -3, "between -2 and 2"),
    ("frequency_penalty", 2, 7, "between -2 and 2"),
    ("repetition_penalty", 1e-6, 0, "greater than 0"),
    ("repetition_penalty", 1e-6, -1, "greater than 0"),
]


@pytest.mark.parametrize(("name", "edge", "past", "bound"), FLOAT_EDGES)
def test_a_number_at_its_bound_passes_and_just_past_is_refused(
    name: str, edge: float, past: float, bound: str
) -> None:
    accepted = chat(**{name: edge})
    error = chat_error({"messages": USER_HELLO, name: past})

    assert getattr(accepted, name) == edge
    assert error.param == name
    assert error.message == f"{name} must be {bound}, got {past!r}"


def test_the_temperature_error_reads_as_the_brief_says() -> None:
    error = chat_error({"messages": USER_HELLO, "temperature": 3.5})

    assert error.message == "temperature must be between 0 and 2, got 3.5"


INTEGER_EDGES = [
    ("n", 1, 0),
    ("n", 16, 17),
    ("top_k", 0, -1),
    ("max_tokens", 1, 0),
    ("max_completion_tokens", 1, 0),
    ("max_tokens", 2**31 - 1, 2**31),
    ("seed", SEED_RANGE[0], SEED_RANGE[0] - 1),
    ("seed", SEED_RANGE[1], SEED_RANGE[1] + 1),
]


@pytest.mark.parametrize(("name", "edge", "past"), INTEGER_EDGES)
def test_an_integer_at_its_bound_passes_and_just_past_is_refused(
    name: str, edge: int, past: int
) -> None:
    accepted = chat(**{name: edge})
    error = chat_error({"messages": USER_HELLO, name: past})

    field = "max_tokens" if name == "max_completion_tokens" else name
    assert getattr(accepted, field) == edge
    assert error.param == name
    assert error.message.startswith(f"{name} must be ")
    assert error.message.endswith(f"got {past}")


def test_a_large_top_k_is_accepted() -> None:
    assert chat(top_k=1_000_000).top_k == 1_000_000


@pytest.mark.parametrize("name", ["n", "top_k", "seed", "max_tokens", "top_logprobs"])
@pytest.mark.parametrize("value", [1.5, 2.0, "3", True, [1]])
def test_integer_fields_refuse_other_types(name: str, value: Any) -> None:
    error = chat_error({"messages": USER_HELLO, "logprobs": True, name: value})

    assert error.param == name
    assert error.message.startswith(f"{name} must be an integer, got ")


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "presence_penalty"])
@pytest.mark.parametrize("value", ["0.5", True, False, [0.5], {"v": 1}])
def test_number_fields_refuse_other_types(name: str, value: Any) -> None:
    error = chat_error({"messages": USER_HELLO, name: value})

    assert error.param == name
    assert error.message.startswith(f"{name} must be a number, got ")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(value: float) -> None:
    error = chat_error({"messages": USER_HELLO, "temperature": value})

    assert error.param == "temperature"


@given(st.floats(min_value=0, max_value=2))
def test_every_temperature_in_range_is_accepted(value: float) -> None:
    assert chat(temperature=value).temperature == value


@given(
    st.floats(allow_nan=False).filter(lambda value: value < 0 or value > 2)
    | st.integers().filter(lambda value: value < 0 or value > 2)
)
def test_every_temperature_out_of_range_is_refused(value: float) -> None:
    error = chat_error({"messages": USER_HELLO, "temperature": value})

    assert error.param == "temperature"


@given(st.integers())
def test_n_is_accepted_exactly_from_one_to_sixteen(value: int) -> None:
    body = {"messages": USER_HELLO, "n": value}

    if 1 <= value <= 16:
        assert parse_chat_request(body).n == value
    else:
        assert chat_error(body).param == "n"


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    request = chat(max_tokens=10, max_completion_tokens=20)

    assert request.max_tokens == 20


def test_max_tokens_is_used_when_max_completion_tokens_is_null() -> None:
    assert chat(max_tokens=10, max_completion_tokens=None).max_tokens == 10


@pytest.mark.parametrize("name", ["stream", "logprobs", "speculative"])
@pytest.mark.parametrize("value", [1, "true", 0])
def test_boolean_fields_refuse_other_types(name: str, value: Any) -> None:
    error = chat_error({"messages": USER_HELLO, name: value})

    assert error.param == name
    assert "must be a boolean" in error.message


def test_speculative_can_be_turned_off() -> None:
    assert chat(speculative=False).speculative is False


# --- logprobs ----------------------------------------------------------------


def test_top_logprobs_at_zero_and_twenty_pass_with_logprobs_on() -> None:
    assert chat(logprobs=True, top_logprobs=0).top_logprobs == 0
    assert chat(logprobs=True, top_logprobs=20).top_logprobs == 20


@pytest.mark.parametrize("value", [-1, 21])
def test_top_logprobs_past_its_bounds_is_refused(value: int) -> None:
    error = chat_error(
        {"messages": USER_HELLO, "logprobs": True, "top_logprobs": value}
    )

    assert error.param == "top_logprobs"
    assert "between 0 and 20" in error.message


@pytest.mark.parametrize("logprobs", [False, None])
def test_top_logprobs_without_logprobs_is_refused(logprobs: bool | None) -> None:
    body: dict[str, Any] = {"messages": USER_HELLO, "top_logprobs": 3}
    if logprobs is not None:
        body["logprobs"] = logprobs

    error = chat_error(body)

    assert error.param == "top_logprobs"
    assert "requires logprobs to be true" in error.message


# --- stop ----------------------------------------------------------------------


def test_stop_may_be_a_string() -> None:
    assert chat(stop="\n\n").stop == ("\n\n",)


def test_stop_may_be_a_list_of_up_to_four_strings() -> None:
    assert chat(stop=["a", "b", "c", "d"]).stop == ("a", "b", "c", "d")
    assert chat(stop=[]).stop == ()


def test_five_stop_strings_are_refused() -> None:
    error = chat_error({"messages": USER_HELLO, "stop": ["a", "b", "c", "d", "e"]})

    assert error.param == "stop"
    assert error.message == "stop must hold at most 4 strings, got 5"


def test_an_empty_stop_string_is_refused() -> None:
    assert chat_error({"messages": USER_HELLO, "stop": ""}).param == "stop"
    assert chat_error({"messages": USER_HELLO, "stop": ["a", ""]}).param == "stop[1]"


def test_a_stop_list_item_that_is_not_a_string_is_refused() -> None:
    error = chat_error({"messages": USER_HELLO, "stop": ["a", 3]})

    assert error.param == "stop[1]"
    assert error.message == "stop[1] must be a string, got 3"


def test_stop_of_another_type_is_refused() -> None:
    assert chat_error({"messages": USER_HELLO, "stop": 5}).param == "stop"


def test_a_stop_string_is_limited_in_length() -> None:
    assert chat(stop="x" * MAX_STOP_CHARS).stop == ("x" * MAX_STOP_CHARS,)
    error = chat_error({"messages": USER_HELLO, "stop": "x" * (MAX_STOP_CHARS + 1)})
    assert error.param == "stop"


# --- logit_bias ----------------------------------------------------------------


def test_logit_bias_maps_token_id_strings_to_floats() -> None:
    request = chat(logit_bias={"50256": -100, "7": 100, "0": 0.5})

    assert request.logit_bias == {50256: -100.0, 7: 100.0, 0: 0.5}


@pytest.mark.parametrize("key", ["abc", "-1", "1.5", " 12", "", "٣", "0x10"])
def test_logit_bias_keys_that_are_not_token_ids_are_refused(key: str) -> None:
    error = chat_error({"messages": USER_HELLO, "logit_bias": {key: 1}})

    assert error.param == f"logit_bias.{key}"
    assert "must be token ids" in error.message


def test_a_logit_bias_key_past_the_largest_token_id_is_refused() -> None:
    key = str(MAX_TOKEN_ID + 1)

    error = chat_error({"messages": USER_HELLO, "logit_bias": {key: 1}})

    assert error.param == f"logit_bias.{key}"


@pytest.mark.parametrize("bias", [-100.5, 101, "5", None, True])
def test_logit_bias_values_outside_plus_minus_100_are_refused(bias: Any) -> None:
    error = chat_error({"messages": USER_HELLO, "logit_bias": {"42": bias}})

    assert error.param == "logit_bias.42"


def test_logit_bias_that_is_not_an_object_is_refused() -> None:
    assert chat_error({"messages": USER_HELLO, "logit_bias": [1]}).param == (
        "logit_bias"
    )


def test_logit_bias_is_limited_in_entries() -> None:
    at_limit = {str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES)}
    past_limit = {str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}

    assert len(chat(logit_bias=at_limit).logit_bias) == MAX_LOGIT_BIAS_ENTRIES
    assert chat_error({"messages": USER_HELLO, "logit_bias": past_limit}).param == (
        "logit_bias"
    )


# --- stream options ------------------------------------------------------------


def test_include_usage_is_read_from_stream_options() -> None:
    request = chat(stream=True, stream_options={"include_usage": True})

    assert request.include_usage is True


def test_stream_options_without_stream_is_refused() -> None:
    error = chat_error({"messages": USER_HELLO, "stream_options": {}})

    assert error.param == "stream_options"


def test_include_usage_that_is_not_a_boolean_is_refused() -> None:
    body = {
        "messages": USER_HELLO,
        "stream": True,
        "stream_options": {"include_usage": "yes"},
    }

    assert chat_error(body).param == "stream_options.include_usage"


# --- messages ------------------------------------------------------------------


def test_messages_are_required() -> None:
    error = chat_error({})

    assert error.param == "messages"
    assert error.code == "missing_required_parameter"


@pytest.mark.parametrize("messages", [[], "hello", {"role": "user"}])
def test_messages_must_be_a_non_empty_list(messages: Any) -> None:
    assert chat_error({"messages": messages}).param == "messages"


def test_a_message_that_is_not_an_object_is_refused() -> None:
    error = chat_error({"messages": [USER_HELLO[0], "hi"]})

    assert error.param == "messages[1]"


def test_the_developer_role_becomes_system() -> None:
    request = chat(messages=[{"role": "developer", "content": "be brief"}])

    assert request.messages == (ChatMessage("system", "be brief"),)


def test_all_supported_roles_pass_in_order() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "u2"},
    ]

    request = parse_chat_request({"messages": messages})

    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]


def test_the_tool_role_is_refused_with_its_path() -> None:
    messages = [USER_HELLO[0], {"role": "tool", "content": "42"}]

    error = chat_error({"messages": messages})

    assert error.param == "messages[1].role"
    assert error.code == "unsupported_value"
    assert "'tool' is not supported" in error.message


@pytest.mark.parametrize("role", ["robot", "", None, 3, "USER"])
def test_an_unknown_role_is_refused_with_its_path(role: Any) -> None:
    error = chat_error({"messages": [{"role": role, "content": "x"}]})

    assert error.param == "messages[0].role"
    assert "must be one of system, developer, user, assistant" in error.message


def test_a_message_without_content_is_refused() -> None:
    error = chat_error({"messages": [{"role": "user"}]})

    assert error.param == "messages[0].content"


def test_an_assistant_message_with_null_content_is_an_empty_turn() -> None:
    request = chat(
        messages=[USER_HELLO[0], {"role": "assistant", "content": None}, USER_HELLO[0]]
    )

    assert request.messages[1] == ChatMessage("assistant", "")


def test_assistant_tool_calls_are_refused() -> None:
    message = {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}

    error = chat_error({"messages": [USER_HELLO[0], message]})

    assert error.param == "messages[1].tool_calls"


def test_text_content_parts_are_joined_with_newlines() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]

    request = chat(messages=[{"role": "user", "content": parts}])

    assert request.messages[0].content == "first\nsecond"


def test_an_empty_content_part_list_is_empty_text() -> None:
    assert chat(messages=[{"role": "user", "content": []}]).messages[0].content == ""


def test_a_non_text_content_part_is_refused_naming_its_type() -> None:
    parts = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
    ]

    error = chat_error(
        {"messages": [USER_HELLO[0], {"role": "user", "content": parts}]}
    )

    assert error.param == "messages[1].content[1].type"
    assert "'image_url'" in error.message


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ("text", "messages[0].content[0]"),
        ({"text": "no type"}, "messages[0].content[0].type"),
        ({"type": "text"}, "messages[0].content[0].text"),
        ({"type": "text", "text": 5}, "messages[0].content[0].text"),
    ],
)
def test_malformed_content_parts_are_refused_with_their_path(
    part: Any, param: str
) -> None:
    error = chat_error({"messages": [{"role": "user", "content": [part]}]})

    assert error.param == param


def test_content_of_another_type_is_refused() -> None:
    error = chat_error({"messages": [{"role": "user", "content": 42}]})

    assert error.param == "messages[0].content"


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("tools", [{"type": "function"}], "tools"),
        ("functions", [{"name": "f"}], "functions"),
        ("response_format", {"type": "json_object"}, "response_format.type"),
        ("response_format", "json", "response_format.type"),
    ],
)
def test_tools_and_structured_output_are_refused(
    field: str, value: Any, param: str
) -> None:
    error = chat_error({"messages": USER_HELLO, field: value})

    assert error.param == param


def test_empty_tools_and_a_text_response_format_are_accepted() -> None:
    assert chat(tools=[], response_format={"type": "text"}).n == 1


# --- completion prompts --------------------------------------------------------


def test_a_string_prompt_is_one_prompt() -> None:
    assert completion().prompts == ("Once upon",)


def test_a_list_of_strings_is_several_prompts() -> None:
    assert completion(prompt=["a", "b"]).prompts == ("a", "b")


def test_a_list_of_token_ids_is_one_prompt() -> None:
    assert completion(prompt=[1, 2, 3]).prompts == ((1, 2, 3),)


def test_a_list_of_token_id_lists_is_several_prompts() -> None:
    assert completion(prompt=[[1, 2], [3]]).prompts == ((1, 2), (3,))


def test_a_prompt_is_required() -> None:
    error = completion_error({})

    assert error.param == "prompt"
    assert error.code == "missing_required_parameter"


@pytest.mark.parametrize(
    ("prompt", "param"),
    [
        ([], "prompt"),
        (5, "prompt"),
        ({"text": "x"}, "prompt"),
        (["a", 1], "prompt[1]"),
        ([1, "a"], "prompt[1]"),
        ([1, -1], "prompt[1]"),
        ([1, MAX_TOKEN_ID + 1], "prompt[1]"),
        ([1, True], "prompt[1]"),
        ([1, 2.0], "prompt[1]"),
        ([[1], []], "prompt[1]"),
        ([[1], "a"], "prompt[1]"),
        ([[1], [2, -3]], "prompt[1][1]"),
        ([None], "prompt[0]"),
        ([{"a": 1}], "prompt[0]"),
    ],
)
def test_malformed_prompts_are_refused_with_their_path(prompt: Any, param: str) -> None:
    assert completion_error({"prompt": prompt}).param == param


def test_the_number_of_prompts_is_limited() -> None:
    assert len(completion(prompt=["a"] * MAX_PROMPTS).prompts) == MAX_PROMPTS
    error = completion_error({"prompt": ["a"] * (MAX_PROMPTS + 1)})
    assert error.param == "prompt"


def test_prompts_times_n_is_limited() -> None:
    prompts = ["a"] * (MAX_CHOICES_PER_REQUEST // 16)

    assert completion(prompt=prompts, n=16).n == 16
    error = completion_error({"prompt": prompts + ["b"], "n": 16})
    assert error.param == "n"
    assert f"at most {MAX_CHOICES_PER_REQUEST}" in error.message


@pytest.mark.parametrize("value", [0, 5])
def test_completion_logprobs_from_zero_to_five_pass(value: int) -> None:
    assert completion(logprobs=value).logprobs == value


@pytest.mark.parametrize("value", [-1, 6, True, 1.5])
def test_completion_logprobs_outside_zero_to_five_are_refused(value: Any) -> None:
    assert completion_error({"prompt": "x", "logprobs": value}).param == "logprobs"


def test_echo_is_read() -> None:
    assert completion(echo=True).echo is True


def test_a_suffix_is_refused_as_unsupported() -> None:
    error = completion_error({"prompt": "x", "suffix": "end"})

    assert error.param == "suffix"
    assert error.code == "unsupported_parameter"


def test_an_empty_or_null_suffix_is_accepted() -> None:
    assert completion(suffix="").prompts == completion(suffix=None).prompts


def test_best_of_equal_to_n_is_accepted_and_other_values_refused() -> None:
    assert completion(best_of=2, n=2).n == 2
    assert completion_error({"prompt": "x", "best_of": 3}).param == "best_of"


def test_completion_requests_share_the_sampling_checks() -> None:
    error = completion_error({"prompt": "x", "top_p": 0})

    assert error.param == "top_p"


# --- sampling_params -----------------------------------------------------------


def test_sampling_params_carries_every_sampling_field() -> None:
    request = chat(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        repetition_penalty=1.1,
        logit_bias={"3": 2},
        logprobs=True,
        top_logprobs=4,
    )

    params = sampling_params(request)

    assert params == SamplingParams(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        repetition_penalty=1.1,
        logit_bias={3: 2.0},
        logprobs=True,
        top_logprobs=4,
    )


def test_sampling_params_defaults_match_the_engine_defaults() -> None:
    assert sampling_params(chat()) == SamplingParams()
    assert sampling_params(completion()) == SamplingParams()


def test_completion_logprobs_become_logprobs_with_alternatives() -> None:
    with_three = sampling_params(completion(logprobs=3))
    with_zero = sampling_params(completion(logprobs=0))

    assert (with_three.logprobs, with_three.top_logprobs) == (True, 3)
    assert (with_zero.logprobs, with_zero.top_logprobs) == (True, 0)


def test_each_choice_gets_its_own_seed_and_choice_zero_the_given_one() -> None:
    request = chat(seed=100, n=3)

    seeds = [sampling_params(request, index).seed for index in range(3)]

    assert seeds == [100, 101, 102]


def test_choice_seeds_wrap_within_64_bits() -> None:
    request = chat(seed=SEED_RANGE[1], n=2)

    assert sampling_params(request, 1).seed == SEED_RANGE[0]


def test_without_a_seed_every_choice_is_unseeded() -> None:
    assert sampling_params(chat(n=2), 1).seed is None
