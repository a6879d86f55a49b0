"""Structured outputs and tool calling through the OpenAI server on the embedded model, with the
`openai` client: `beta.chat.completions.parse` with nested pydantic models, n = 4 streams, the
completions endpoint, a tool-calling round trip, streamed tool-call deltas that concatenate to
the non-streamed calls, and every bad input a 400 naming its field."""
from __future__ import annotations

import json
import re
from enum import Enum
from typing import List, Optional

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from server_harness import engine_flags, metric, running_server, sse_events

pytestmark = pytest.mark.slow
ENGINE_ARGS = dict(kv_cache_memory="256MiB", max_model_len=2048, structured_outputs_compile_timeout=1.0)
FLAGS = ["--chat-template", "hermes", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Species(str, Enum):
    cat = "cat"
    dog = "dog"
    fish = "fish"


class Pet(BaseModel):
    name: str = Field(max_length=16)
    species: Species
    age: int = Field(ge=0, le=30)


class Person(BaseModel):
    name: str = Field(max_length=20)
    height_m: float = Field(ge=0.5, le=2.5)
    nickname: Optional[str] = Field(default=None, max_length=12)
    pets: List[Pet] = Field(max_length=2)


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    with running_server([*engine_flags(ENGINE_ARGS), *FLAGS],
                        tmp_path_factory.mktemp("structured-server") / "server.log") as proc:
        yield proc
        assert proc.proc.poll() is None, "server died"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_parse_nested_pydantic_models(client):
    for question in ("Describe a person who has pets, as JSON.", "Invent a character and their pets.",
                     "Who is your favourite pet owner?"):
        messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}]
        r = client.beta.chat.completions.parse(model=MODEL, messages=messages, response_format=Person, max_tokens=300,
                                               temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Person)
        Person.model_validate_json(choice.message.content)


def test_four_streams_are_all_valid(server):
    schema = Pet.model_json_schema()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Describe a pet."}], "n": 4, "seed": 11,
            "temperature": 0.9, "max_tokens": 120, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}}
    texts, finish = ["", "", "", ""], [None] * 4
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for event in sse_events(r.iter_lines()):
            for c in event["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
                finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
    assert finish == ["stop"] * 4
    for text in texts:
        Pet.model_validate_json(text)


def test_completions_and_vllm_spellings(client):
    date = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r = client.completions.create(model=MODEL, prompt="The first moon landing was on", max_tokens=12, temperature=0,
                                  extra_body={"guided_regex": date})
    assert re.fullmatch(date, r.choices[0].text)
    r = client.completions.create(model=MODEL, prompt="Is the sky green? Answer:", max_tokens=4, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A JSON object please."}],
                                       max_tokens=80, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick a color."}],
                                       max_tokens=8, temperature=0, extra_body={"guided_choice": ["red", "blue"]})
    assert r.choices[0].message.content in ("red", "blue")


def test_tool_calling_round_trip(client):
    tools = [WEATHER, TIME]
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="required",
                                       max_tokens=120, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather",
                                                                                                   "get_time")
        json.loads(call.function.arguments)
    named = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, max_tokens=60, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and named.choices[0].finish_reason == "stop"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("C", "F")
    # the call and its result go back through the template; the answer is plain text
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    answer = client.chat.completions.create(model=MODEL, messages=follow, tools=tools, max_tokens=30, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="none", max_tokens=8,
                                          temperature=0)
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_call_deltas_concatenate_to_the_whole(client, tool_choice):
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=120,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
    assert finish == whole.finish_reason
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def post(server, body, path="/v1/chat/completions"):
    return httpx.post(server.base_url + path, json=body, timeout=120)


SLOW_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,50}@[a-z]{1,50}\\.com"}
                                                for i in range(12)}}


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a" * 70000}, "guided_regex"),
    ({"guided_regex": "a", "ignore_eos": True}, "guided_regex"),
    ({"guided_json": SLOW_SCHEMA}, "guided_json"),                        # stopped by the compile timeout
    ({"guided_json": SLOW_SCHEMA, "stream": True}, "guided_json"),        # a 400 before the stream starts
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "unknown"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}], "tool_choice": "required"},
     "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}]}]},
     "messages"),
])
def test_bad_input_is_a_400_naming_the_field(server, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err


def test_server_is_healthy_and_counts(server, client):
    """After the bad inputs: still serving, a constrained request still works, metrics count."""
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "yes or no?"}], max_tokens=4,
                                       temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    text = httpx.get(server.base_url + "/metrics").text
    assert metric(text, "sarathi:structured_outputs_requests_total") >= 10
    assert metric(text, "sarathi:structured_outputs_compile_cache_hits_total") >= 1
    assert metric(text, "sarathi:structured_outputs_compile_failures_total") >= 3
    assert metric(text, "sarathi:structured_outputs_compile_seconds_count") >= 5
