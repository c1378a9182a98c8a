"""preprocess: text or chat messages -> token ids; sampling parameters validated here, once (later
stages carry them), so a bad request is refused before it touches the KV pool. Assigns the request
id every later message and response carries."""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.errors import InvalidRequestError
from ..engine.sampling_params import SamplingParams
from ..engine.tokenizer import Tokenizer
from ..models.config import ModelConfig
from ..multimodal.image import ImageProcessor
from ..multimodal.prompt import ImageSpan, expand_prompt
from ..serving import tensors
from .messages import PrefillRequest

MAX_IMAGES = 8          # per request: each is decoded, resized and encoded before the prompt runs

# optional scalar inputs (serving.tensors.SCALARS) -> (SamplingParams field, python type)
_KIND = {"TYPE_INT32": int, "TYPE_INT64": int, "TYPE_FP32": float, "TYPE_BOOL": bool}
_FIELD = {"return_logprobs": "logprobs", "min_length": "min_tokens"}
SCALARS = {name: (_FIELD.get(name, name), _KIND[t]) for name, t in tensors.SCALARS}
# NVIDIA's inputs that are not sampling parameters: Baton's outputs already answer them
_NOT_SAMPLING = {"exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens"}
# The vLLM backend's `sampling_parameters` JSON keys Baton serves -> (SamplingParams field, type)
_JSON_KEYS = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
              "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
              "ignore_eos": bool, "min_tokens": int, "stop": list}


class Preprocessor:
    def __init__(self, model_dir: str, max_model_len: int, max_tokens_limit: int,
                 max_images: int = MAX_IMAGES, loras: Collection[str] = ()) -> None:
        """loras: the names of the LoRA adapters the node loaded (a request's `lora` names one)."""
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
        cfg = ModelConfig.from_dir(model_dir)
        self.image_token_id = cfg.image_token_id          # None: a text model
        self.images = ImageProcessor.from_dir(model_dir) if cfg.vision_config is not None else None
        self.max_images = max_images
        self.loras = frozenset(loras)

    def __call__(self, inputs: dict[str, np.ndarray], request_id: str = "") -> PrefillRequest:
        """Triton inputs -> the message prefill takes (request_id: a fresh one when empty)."""
        ids, images = self._prompt_ids(inputs)
        kw: dict[str, Any] = {}
        for name, (field, kind) in SCALARS.items():
            if name not in inputs:
                continue
            value = _scalar(name, inputs[name], kind)
            if name == "exclude_input_in_output" and not value:
                raise InvalidRequestError(name, "false is not supported: Baton returns the generated text only")
            if name in _NOT_SAMPLING:
                continue
            if field in kw:
                raise InvalidRequestError(name, f"given twice (also as {field})")
            kw[field] = value
        stops = [_utf8(n, s) for n in ("stop", "stop_words") if n in inputs for s in inputs[n].reshape(-1)]
        if stops:
            kw["stop"] = stops
        if "bad_words" in inputs:
            kw["bad_words_token_ids"] = self._bad_words([_utf8("bad_words", w) for w in inputs["bad_words"].reshape(-1)])
        if "sampling_parameters" in inputs:
            for field, value in _sampling_json(_utf8("sampling_parameters", inputs["sampling_parameters"].reshape(-1)[0])):
                if field in kw:
                    raise InvalidRequestError("sampling_parameters", f"{field}: given twice (also as an input)")
                kw[field] = value
        params = SamplingParams(**kw)          # raises InvalidRequestError naming the field
        if params.max_tokens > self.max_tokens_limit:
            raise InvalidRequestError("max_tokens", f"{params.max_tokens} is above this server's limit "
                                      f"of {self.max_tokens_limit}")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError("text_input", f"prompt of {len(ids)} tokens leaves no room to generate "
                                      f"within max_model_len={self.max_model_len}")
        lora = _utf8("lora", inputs["lora"].reshape(-1)[0]) if "lora" in inputs and inputs["lora"].size else ""
        if lora and lora not in self.loras:
            known = ", ".join(sorted(self.loras)) or "none"
            raise InvalidRequestError("lora", f"no LoRA adapter named {lora!r}; this server has: {known}")
        ids, spans, data = self._with_images(ids, images)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError("image", f"the prompt with its images' {len(ids)} tokens leaves no room "
                                      f"to generate within max_model_len={self.max_model_len}")
        return PrefillRequest(request_id or uuid.uuid4().hex, ids, params, spans, data, lora=lora)

    def _with_images(self, ids: list[int], images: list[Any]) -> tuple[list[int], list[ImageSpan], list[bytes]]:
        """Each image decoded (a bad one is refused here), hashed and measured; its placeholder
        repeated once per embedding it becomes. The images go on as sent: the stage that runs the
        tower makes their patches."""
        if self.images is None or self.image_token_id is None:
            if images:
                raise InvalidRequestError("image", "this model does not take images")
            return ids, [], []
        if not images and self.image_token_id not in ids:
            return ids, [], []
        if len(images) > self.max_images:
            raise InvalidRequestError("image", f"{len(images)} images; at most {self.max_images} per request")
        processed = [self.images(im, f"image[{i}]") for i, im in enumerate(images)]
        ids, mm = expand_prompt(ids, self.image_token_id, processed, self.images.merge)
        return ids, mm.spans, [p.data for p in processed]

    def _bad_words(self, words: list[str]) -> list[list[int]]:
        """Each word's token ids, as written and after a space (how it appears mid-text), as vLLM does."""
        out: list[list[int]] = []
        for w in words:
            if not w:
                raise InvalidRequestError("bad_words", "must be non-empty strings")
            for form in (w, " " + w.lstrip()):
                ids = self.tok.encode(form)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def _prompt_ids(self, inputs: dict[str, np.ndarray]) -> tuple[list[int], list[Any]]:
        """The prompt's token ids and its images (from the `image` tensor, or messages' image parts)."""
        if "messages" in inputs and "text_input" in inputs:
            raise InvalidRequestError("messages", "give text_input or messages, not both")
        images: list[Any] = list(inputs["image"].reshape(-1)) if "image" in inputs else []
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
            parts = _image_parts(messages)
            if self.images is None:          # a text model's template takes strings: text parts joined
                messages = [m | {"content": _text_of(m["content"])} for m in messages]
            if parts and images:
                raise InvalidRequestError("image", "give images as messages' content parts or in `image`, not both")
            images = images or parts
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
        return ids, images


