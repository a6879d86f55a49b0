"""Tool calling for chat: the constraint `tool_choice` implies, and tool calls read back from text.

`tool_choice` "required" and a named function are enforced by a JSON-schema constraint built from
the tools' parameter schemas, so the arguments always parse: a named function's output *is* its
arguments object; "required" generates `[{"name": ..., "parameters": {...}}, ...]`. "auto" leaves
the model free and a parser (`--tool-call-parser`) finds calls in its text: `hermes`
(`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) or `llama3_json` (`{"name": ...,
"parameters": {...}}` objects separated by `;`, optionally after `<|python_tag|>`).

Every reader takes the text generated so far and returns what it holds so far: content, and calls
whose `arguments` is the raw JSON text of the arguments as far as it goes. Text only grows, so each
call's arguments only grow: a stream sends the new suffix, and the pieces concatenate to exactly
what a non-streamed response returns.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sarathi.sampling_params import StructuredOutputsParams

PARSERS = ("hermes", "llama3_json")
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_WS = " \t\n\r"


@dataclass
class ToolCallText:
    """One call as far as the text goes."""

    name: str
    arguments: str          # raw JSON text of the arguments (a prefix of it while incomplete)
    complete: bool


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------------------- constraints

def tool_constraint(tools: Sequence[Dict[str, Any]], choice: Any, parallel: bool) -> Optional[StructuredOutputsParams]:
    """The constraint tool_choice asks for: None for "none" / "auto", else a JSON schema.
    tools: [{"name", "parameters"}]; choice: "required" or a function name."""
    schemas = {t["name"]: t.get("parameters") or {"type": "object"} for t in tools}
    if choice in (None, "none", "auto"):
        return None
    if choice != "required":
        return StructuredOutputsParams(json=schemas[choice], param="tools")
    item = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                       "required": ["name", "parameters"]} for name, schema in schemas.items()]}
    array: Dict[str, Any] = {"type": "array", "minItems": 1, "items": item}
    if not parallel:
        array["maxItems"] = 1
    return StructuredOutputsParams(json=array, param="tools")


# ---------------------------------------------------------------------------- a partial JSON scanner

def _skip(t: str, i: int) -> int:
    while i < len(t) and t[i] in _WS:
        i += 1
    return i


def _string_end(t: str, i: int) -> Optional[int]:
    """Index after the JSON string starting at t[i] == '"', or None when the text ends first."""
    j = i + 1
    while j < len(t):
        if t[j] == "\\":
            j += 2
        elif t[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def value_end(t: str, i: int, final: bool) -> Optional[int]:
    """Index after the JSON value starting at t[i], or None while it is incomplete."""
    if i >= len(t):
        return None
    if t[i] == '"':
        return _string_end(t, i)
    if t[i] in "{[":
        depth, j = 0, i
        while j < len(t):
            c = t[j]
            if c == '"':
                end = _string_end(t, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(t) and t[j] not in ",}]" + _WS:
        j += 1
    return j if j < len(t) or final else None   # a number at the end may go on


def members(t: str, i: int, final: bool) -> List[Tuple[str, int, Optional[int]]]:
    """(key, value start, value end or None) of the object at t[i] == "{", as far as the text goes."""
    out: List[Tuple[str, int, Optional[int]]] = []
    j = _skip(t, i + 1)
    while j < len(t) and t[j] != "}":
        if t[j] == ",":
            j = _skip(t, j + 1)
            continue
        key_end = _string_end(t, j) if t[j] == '"' else None
        if key_end is None:
            break
        key = json.loads(t[j:key_end])
        j = _skip(t, key_end)
        if j >= len(t) or t[j] != ":":
            break
        start = _skip(t, j + 1)
        if start >= len(t):
            break
        end = value_end(t, start, final)
        out.append((key, start, end))
        if end is None:
            break
        j = _skip(t, end)
    return out


def _call_in_object(t: str, i: int, final: bool, arg_keys: Sequence[str]) -> Optional[ToolCallText]:
    """A call {"name": ..., "arguments" | "parameters": ...} at t[i]; None until its name is complete."""
    name, args = None, None
    for key, start, end in members(t, i, final):
        if key == "name" and end is not None and t[start] == '"':
            name = json.loads(t[start:end])
        elif key in arg_keys:
            args = (start, end)
    if not isinstance(name, str):
        return None
    end = value_end(t, i, final)
    if args is None:
        return ToolCallText(name, "{}" if end is not None else "", end is not None)
    return ToolCallText(name, t[args[0]:args[1] if args[1] is not None else len(t)], args[1] is not None)


def _calls_from(t: str, j: int, final: bool, separator: str) -> List[ToolCallText]:
    """The call objects from t[j] on, separated by `separator`, as far as the text goes."""
    calls: List[ToolCallText] = []
    while j < len(t) and t[j] == "{":
        call = _call_in_object(t, j, final, ("parameters", "arguments"))
        if call is None:
            break
        calls.append(call)
        end = value_end(t, j, final)
        if end is None:
            break
        j = _skip(t, end)
        if j < len(t) and t[j] == separator:
            j = _skip(t, j + 1)
    return calls


# ---------------------------------------------------------------------------- readers

class NamedCall:
    """tool_choice names a function: the whole output is its arguments object."""

    def __init__(self, name: str):
        self.name = name

    def read(self, text: str, final: bool) -> Tuple[str, List[ToolCallText]]:
        end = value_end(text, _skip(text, 0), final) if text.strip() else None
        return "", [ToolCallText(self.name, text, end is not None)]


class RequiredCalls:
    """tool_choice "required": the output is [{"name": ..., "parameters": {...}}, ...]."""

    def read(self, text: str, final: bool) -> Tuple[str, List[ToolCallText]]:
        j = _skip(text, 0)
        if j >= len(text) or text[j] != "[":
            return "", []
        return "", _calls_from(text, _skip(text, j + 1), final, ",")


class HermesParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in free text (Hermes, Qwen)."""

    start = "<tool_call>"

    def read(self, text: str, final: bool) -> Tuple[str, List[ToolCallText]]:
        first = text.find(self.start)
        if first < 0:
            return (text if final else _hold_prefix(text, self.start)), []
        calls: List[ToolCallText] = []
        at = first
        while at >= 0:
            j = _skip(text, at + len(self.start))
            if j >= len(text) or text[j] != "{":
                break
            call = _call_in_object(text, j, final, ("arguments", "parameters"))
            if call is None:
                break
            calls.append(call)
            end = value_end(text, j, final)
            if end is None:
                break
            at = text.find(self.start, end)
        return text[:first], calls


class Llama3JsonParser:
    """Llama 3.x JSON tool calls: {"name": ..., "parameters": {...}} objects separated by ";",
    the whole output (optionally after <|python_tag|>); anything else is content."""

    tag = "<|python_tag|>"

    def read(self, text: str, final: bool) -> Tuple[str, List[ToolCallText]]:
        j = _skip(text, 0)
        if not final and self.tag.startswith(text[j:]):
            return "", []   # may still become the tag
        if text.startswith(self.tag, j):
            j = _skip(text, j + len(self.tag))
        if j >= len(text):
            return "", []
        if text[j] != "{":
            return text, []
        calls = _calls_from(text, j, final, ";")
        if final and not calls:
            return text, []
        return "", calls


def _hold_prefix(text: str, tag: str) -> str:
    """text without a tail that could still become tag (so no half tag is streamed as content)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return text[:-k]
    return text


def make_parser(name: str):
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(PARSERS)}")


def complete_calls(calls: List[ToolCallText]) -> Optional[List[ToolCallText]]:
    """The calls of a finished output when every one is complete JSON, else None."""
    if not calls or not all(c.complete for c in calls):
        return None
    try:
        for c in calls:
            json.loads(c.arguments)
    except ValueError:
        return None
    return calls
