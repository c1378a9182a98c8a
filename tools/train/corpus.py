"""The training text every machine has: the Python standard library's `.py` sources, split by file
into train and held-out parts, tokenized into one stream per split.

The split is a hash of each file's path relative to the stdlib root, so it does not depend on the
order files are found in and stays the same when files are added.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def is_test(rel_path: str) -> bool:
    """The stdlib's own test suites: ~60% of its bytes, repetitive, and not the code we want to write."""
    *dirs, name = rel_path.split("/")
    return any(d in ("test", "tests", "idle_test") for d in dirs) or name.startswith("test_")


def is_heldout(rel_path: str, heldout_percent: int) -> bool:
    return xxhash.xxh64_intdigest(rel_path.encode()) % 100 < heldout_percent


@dataclass
class Split:
    train: list[str]      # file texts
    heldout: list[str]
    heldout_files: list[str]


def stdlib_texts() -> Iterator[tuple[str, str]]:
    """(path relative to the stdlib root, text) of every readable UTF-8 source, in path order."""
    root = stdlib_root()
    for f in stdlib_files():
        try:
            yield f.relative_to(root).as_posix(), f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def first_bytes(texts: Iterable[str], n: int) -> list[str]:
    """Texts in order until they hold at least n characters (the last one crosses the mark)."""
    out, size = [], 0
    for t in texts:
        if size >= n:
            break
        out.append(t)
        size += len(t)
    return out


def read_split(heldout_percent: int = 5, max_bytes: int | None = None, include_tests: bool = False) -> Split:
    """Texts of the stdlib files, by split. `max_bytes` caps the train part (for quick runs)."""
    train, heldout, names, size = [], [], [], 0
    for rel, text in stdlib_texts():
        if not include_tests and is_test(rel):
            continue
        if is_heldout(rel, heldout_percent):
            heldout.append(text)
            names.append(rel)
        elif max_bytes is None or size < max_bytes:
            train.append(text)
            size += len(text)
    return Split(train, heldout, names)


def train_tokenizer(vocab_size: int, texts: list[str], specials: list[str] = SPECIAL_TOKENS):  # noqa: ANN201
    """Byte-level BPE (a tokenizers.Tokenizer): any UTF-8 text round-trips; the specials come first
    (ids 0, 1, 2, then any extra ones, e.g. a vision model's placeholders)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out: Path, model_max_length: int = 2048, specials: list[str] = SPECIAL_TOKENS,  # noqa: ANN001
                   chat_template: str = CHAT_TEMPLATE) -> None:
    """Write tokenizer.json + tokenizer_config.json (with the ChatML template) for AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
        additional_special_tokens=specials[1:],
        clean_up_tokenization_spaces=False,   # else decode() rewrites " ." and breaks the round trip
        model_max_length=model_max_length,
    )
    fast.chat_template = chat_template
    fast.save_pretrained(str(out))


def tokenize_stream(tok, texts: list[str]) -> np.ndarray:  # noqa: ANN001
    """All texts as one int32 token stream, each file followed by the end-of-text token."""
    eos = tok.token_to_id(EOS)
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def random_windows(stream: np.ndarray, batch: int, length: int, seed: int) -> Iterator[np.ndarray]:
    """Endless batches of `length`+1 consecutive tokens at random offsets (inputs and shifted labels)."""
    rng = np.random.default_rng(seed)
    hi = len(stream) - length - 1
    if hi <= 0:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one window of {length + 1}")
    while True:
        starts = rng.integers(0, hi, size=batch)
        yield np.stack([stream[s:s + length + 1] for s in starts])


def fixed_windows(stream: np.ndarray, length: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows from the start of the stream: the same evaluation slice every time."""
    n = (len(stream) - 1) // length
    if max_windows is not None:
        n = min(n, max_windows)
    return np.stack([stream[i * length:i * length + length + 1] for i in range(n)])
