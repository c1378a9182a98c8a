"""Response shaping: decode already produces text deltas (it must detokenize to honour stop strings,
which end generation), so what is left is mapping decode's stream tensors to the user-facing names.
The llm front (stages/front.py) and the llm ensemble (model_repository/llm) both use this map."""

from ..serving.tensors import STREAM, USER

RENAME = {"d_text": "text_output"} | {n: n[2:] for n, _, _ in STREAM if n != "d_text"}
assert sorted(RENAME.values()) == sorted(n for n, _, _ in USER)
