"""postprocess: decode already produces text deltas (it must detokenize to honour stop strings, which
end generation), so this stage maps decode's stream tensors to the user-facing names. It is the
place for response shaping that needs no generation state."""

from ..serving.tensors import STREAM, USER

RENAME = {"d_text": "text_output"} | {n: n[2:] for n, _, _ in STREAM if n != "d_text"}
assert sorted(RENAME.values()) == sorted(n for n, _, _ in USER)
