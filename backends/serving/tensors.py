"""Names and types of the tensors between stages: one place for the config templates and model.py.
What clients send and receive (SCALARS, USER) is the client package's schema; the rest is internal."""

from __future__ import annotations

from baton_client.schema import SCALARS, STRINGS, USER

__all__ = ["DRAFT_CALL", "DRAFT_REPLY", "HANDLE", "IMAGES", "PREFILL_REQUEST", "SCALARS", "STREAM", "STRINGS", "USER", "pbtxt"]

# A prompt's images (empty for text): each one's span of placeholders [start, length, t, h, w] and
# content hash (multimodal/prompt.py ImageSpan)
IMAGES = [("image_spans", "TYPE_INT64", "-1, 5"), ("image_hashes", "TYPE_STRING", -1)]

# preprocess -> [encode ->] prefill: stages.messages.PrefillRequest. `image_data`: the images as sent
# (encoded), until encode has turned them into embeddings in the node's embedding store (then empty, and
# `embed_mac` signs the image hashes: the embedding handle); `embed_source`: where an encode server
# holds them (multimodal/remote.py EmbeddingSource JSON; "": this node's store)
PREFILL_REQUEST = [("input_ids", "TYPE_INT64", -1), ("request_id", "TYPE_STRING", 1), ("sampling", "TYPE_STRING", 1),
                   *IMAGES, ("image_data", "TYPE_STRING", -1), ("embed_source", "TYPE_STRING", 1),
                   ("embed_mac", "TYPE_UINT8", -1), ("lora", "TYPE_STRING", 1)]

# prefill -> decode: stages.messages.KVHandle (`embed_source`: an encode server's slots for the
# prompt's images, read again by a decode node that recomputes the prompt)
HANDLE = [("request_id", "TYPE_STRING", 1), ("token_ids", "TYPE_INT64", -1), ("num_prompt_tokens", "TYPE_INT32", 1),
          ("num_computed_tokens", "TYPE_INT32", 1), ("block_table", "TYPE_INT64", -1),
          ("num_cached_tokens", "TYPE_INT32", 1), ("finish_reason", "TYPE_STRING", 1),
          ("sampling", "TYPE_STRING", 1), ("logprobs", "TYPE_FP32", -1),
          ("source", "TYPE_STRING", 1), ("prefill_seconds", "TYPE_FP32", 1), ("cached_by_tier", "TYPE_INT32", -1),
          *IMAGES, ("embed_source", "TYPE_STRING", 1), ("lora", "TYPE_STRING", 1), ("mac", "TYPE_UINT8", -1)]

# decode -> postprocess, one per streamed response: stages.messages.TokenDelta
STREAM = [("d_token_ids", "TYPE_INT64", -1), ("d_text", "TYPE_STRING", 1), ("d_finish_reason", "TYPE_STRING", 1),
          ("d_prompt_tokens", "TYPE_INT32", 1), ("d_completion_tokens", "TYPE_INT32", 1),
          ("d_cached_tokens", "TYPE_INT32", 1), ("d_logprobs", "TYPE_FP32", -1),
          ("d_request_id", "TYPE_STRING", 1), ("d_num_input_tokens", "TYPE_INT32", 1),
          ("d_num_output_tokens", "TYPE_INT32", 1), ("d_cached_tokens_by_tier", "TYPE_INT32", -1),
          ("d_speculative_tokens", "TYPE_INT32", -1)]

# decode -> draft, once per decode step: stages.messages.DraftCall / DraftReply
DRAFT_CALL = [("keys", "TYPE_INT64", -1), ("starts", "TYPE_INT64", -1), ("lengths", "TYPE_INT64", -1),
              ("tokens", "TYPE_INT64", -1), ("k", "TYPE_INT32", 1), ("release", "TYPE_INT64", -1)]
DRAFT_REPLY = [("drafts", "TYPE_INT64", -1), ("synced", "TYPE_INT64", -1)]


def pbtxt(specs: list[tuple[str, str, int | str]]) -> str:
    return ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] }}' for n, t, d in specs)