def _text_of(content: Any) -> Any:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def _image_parts(messages: list[dict]) -> list[Any]:
    """Images in chat content parts, in order: {"type": "image_url", "image_url": {"url": data URL}}
    (OpenAI's form) or {"type": "image", "image": base64 or data URL}."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
            raise InvalidRequestError("messages", "content must be a string or a list of parts")
        for p in content:
            kind = p.get("type")
            if kind == "image_url":
                url = p.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise InvalidRequestError("messages", "an image_url part needs image_url.url (a data URL)")
                out.append(url)
            elif kind == "image":
                if not isinstance(p.get("image"), str):
                    raise InvalidRequestError("messages", "an image part needs `image` (base64 or a data URL)")
                out.append(p["image"])
            elif kind != "text":
                raise InvalidRequestError("messages", f"content part type {kind!r} is not supported (text, image_url, image)")
    return out


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


def _sampling_json(text: str) -> list[tuple[str, Any]]:
    """The vLLM backend's `sampling_parameters`: a JSON object whose values may also be strings
    ("0.7", "true"), as its examples send them. Unknown keys are refused, naming them."""
    try:
        obj = json.loads(text)
    except ValueError:
        raise InvalidRequestError("sampling_parameters", "must be a JSON object") from None
    if not isinstance(obj, dict):
        raise InvalidRequestError("sampling_parameters", "must be a JSON object")
    out = []
    for key, v in obj.items():
        kind = _JSON_KEYS.get(key)
        if kind is None:
            raise InvalidRequestError("sampling_parameters", f"{key}: unknown key; known: {sorted(_JSON_KEYS)}")
        try:
            if kind is list:
                v = [v] if isinstance(v, str) else v
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise ValueError
            elif kind is bool:
                v = {"true": True, "false": False}.get(v.lower(), v) if isinstance(v, str) else v
                if not isinstance(v, bool):
                    raise ValueError
            elif isinstance(v, str):
                v = kind(v)
            elif kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
        except ValueError:
            raise InvalidRequestError("sampling_parameters", f"{key}: {v!r} is not a {kind.__name__}") from None
        out.append((key, v))
    return out


def _chat_template(model_dir: Path):  # noqa: ANN202 - a jinja2 Template or None
    import jinja2

    src = None
    if (model_dir / "chat_template.jinja").is_file():
        src = (model_dir / "chat_template.jinja").read_text()
    elif (model_dir / "tokenizer_config.json").is_file():
        src = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    return jinja2.Environment(autoescape=False).from_string(src) if src else None
