"""preprocess: text or chat messages -> token ids; sampling parameters validated here, once (later
stages carry them), so a bad request is refused before it touches the KV pool. Assigns the request
id every later message and response carries."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.errors import InvalidRequestError
from ..engine.sampling_params import SamplingParams
from ..engine.tokenizer import Tokenizer
from ..serving import tensors
from .messages import PrefillRequest

# optional scalar inputs (serving.tensors.SCALARS) -> (SamplingParams field, python type)
_KIND = {"TYPE_INT32": int, "TYPE_INT64": int, "TYPE_FP32": float, "TYPE_BOOL": bool}
_FIELD = {"return_logprobs": "logprobs"}
SCALARS = {name: (_FIELD.get(name, name), _KIND[t]) for name, t in tensors.SCALARS}


class Preprocessor:
    def __init__(self, model_dir: str, max_model_len: int, max_tokens_limit: int) -> None:
        tok = Tokenizer.from_dir(model_dir)
        if tok is None:
            raise ValueError(f"no tokenizer.json in {model_dir}")
        self.tok = tok
        # a prompt longer than this many characters cannot fit in max_model_len tokens: refused before
        # tokenizing it (a 10 MB prompt took seconds of this stage's time); x2 for normalizer slack
        self.max_prompt_chars = 2 * max_model_len * tok.max_token_chars()
        self.max_model_len = max_model_len
        self.max_tokens_limit = max_tokens_limit
        self.chat_template = _chat_template(Path(model_dir))

    def __call__(self, inputs: dict[str, np.ndarray], request_id: str = "") -> PrefillRequest:
        """Triton inputs -> the message prefill takes (request_id: a fresh one when empty)."""
        ids = self._prompt_ids(inputs)
        kw: dict[str, Any] = {}
        for name, (field, kind) in SCALARS.items():
            if name in inputs:
                kw[field] = _scalar(name, inputs[name], kind)
        if "stop" in inputs:
            kw["stop"] = [_utf8("stop", s) for s in inputs["stop"].reshape(-1)]
        params = SamplingParams(**kw)          # raises InvalidRequestError naming the field
        if params.max_tokens > self.max_tokens_limit:
            raise InvalidRequestError("max_tokens", f"{params.max_tokens} is above this server's limit "
                                      f"of {self.max_tokens_limit}")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError("text_input", f"prompt of {len(ids)} tokens leaves no room to generate "
                                      f"within max_model_len={self.max_model_len}")
        return PrefillRequest(request_id or uuid.uuid4().hex, ids, params)

    def _prompt_ids(self, inputs: dict[str, np.ndarray]) -> list[int]:
        if "messages" in inputs and "text_input" in inputs:
            raise InvalidRequestError("messages", "give text_input or messages, not both")
        if "messages" in inputs:
            raw = _utf8("messages", inputs["messages"].reshape(-1)[0])
            try:
                messages = json.loads(raw)
                assert isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                          for m in messages) and messages
            except (ValueError, AssertionError):
                raise InvalidRequestError("messages", "must be a JSON list of {role, content} objects") from None
            if self.chat_template is None:
                raise InvalidRequestError("messages", "this model has no chat template")
            text = self.chat_template.render(messages=messages, add_generation_prompt=True)
        elif "text_input" in inputs:
            text = _utf8("text_input", inputs["text_input"].reshape(-1)[0])
        else:
            raise InvalidRequestError("text_input", "required (or `messages`)")
        if not text:
            raise InvalidRequestError("text_input", "must not be empty")
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError("text_input", f"{len(text)} characters cannot fit in max_model_len="
                                      f"{self.max_model_len} tokens (at most {self.max_prompt_chars} characters)")
        ids = self.tok.encode(text)
        if not ids:
            raise InvalidRequestError("text_input", "tokenizes to nothing")
        return ids


def _utf8(field: str, raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(field, "is not valid UTF-8") from None


def _scalar(name: str, arr: np.ndarray, kind: type) -> Any:
    if arr.size != 1:
        raise InvalidRequestError(name, f"must hold one value, got shape {list(arr.shape)}")
    v = arr.reshape(-1)[0]
    if kind is bool:
        if arr.dtype != np.bool_:
            raise InvalidRequestError(name, f"must be BOOL, got {arr.dtype}")
        return bool(v)
    if kind is int and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidRequestError(name, f"must be an integer type, got {arr.dtype}")
    if kind is float and not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidRequestError(name, f"must be a number, got {arr.dtype}")
    return kind(v)


def _chat_template(model_dir: Path):  # noqa: ANN202 - a jinja2 Template or None
    import jinja2

    src = None
    if (model_dir / "chat_template.jinja").is_file():
        src = (model_dir / "chat_template.jinja").read_text()
    elif (model_dir / "tokenizer_config.json").is_file():
        src = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    return jinja2.Environment(autoescape=False).from_string(src) if src else None
