"""Incremental detokenization with stop strings.

Byte-level BPE tokens can end inside a UTF-8 character, and a token's text can depend on its
neighbours, so each step decodes a short window (from `prefix` to the end) and emits only what
extends the previous window's text, never a trailing U+FFFD. With stop strings, the last
len(longest stop) - 1 characters are held back until they cannot start a stop string."""

from __future__ import annotations

from .tokenizer import Tokenizer


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str] | None = None) -> None:
        self.tok = tokenizer
        self.ids = list(prompt_ids[-6:])       # a little prompt context for the first tokens
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""                          # output text so far (stop string cut off)
        self.sent = 0                           # chars of `text` already emitted
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False

    def add(self, token_ids: list[int]) -> None:
        for t in token_ids:
            self.ids.append(t)
            before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
            after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self.prefix, self.read = self.read, len(self.ids)
            if self.stop and self._check_stop():
                return

    def _check_stop(self) -> bool:
        window = self.text[max(0, self.sent - self.hold):]
        base = max(0, self.sent - self.hold)
        hits = [base + i for s in self.stop if (i := window.find(s)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def delta(self, final: bool = False) -> str:
        """New text to emit; holds back a possible stop-string prefix unless final. At the end,
        bytes that never completed a character are flushed as U+FFFD, as a full decode shows them."""
        if final and not self.stopped and self.read < len(self.ids):
            before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
            after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
            if len(after) > len(before):
                self.text += after[len(before):]
            self.read = len(self.ids)
        end = len(self.text) if (final or self.stopped or not self.stop) else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out
