"""Names and types of the tensors between stages: one place for the config templates and model.py."""

from __future__ import annotations

# optional sampling inputs of preprocess and of the `llm` ensemble
SCALARS = [("max_tokens", "TYPE_INT32"), ("temperature", "TYPE_FP32"), ("top_p", "TYPE_FP32"),
           ("top_k", "TYPE_INT32"), ("min_p", "TYPE_FP32"), ("seed", "TYPE_INT64"),
           ("repetition_penalty", "TYPE_FP32"), ("presence_penalty", "TYPE_FP32"),
           ("frequency_penalty", "TYPE_FP32"), ("ignore_eos", "TYPE_BOOL"), ("return_logprobs", "TYPE_BOOL")]

# prefill -> decode: the KV handle (backends/stages/handle.py)
HANDLE = [("token_ids", "TYPE_INT64", -1), ("num_prompt_tokens", "TYPE_INT32", 1),
          ("num_computed_tokens", "TYPE_INT32", 1), ("block_table", "TYPE_INT64", -1),
          ("num_cached_tokens", "TYPE_INT32", 1), ("finish_reason", "TYPE_STRING", 1),
          ("sampling", "TYPE_STRING", 1), ("gen_state", "TYPE_UINT8", -1), ("logprobs", "TYPE_FP32", -1)]

# decode -> postprocess, one per streamed response
STREAM = [("d_token_ids", "TYPE_INT64", -1), ("d_text", "TYPE_STRING", 1), ("d_finish_reason", "TYPE_STRING", 1),
          ("d_prompt_tokens", "TYPE_INT32", 1), ("d_completion_tokens", "TYPE_INT32", 1),
          ("d_cached_tokens", "TYPE_INT32", 1), ("d_logprobs", "TYPE_FP32", -1)]

# what clients get from `llm`
USER = [("text_output", "TYPE_STRING", 1), ("token_ids", "TYPE_INT64", -1), ("finish_reason", "TYPE_STRING", 1),
        ("prompt_tokens", "TYPE_INT32", 1), ("completion_tokens", "TYPE_INT32", 1),
        ("cached_tokens", "TYPE_INT32", 1), ("logprobs", "TYPE_FP32", -1)]


def pbtxt(specs: list[tuple[str, str, int]]) -> str:
    return ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] }}' for n, t, d in specs)
