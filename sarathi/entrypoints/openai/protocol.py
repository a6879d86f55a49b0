"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Field names and defaults follow OpenAI's API plus vLLM's sampling extras
(top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos, min_tokens,
include_stop_str_in_output, skip_special_tokens, structured_outputs and the older guided_*).
Unknown request fields are ignored (and logged), as vLLM does, so clients written for other
servers work.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_serializer, field_validator, model_validator

from .tool_calls import TOOL_NAME


# Limits every request field gets, whatever its type, before its own validation runs.
MAX_DEPTH = 32              # nesting of objects and arrays
MAX_INT = 2**64             # |integer| below this (seeds are the largest: < 2**64)
MAX_STRING_CHARS = 10**7    # the body cap bounds it too; this names the field


class FieldError(ValueError):
    """A generic check failed; `param` is the top-level field."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.param = path.split(".")[0].split("[")[0] or None


def check_values(value: Any, path: str = "", depth: int = 0) -> None:
    """The generic checks, on the raw JSON value of a request: strings are valid Unicode (no
    lone surrogates), numbers finite and bounded, nesting bounded. A field added to any request
    model gets them without a line of its own. Raises ValueError naming the field."""
    where = path or "request body"
    if depth > MAX_DEPTH:
        raise FieldError(f"{where} is nested more than {MAX_DEPTH} levels deep", path)
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise FieldError(f"{where} is longer than {MAX_STRING_CHARS} characters", path)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise FieldError(f"{where} contains invalid Unicode (a lone surrogate)", path) from None
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if abs(value) >= MAX_INT:
            raise FieldError(f"{where} is out of range (|value| must be below 2**64)", path)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise FieldError(f"{where} must be a finite number", path)
    elif isinstance(value, dict):
        for key, item in value.items():
            name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")[:80]   # safe to echo
            field = f"{path}.{name}" if path else name
            check_values(key, f"{field} (the key)", depth + 1)
            check_values(item, field, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_values(item, f"{path}[{i}]", depth + 1)


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _generic_checks(cls, data: Any) -> Any:
        check_values(data)
        return data


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIBase):
    include_usage: bool = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0        # prompt tokens whose KV came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class JsonSchemaFormat(OpenAIBase):
    """response_format's json_schema: the schema is always enforced (strict or not)."""

    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    json_schema: Union[Dict[str, Any], bool] = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIBase):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class SamplingFields(OpenAIBase):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[str, float]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # vLLM extras
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: Optional[List[int]] = None
    # extension: sample from q* of this model and a target (two-model optimal sampling)
    optimal_sampling: Optional[Dict[str, Any]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    cache_salt: Optional[str] = None   # vLLM: only requests with the same salt share cached prefixes
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[Dict[str, Any]] = None
    guided_json: Optional[Union[str, Dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[List[str]] = None
    guided_grammar: Optional[str] = None

    @field_validator("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty", "min_tokens", "include_stop_str_in_output", "ignore_eos",
                     "skip_special_tokens", "spaces_between_special_tokens", "stream", mode="before")
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        # many clients send an explicit null for "not set"
        return cls.model_fields[info.field_name].default if value is None else value


# ----------------------------------------------------------------------------- completions

class CompletionRequest(SamplingFields):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    # vLLM extension: logprobs name tokens "token_id:<id>" (exact, for clients that work in ids)
    return_tokens_as_token_ids: Optional[bool] = None


class CompletionLogprobs(BaseModel):
    tokens: List[str] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)
    text_offset: List[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    model_config = ConfigDict(extra="allow")  # extension fields (optimal_sampling)

    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[CompletionChoice]
    usage: Optional[UsageInfo] = None


# ----------------------------------------------------------------------------- chat

class FunctionCall(OpenAIBase):
    name: str
    arguments: Union[str, Dict[str, Any]]       # OpenAI sends JSON text; some clients an object


class ToolCall(OpenAIBase):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBase):
    role: str
    content: Optional[Union[str, List[Dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None      # an assistant's earlier calls
    tool_call_id: Optional[str] = None               # role "tool": the call this answers


class FunctionDefinition(OpenAIBase):
    name: str
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not TOOL_NAME.match(name):
            raise ValueError(f"function name {name[:80]!r} must be 1 to 64 letters, digits, '_' or '-'")
        return name


class ChatTool(OpenAIBase):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIBase):
    name: str


class NamedToolChoice(OpenAIBase):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: List[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    tools: Optional[List[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[List[ChatTokenLogprob]] = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str                      # JSON text


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None
    tool_calls: List[ResponseToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    model_config = ConfigDict(extra="allow")  # extension fields (optimal_sampling)

    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatChoice]
    usage: Optional[UsageInfo] = None


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[List[DeltaToolCall]] = None


class ChatChunkChoice(BaseModel):
    model_config = ConfigDict(extra="allow")  # extension fields (optimal_sampling)

    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None

    @field_serializer("delta")
    def _delta(self, delta: DeltaMessage) -> Dict[str, Any]:
        # OpenAI sends the role once, in the first delta, and omits it afterwards
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


# ----------------------------------------------------------------------------- tokenizer extras

class TokenizeRequest(OpenAIBase):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class LoadLoRAAdapterRequest(OpenAIBase):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(OpenAIBase):
    lora_name: str = Field(min_length=1)
    lora_int_id: Optional[int] = None


class DetokenizeRequest(OpenAIBase):
    model: Optional[str] = None
    tokens: List[int]
