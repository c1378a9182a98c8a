"""Thin wrapper over a checkpoint's tokenizer.json (the `tokenizers` library: fast to import)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, tok: _HFTokenizer) -> None:
        self._tok = tok

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer | None:
        f = Path(model_dir) / "tokenizer.json"
        return cls(_HFTokenizer.from_file(str(f))) if f.is_file() else None

    def max_token_chars(self) -> int:
        """An upper bound on the characters one token stands for (the longest vocabulary entry):
        a text of n characters has at least n / this many tokens."""
        return max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
