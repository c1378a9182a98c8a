"""The `llm` ensemble's tensor contract: what a client may send and what it gets back. The server
renders its Triton configs from these lists (baton.backends.serving.tensors), so a client and the
server it talks to agree by construction."""

from __future__ import annotations

# Optional scalar inputs, each of shape [1]: (name, Triton data type). The last five are NVIDIA's
# names (TensorRT-LLM / vLLM backend models): min_length is min_tokens; exclude_input_in_output must
# be true (Baton returns generated text only); return_num_*_tokens are accepted (those outputs are
# always sent).
SCALARS: list[tuple[str, str]] = [
    ("max_tokens", "TYPE_INT32"), ("temperature", "TYPE_FP32"), ("top_p", "TYPE_FP32"),
    ("top_k", "TYPE_INT32"), ("min_p", "TYPE_FP32"), ("seed", "TYPE_INT64"),
    ("repetition_penalty", "TYPE_FP32"), ("presence_penalty", "TYPE_FP32"),
    ("frequency_penalty", "TYPE_FP32"), ("ignore_eos", "TYPE_BOOL"), ("return_logprobs", "TYPE_BOOL"),
    ("min_tokens", "TYPE_INT32"), ("min_length", "TYPE_INT32"), ("exclude_input_in_output", "TYPE_BOOL"),
    ("return_num_input_tokens", "TYPE_BOOL"), ("return_num_output_tokens", "TYPE_BOOL"),
]

# Optional string inputs: (name, dims). `text_input` or `messages` (a JSON list of {role, content})
# is the prompt; `stop` / `stop_words` are stop strings, `bad_words` strings never to generate;
# `sampling_parameters` is the vLLM backend's JSON object of sampling parameters. `image`: images
# (encoded bytes, base64 or data URLs), one per <|image_pad|> in text_input, for a vision model;
# with `messages`, images come as content parts ({"type": "image_url", "image_url": {"url": ...}}).
# `lora`: the name of a LoRA adapter the server loaded (its `lora_modules`); absent or "": the base model.
STRINGS: list[tuple[str, int]] = [
    ("text_input", 1), ("messages", 1), ("sampling_parameters", 1), ("stop", -1), ("stop_words", -1),
    ("bad_words", -1), ("image", -1), ("lora", 1),
]

# Outputs of every streamed response: (name, Triton data type, dims).
USER: list[tuple[str, str, int]] = [
    ("text_output", "TYPE_STRING", 1), ("token_ids", "TYPE_INT64", -1), ("finish_reason", "TYPE_STRING", 1),
    ("prompt_tokens", "TYPE_INT32", 1), ("completion_tokens", "TYPE_INT32", 1),
    ("cached_tokens", "TYPE_INT32", 1), ("logprobs", "TYPE_FP32", -1),
    ("request_id", "TYPE_STRING", 1),    # assigned by the server; in its logs too
    ("num_input_tokens", "TYPE_INT32", 1), ("num_output_tokens", "TYPE_INT32", 1),   # NVIDIA's names:
    # the prompt's tokens, and the tokens in this response
    ("cached_tokens_by_tier", "TYPE_INT32", -1),   # cached_tokens by where they came from: TIERS
    ("speculative_tokens", "TYPE_INT32", -1),      # speculative decoding so far: [draft tokens verified,
    # accepted, target steps that verified drafts]; mean acceptance length = 1 + accepted / steps
]

# The KV cache tiers, in the order of cached_tokens_by_tier: the node's pool (GPU memory on a GPU
# host), host memory, Mooncake Store (cluster-wide), local files or Redis.
TIERS = ("device", "host", "store", "disk")
