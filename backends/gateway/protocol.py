"""OpenAI's request bodies (the parts Baton serves), validated strictly: unknown fields, wrong types
and out-of-range values are refused with OpenAI's error object naming the parameter, before anything
reaches the server. Then each request becomes the `llm` model's input tensors."""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    # strict: "0.5" is not a number, 1.0 is not an integer (OpenAI's API refuses both); no Infinity/NaN
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling parameters (the openai SDK sends them with extra_body=); the server checks
    # the rest of each range and names the parameter
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    ignore_eos: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=0)    # the chosen token's logprob only (README)
    echo: Literal[False] = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str                                    # a data URL (data:image/png;base64,...): images are not fetched
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart | ImagePart]   # parts: text and images (a vision model)
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0)  # the chosen token's logprob only (README)


class APIError(Exception):
    """An error in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "literal"}
# OpenAI's parameters that Baton does not serve: named as such, not as misspellings
UNSERVED = frozenset({"response_format", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
                      "logit_bias", "audio", "modalities", "prediction", "reasoning_effort", "service_tier", "store",
                      "metadata", "web_search_options", "best_of", "suffix"})


def _default(name: str, value: Any) -> bool:
    """An unserved parameter set to what it means when absent."""
    return value in (None, {}, []) or (name, value) in (("response_format", {"type": "text"}), ("tool_choice", "none"),
                                                       ("parallel_tool_calls", True), ("store", False))


def parse(cls: type[_Sampling], raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    # an unserved parameter set to what it means by default (SDKs and frameworks send these) changes nothing
    body = {k: v for k, v in body.items() if not (k in UNSERVED and _default(k, v))}
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # the field's path, without pydantic's union-member tags ("prompt.str" -> "prompt")
        param = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or p not in _TYPE_TAGS and "[" not in p) or None
        if err["type"] == "extra_forbidden" and param in UNSERVED:
            raise APIError(400, f"{param}: not supported by this server (Baton serves text generation: no "
                                "tools, structured output, logit bias or audio)", param) from None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None


# The llm model's input names for OpenAI's parameters, and back (for the server's error messages).
_RENAME = {"text_input": "prompt", "return_logprobs": "logprobs"}


def param_of(triton_field: str) -> str:
    return _RENAME.get(triton_field, triton_field)


def llm_inputs(req: _Sampling, prompt: str | None, seed_offset: int = 0, lora: str = "") -> dict[str, np.ndarray]:
    """The `llm` input tensors for one choice of `req` (`prompt` for completions; chat sends messages);
    `lora`: the adapter its `model` names."""
    x: dict[str, np.ndarray] = {}
    if lora:
        x["lora"] = np.array([lora.encode()], dtype=object)
    if prompt is not None:
        x["text_input"] = np.array([prompt.encode()], dtype=object)
    else:
        msgs = [m.model_dump(exclude_none=True) for m in req.messages]          # type: ignore[attr-defined]
        x["messages"] = np.array([json.dumps(msgs).encode()], dtype=object)
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if max_tokens is not None:
        x["max_tokens"] = np.array([max_tokens], np.int32)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        v = getattr(req, name)
        if v is not None:
            x[name] = np.array([v], np.float32)
    for name in ("top_k", "min_tokens"):
        v = getattr(req, name)
        if v is not None:
            x[name] = np.array([v], np.int32)
    if req.ignore_eos is not None:
        x["ignore_eos"] = np.array([req.ignore_eos])
    if req.seed is not None:
        x["seed"] = np.array([(req.seed + seed_offset + 2**63) % 2**64 - 2**63], np.int64)
    if req.stop:
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        x["stop"] = np.array([s.encode() for s in stops], dtype=object)
    logprobs = getattr(req, "logprobs", None)           # completions: an int (0); chat: a bool
    if logprobs is not None and logprobs is not False:
        x["return_logprobs"] = np.array([True])
    return x
