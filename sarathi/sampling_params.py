"""Sampling parameters of one request (vLLM's names and meanings)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

_GREEDY_EPS = 1e-5
MAX_TEMPERATURE = 100.0          # beyond this every distribution is flat to float precision
MAX_REPETITION_PENALTY = 100.0


class InvalidParam(ValueError):
    """A request parameter is out of range; `param` names it (the API's `error.param`)."""

    def __init__(self, param: Optional[str], message: str, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code      # the API's `error.code` (e.g. context_length_exceeded)


def _valid_text(text: str) -> bool:
    """Encodable as UTF-8: a lone surrogate (JSON's \\ud800) is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class OptimalSamplingParams:
    """Sample from q* ∝ π_θ^(1−α) π_t^α (seed 003): `target` names π_t (a model loaded with
    --optimal-sampling-target, or a LoRA adapter); alpha "auto" solves KL(q‖π_θ) = KL(q‖π_t)
    at every token, a number in [0, 1] fixes it."""

    target: str
    alpha: Union[str, float] = "auto"
    tol: float = 1e-6

    def __post_init__(self):
        if not isinstance(self.target, str) or not self.target or not _valid_text(self.target):
            raise InvalidParam("optimal_sampling", "optimal_sampling needs a target model name")
        a = self.alpha
        if not (a == "auto" or (isinstance(a, (int, float)) and not isinstance(a, bool)
                                and math.isfinite(a) and 0.0 <= a <= 1.0)):
            raise InvalidParam("optimal_sampling", f"optimal_sampling alpha must be 'auto' or a number in [0, 1], "
                                                   f"got {a!r}")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 0.1):
            raise InvalidParam("optimal_sampling", "optimal_sampling tol must be in (0, 0.1)")

    @property
    def fixed_alpha(self) -> Optional[float]:
        return None if self.alpha == "auto" else float(self.alpha)

    @classmethod
    def from_value(cls, value: Any) -> "OptimalSamplingParams":
        """From the API's {"target_model", "alpha", "tol"} (or an instance)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise InvalidParam("optimal_sampling", "optimal_sampling must be an object like "
                                                   '{"target_model": "...", "alpha": "auto"}')
        unknown = set(value) - {"target_model", "target", "alpha", "tol"}
        if unknown:
            raise InvalidParam("optimal_sampling", f"optimal_sampling has unknown keys {sorted(unknown)}")
        target = value.get("target_model", value.get("target"))
        return cls(target, value.get("alpha", "auto"), value.get("tol", 1e-6))


# What a structured-outputs constraint can be, in the order a request's fields are read.
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain the output (vLLM's names): to a JSON schema (`json`, a dict or its JSON text), a
    regular expression, one of the strings in `choice`, a grammar in EBNF / GBNF (`grammar`) or
    any JSON object (`json_object=True`). Exactly one of them. `disable_any_whitespace`: JSON
    without free whitespace between tokens. `param` is the request field it came from (named
    in errors). Checked here for shape only; the grammar itself is parsed and compiled by the
    engine (sarathi/structured_outputs), off the step loop."""

    json: Union[None, str, Dict[str, Any]] = None
    regex: Optional[str] = None
    choice: Optional[Tuple[str, ...]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_any_whitespace: bool = False
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self):
        p = self.param
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidParam(p, f"{p} needs exactly one of {', '.join(STRUCTURED_KINDS)}; got "
                                  f"{', '.join(given) or 'none'}")
        if self.json is not None:
            # One canonical text (keys in the given order: they decide the order fields are generated in),
            # so that equal schemas share a compiled grammar and the params stay hashable.
            try:
                value = json.loads(self.json) if isinstance(self.json, str) else self.json
                text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError, RecursionError) as e:
                raise InvalidParam(p, f"{p}: the JSON schema is not valid JSON: {str(e)[:200]}") from None
            if not isinstance(value, (dict, bool)):
                raise InvalidParam(p, f"{p}: a JSON schema must be an object, got {type(value).__name__}")
            object.__setattr__(self, "json", text)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or not _valid_text(value)):
                raise InvalidParam(p, f"{p}: {name} must be a non-empty string of valid Unicode")
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, str) or not isinstance(choice, (list, tuple)) or not choice or \
                    not all(isinstance(c, str) and c and _valid_text(c) for c in choice):
                raise InvalidParam(p, f"{p}: choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(choice))
        if self.json_object not in (None, True, False):
            raise InvalidParam(p, f"{p}: json_object must be true or false")
        if not isinstance(self.disable_any_whitespace, bool):
            raise InvalidParam(p, f"{p}: disable_any_whitespace must be true or false")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as text (what a size limit counts)."""
        value = getattr(self, self.kind)
        return "\n".join(value) if self.kind == "choice" else str(value)

    @classmethod
    def from_value(cls, value: Any, param: str = "structured_outputs") -> "StructuredOutputsParams":
        """From the API's {"json" | "regex" | "choice" | "grammar" | "json_object", "disable_any_whitespace"}
        (or an instance)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise InvalidParam(param, f"{param} must be an object like {{\"json\": {{...}}}} or {{\"regex\": \"...\"}}")
        unknown = set(value) - {*STRUCTURED_KINDS, "disable_any_whitespace"}
        if unknown:
            raise InvalidParam(param, f"{param} has unsupported keys {sorted(map(str, unknown))[:5]}")
        kwargs = {k: v for k, v in value.items() if v is not None}
        return cls(**kwargs, param=param)


@dataclass
class SamplingParams:
    """How to sample the output of one request.

    ``temperature == 0`` means greedy decoding. ``seed`` makes a request's random
    choices independent of whatever else shares its batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[Dict[int, float]] = None
    seed: Optional[int] = None
    stop: Union[None, str, List[str]] = None
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    optimal_sampling: Optional[OptimalSamplingParams] = None
    structured_outputs: Optional[StructuredOutputsParams] = None
    # Prefix caching: requests share cached KV only with requests of the same salt (tenants).
    cache_salt: Optional[str] = None
    stop_strs: List[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop_strs = []
        elif isinstance(self.stop, str):
            self.stop_strs = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_strs = list(self.stop)
        else:
            raise InvalidParam("stop", f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.optimal_sampling is not None:
            self.optimal_sampling = OptimalSamplingParams.from_value(self.optimal_sampling)
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, OverflowError):
                raise InvalidParam("logit_bias", "logit_bias must map token ids to numbers") from None
        self._verify()

    @classmethod
    def from_request(cls, values: Mapping[str, Any], **overrides: Any) -> "SamplingParams":
        """Build from any mapping holding (some of) our field names (an API request body, CLI
        flags); other keys are ignored, `overrides` win."""
        names = {f.name for f in fields(cls) if f.init}
        kwargs = {k: v for k, v in values.items() if k in names and v is not None}
        kwargs.update(overrides)
        return cls(**kwargs)

    def _verify(self) -> None:
        def bad(name: str, why: str) -> None:
            value = repr(getattr(self, name))
            raise InvalidParam(name, f"{name} {why}, got {value[:80]}")

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_float(x) -> bool:  # a finite number: NaN and infinities never pass
            return is_int(x) or (isinstance(x, float) and math.isfinite(x))

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not is_float(getattr(self, name)):
                bad(name, "must be a finite number")
        for name in ("n", "top_k", "min_tokens"):
            if not is_int(getattr(self, name)):
                bad(name, "must be an integer")
        if self.n < 1:
            bad("n", "must be an integer >= 1")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            bad("temperature", f"must be in [0, {MAX_TEMPERATURE}]")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            bad("top_k", "must be -1 (disable) or at least 1")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            bad("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY}]")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 0):
            bad("max_tokens", "must be an integer >= 0")
        if self.min_tokens < 0:
            bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                bad(name, "must be an integer >= 0")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            bad("seed", "must be an integer in [0, 2**64)")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.logit_bias and any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            bad("logit_bias", "values must be in [-100, 100]")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt
                                            or len(self.cache_salt) > 256 or not _valid_text(self.cache_salt)):
            bad("cache_salt", "must be a non-empty string of valid Unicode, at most 256 characters")
        if any(not _valid_text(s) for s in self.stop_strs):
            raise InvalidParam("stop", "stop strings must be valid Unicode (no lone surrogates)")
        if any(s == "" for s in self.stop_strs):
            raise InvalidParam("stop", "stop strings must not be empty")
        if self.optimal_sampling is not None:
            # q* is the two models' own distributions mixed: nothing may reshape them.
            changed = [name for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", -1), ("min_p", 0.0),
                                                  ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                                                  ("repetition_penalty", 1.0))
                       if getattr(self, name) != default] + (["logit_bias"] if self.logit_bias else [])
            if changed:
                raise InvalidParam("optimal_sampling", f"optimal_sampling samples q* of the two models as they are; "
                                                       f"leave {', '.join(changed)} at their defaults")

        if self.structured_outputs is not None:
            p = self.structured_outputs.param
            if self.optimal_sampling is not None:
                raise InvalidParam(p, f"{p} cannot be combined with optimal_sampling")
            if self.ignore_eos:
                raise InvalidParam(p, f"{p} cannot be combined with ignore_eos: the grammar decides where the "
                                      f"output ends")

    @property
    def reads_whole_prompt(self) -> bool:
        """Prompt logprobs need every prompt position computed, and optimal sampling's target model
        mirrors this KV without the cache: such requests never take cached blocks."""
        return self.prompt_logprobs is not None or self.optimal_sampling is not None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def clone(self, **changes) -> "SamplingParams":
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values.update(changes)
        return SamplingParams(**values)
