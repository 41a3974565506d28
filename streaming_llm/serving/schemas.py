"""The request bodies the server accepts (strict pydantic schemas) and its OpenAI-shaped errors."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..runtime.sampling import SamplingConfig


class RequestError(Exception):
    """Bad input found while handling a request: becomes an OpenAI-style error with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# -- request schemas ----------------------------------------------------------------------------------------
def _text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (invalid Unicode); send valid UTF-8 text") from None
    return value


# Sampling values inside OpenAI's ranges that cannot work numerically (they overflow float32 logits or round
# to 0): refused up front with a 400 rather than failing mid-turn.
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6
MIN_PENALTY = 1e-3


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str

    _check = field_validator("text")(_text)


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value):
        return _text(value) if isinstance(value, str) else value

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    @property
    def kind(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampling(_Strict):
    """The fields both completion endpoints share. Sampling fields left out (None) take the operator's defaults
    (``streaming-llm serve --temperature ...``; :meth:`config`)."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    min_p: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: (
        Annotated[str, Field(min_length=1, max_length=256)]
        | Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=4)]
        | None
    ) = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE} (smaller ones overflow the logits)")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value):
        if value is not None and value < MIN_TOP_P:
            raise ValueError(f"must be at least {MIN_TOP_P} (smaller ones vanish in float32 and keep no token)")
        return value

    @field_validator("repetition_penalty")
    @classmethod
    def _penalty(cls, value):
        if value is not None and value < MIN_PENALTY:
            raise ValueError(f"must be at least {MIN_PENALTY} (smaller ones overflow the logits)")
        return value

    @field_validator("stop", "user")
    @classmethod
    def _strings(cls, value):
        for item in [value] if isinstance(value, str) else value or []:
            _text(item)
        return value

    def config(self, defaults: SamplingConfig | None = None) -> SamplingConfig:
        """The effective sampling: ``defaults`` (the server's; else greedy :class:`SamplingConfig()`), overridden
        by every sampling field the request gives."""
        base = defaults or SamplingConfig()
        given = {name: getattr(self, name) for name in REQUEST_SAMPLING if getattr(self, name) is not None}
        return dataclasses.replace(base, **given)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


# The request fields that override a SamplingConfig field of the same name.
REQUEST_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported (a string, or a list of one string)")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return _text(value)


# Fields OpenAI defines that this server does not implement: accepted only at their "off" value.
UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "n": (1, None), "logprobs": (False, None), "top_logprobs": (None, 0), "tools": (None,), "tool_choice": (None,),
    "functions": (None,), "function_call": (None,), "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}), "parallel_tool_calls": (None,), "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None), "echo": (False, None), "best_of": (1, None), "suffix": (None, ""),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "store": (False, None), "metadata": (None,), "service_tier": (None, "auto", "default"),
}  # fmt: skip
ALIASES = {"max_completion_tokens": "max_tokens"}


def parse_body(raw: bytes, schema: type[BaseModel]) -> Any:
    """Parse and check a JSON body; raise :class:`RequestError` (400) saying exactly what is wrong."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise RequestError(400, "The JSON body is nested too deeply.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise RequestError(400, f"The body is not valid JSON: {problem}.") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits())
        raise RequestError(400, "The body has a number with too many digits.") from None
    if not isinstance(data, dict):
        raise RequestError(400, "The body must be a JSON object.")
    unsupported = [name for name, off in UNSUPPORTED.items() if name in data and data[name] not in off]
    if unsupported:
        raise RequestError(400, f"Unsupported field(s): {', '.join(unsupported)}. This server generates one text "
                                "choice per request, without tools, logprobs or penalties other than "
                                "repetition_penalty; leave these fields out.", param=unsupported[0])  # fmt: skip
    data = {k: v for k, v in data.items() if k not in UNSUPPORTED}
    for alias, name in ALIASES.items():
        if alias in data:
            if name in data and data[name] != data[alias]:
                raise RequestError(400, f"Give {name} or {alias}, not both.", param=alias)
            data[name] = data.pop(alias)
    try:
        return schema.model_validate(data)
    except ValidationError as problem:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in problem.errors())
        first = ".".join(map(str, problem.errors()[0]["loc"])) if problem.errors() else None
        raise RequestError(400, f"Invalid request: {details}.", param=first) from None
    except RecursionError:
        raise RequestError(400, "The JSON body is nested too deeply.") from None
