"""The `llm` ensemble's tensor contract: what a client may send and what it gets back. The server
renders its Triton configs from these lists (baton.backends.serving.tensors), so a client and the
server it talks to agree by construction."""

from __future__ import annotations

# Optional scalar inputs, each of shape [1]: (name, Triton data type). Besides these, `llm` takes
# `text_input` or `messages` (TYPE_STRING [1]) and `stop` (TYPE_STRING [-1]).
SCALARS: list[tuple[str, str]] = [
    ("max_tokens", "TYPE_INT32"), ("temperature", "TYPE_FP32"), ("top_p", "TYPE_FP32"),
    ("top_k", "TYPE_INT32"), ("min_p", "TYPE_FP32"), ("seed", "TYPE_INT64"),
    ("repetition_penalty", "TYPE_FP32"), ("presence_penalty", "TYPE_FP32"),
    ("frequency_penalty", "TYPE_FP32"), ("ignore_eos", "TYPE_BOOL"), ("return_logprobs", "TYPE_BOOL"),
]

# Outputs of every streamed response: (name, Triton data type, dims).
USER: list[tuple[str, str, int]] = [
    ("text_output", "TYPE_STRING", 1), ("token_ids", "TYPE_INT64", -1), ("finish_reason", "TYPE_STRING", 1),
    ("prompt_tokens", "TYPE_INT32", 1), ("completion_tokens", "TYPE_INT32", 1),
    ("cached_tokens", "TYPE_INT32", 1), ("logprobs", "TYPE_FP32", -1),
    ("request_id", "TYPE_STRING", 1),    # assigned by the server; in its logs too
]
