"""SpeculativeConfig: the `speculative` table of an engine config (`[engine.speculative]` in a
profile, `LLM(model, speculative_config={...})` offline, written as vLLM users write it).

    method                  "ngram" (prompt lookup), "draft" (a small model), "medusa", "eagle"
    num_speculative_tokens  k, drafts per sequence per step
    model                   the draft model's or the heads' directory (draft, medusa, eagle)
    max_batch               speculate only while at most this many sequences decode (2 CPU cores: the
                            k+1 rows per sequence cost more than they save from about batch 2 up)
    adaptive                a sequence drafts only while its verifying steps emit more tokens than
                            the measured break-even (spec/adaptive.py); below it, it probes at most
                            once every `probe_every` steps. False: always draft
    prompt_lookup_max/min   n-gram sizes of the prompt lookup
    proposer_threads        torch threads the proposer's ops run on (0: the engine's). Served, decode
                            steps are apart by response work long enough for OpenMP workers to stop
                            spinning, and waking one for each of a proposer's small ops cost more
                            than the op: the spec_* profiles set 1 (through Triton, EAGLE's proposal
                            2.6 against 3.4 ms, Medusa's 0.8 against 1.7). In-process the workers
                            are still spinning, and 2 threads drafted 13% faster than 1
    draft_vocab             the drafter's lm_head covers only the first N token ids (0: all). A
                            BPE vocabulary is in merge order, most frequent first, so the drafts
                            barely change and the drafter's largest GEMM shrinks (FR-Spec, Zhao et
                            al. 2025). The target still scores every token: lossless either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..engine.config import ConfigError, check_types, from_table
from ..paths import data_root

METHODS = ("ngram", "draft", "medusa", "eagle")
NEEDS_MODEL = ("draft", "medusa", "eagle")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: Literal["ngram", "draft", "medusa", "eagle"] = "ngram"
    num_speculative_tokens: int = 4
    model: str = ""
    max_batch: int = 1
    adaptive: bool = True
    probe_every: int = 8
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    draft_vocab: int = 0
    proposer_threads: int = 0

    def __post_init__(self) -> None:
        check_types(self, "speculative")
        for name in ("num_speculative_tokens", "max_batch", "probe_every", "prompt_lookup_min"):
            if getattr(self, name) < 1:
                raise ConfigError(f"speculative.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("draft_vocab", "proposer_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"speculative.{name}: must be >= 0, got {getattr(self, name)}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ConfigError(f"speculative.prompt_lookup_max: must be >= prompt_lookup_min "
                              f"({self.prompt_lookup_min}), got {self.prompt_lookup_max}")
        if self.method in NEEDS_MODEL:
            if not self.model:
                raise ConfigError(f"speculative.model: method {self.method!r} needs the directory of its "
                                  f"{'draft model' if self.method == 'draft' else 'heads'}")
            d = Path(self.model).expanduser()
            if not d.is_absolute() and not d.exists() and (data_root() / d).exists():
                d = data_root() / d             # a profile's "models/baton-tiny-draft": Baton's own data
            object.__setattr__(self, "model", str(d))
            for f in ("config.json", "model.safetensors"):
                if not (d / f).is_file():
                    raise ConfigError(f"speculative.model: {d / f} does not exist")

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> SpeculativeConfig:
        if "method" in table and table["method"] not in METHODS:
            raise ConfigError(f"speculative.method: unknown method {table['method']!r}; one of {list(METHODS)}")
        return from_table(cls, table, "speculative")
