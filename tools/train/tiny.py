"""baton-tiny: train the embedded model family from the Python standard library, deterministically.

    baton train-tiny --out models            # the committed artifacts (~90 min on 2 cores)
    baton train-tiny --out models --students-only   # draft, Medusa, EAGLE again, against models/baton-tiny
    baton train-tiny --recipe ci --out DIR   # seconds: the same code path on a sliver of the corpus

Writes, under --out: baton-tiny/ (target, Qwen3), baton-tiny-draft/, baton-tiny-medusa/,
baton-tiny-eagle/ (formats in baton.backends.spec.heads), metrics.json, heldout-slice.txt (the fixed
evaluation text the tests re-score), README.md and SHA256SUMS.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from baton.backends.spec.heads import EagleHead, MedusaHeads
from baton.tools.make_checkpoint import hf_config

from . import corpus
from .distill import continued_windows, mixed_batches
from .evaluate import family_metrics, greedy_samples, perplexity
from .loop import Schedule, train_students, train_target

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SAMPLE_PROMPTS = ["def fibonacci(n):", "class LRUCache:", "import os\n\n\ndef list_python_files(root):"]


@dataclass
class Recipe:
    vocab: int = 8192
    target: dict = field(default_factory=lambda: dict(
        arch="Qwen3ForCausalLM", hidden=384, layers=8, heads=6, kv_heads=2, head_dim=64, inter=1024,
        tie=True, init=0.02))
    draft: dict = field(default_factory=lambda: dict(
        arch="Qwen3ForCausalLM", hidden=192, layers=4, heads=3, kv_heads=1, head_dim=64, inter=512,
        tie=True, init=0.02))
    medusa_heads: int = 4
    seq_len: int = 512
    batch: int = 8
    target_steps: int = 760
    target_lr: float = 2e-3
    student_steps: int = 400
    distill_windows: int = 2048       # target continuations the heads train on (distill.py)
    corpus_per_batch: int = 2         # corpus windows in each heads' batch beside them
    draft_lr: float = 2e-3
    heads_lr: float = 1e-3
    heldout_percent: int = 5
    include_tests: bool = False
    tokenizer_bytes: int = 12 << 20
    max_train_bytes: int | None = None
    eval_windows: int = 192
    slice_windows: int = 8
    max_positions: int = 2048
    compile: bool = True
    seed: int = 0


RECIPES = {
    "full": Recipe(),
    # The CI recipe: same phases, tiny shapes, a sliver of the corpus.
    "ci": Recipe(vocab=512,
                 target=dict(arch="Qwen3ForCausalLM", hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32,
                             inter=128, tie=True, init=0.02),
                 draft=dict(arch="Qwen3ForCausalLM", hidden=32, layers=1, heads=1, kv_heads=1, head_dim=32,
                            inter=64, tie=True, init=0.02),
                 seq_len=64, batch=4, target_steps=40, student_steps=20, target_lr=3e-3, distill_windows=8,
                 corpus_per_batch=1,
                 tokenizer_bytes=400_000, max_train_bytes=400_000, eval_windows=8, slice_windows=2,
                 max_positions=256, compile=False),
}


def _new_model(preset: dict, vocab: int, eos: int, max_positions: int, seed: int):  # noqa: ANN202
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = hf_config(preset, vocab, "bfloat16", eos)
    cfg["max_position_embeddings"] = max_positions
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(Qwen3Config(**cfg), dtype=torch.float32)


def _save_lm(model, out: Path, tok_dir: Path, eos: int) -> None:  # noqa: ANN001
    """bf16 safetensors + tokenizer; generation stops at <|endoftext|> or <|im_end|> (eos + 2)."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(out))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eos, "eos_token_id": [eos, eos + 2], "do_sample": False}, indent=2) + "\n")
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)


def heldout_slice_windows(tokenizer, text: str, seq_len: int, n: int) -> np.ndarray:  # noqa: ANN001
    """The fixed evaluation slice: the committed held-out text, tokenized, cut into n windows."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int32)
    return corpus.fixed_windows(ids, seq_len, n)


def write_checksums(out: Path) -> None:
    lines = []
    for f in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        lines.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(out).as_posix()}")
    (out / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def train_tiny(out: Path, recipe: Recipe, threads: int | None = None, students_only: bool = False) -> dict:
    """The whole family; with students_only, the students again against the target already in
    out/baton-tiny (its tokenizer and training record kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = t = time.perf_counter()

    # 1. corpus, split by file; tokenizer on the train split only
    split = corpus.read_split(recipe.heldout_percent, recipe.max_train_bytes, recipe.include_tests)
    tok_dir = out / ".tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    if students_only:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "baton-tiny" / "tokenizer.json"))
        tok_dir.mkdir()
        for name in TOKENIZER_FILES:
            shutil.copy(out / "baton-tiny" / name, tok_dir / name)
    else:
        tok = corpus.train_tokenizer(recipe.vocab, corpus.first_bytes(split.train, recipe.tokenizer_bytes))
        corpus.save_tokenizer(tok, tok_dir, recipe.max_positions)
    eos = tok.token_to_id(corpus.EOS)
    train_ids = corpus.tokenize_stream(tok, split.train)
    held_ids = corpus.tokenize_stream(tok, split.heldout)
    slice_text = _slice_text(split.heldout, tok, recipe.seq_len * recipe.slice_windows + 1)
    (out / "heldout-slice.txt").write_text(slice_text, encoding="utf-8")
    times["tokenizer+data"] = time.perf_counter() - t
    print(f"[train-tiny] corpus: {len(split.train)} train files, {len(train_ids):,} tokens; "
          f"{len(split.heldout)} held-out files, {len(held_ids):,} tokens")

    # 2. target
    t = time.perf_counter()
    if students_only:
        before = json.loads((out / "metrics.json").read_text())
        target_train = {k: v for k, v in before["train"].items() if k.startswith("target_")}
        times["target"] = before["seconds"]["target"]
        target = AutoModelForCausalLM.from_pretrained(str(out / "baton-tiny"), dtype=torch.bfloat16)
    else:
        target = _new_model(recipe.target, tok.get_vocab_size(), eos, recipe.max_positions, recipe.seed)
        batches = corpus.random_windows(train_ids, recipe.batch, recipe.seq_len, recipe.seed)
        t_log = train_target(target, batches, Schedule(recipe.target_steps, recipe.target_lr), recipe.compile)
        target_train = {"target_tokens": t_log.tokens, "target_loss_first": t_log.losses[:5],
                        "target_loss_last": t_log.losses[-5:]}
        _save_lm(target, out / "baton-tiny", tok_dir, eos)            # bf16 from here on, as served
        times["target"] = time.perf_counter() - t

    # 3. students against the frozen (bf16) target, mostly on the target's own continuations
    t = time.perf_counter()
    distilled = continued_windows(out / "baton-tiny", train_ids, recipe.distill_windows, recipe.seq_len,
                                  recipe.seed + 2, threads)
    times["self-distillation data"] = time.perf_counter() - t
    t = time.perf_counter()
    draft = _new_model(recipe.draft, tok.get_vocab_size(), eos, recipe.max_positions, recipe.seed + 1)
    medusa = MedusaHeads(recipe.target["hidden"], recipe.medusa_heads)
    eagle = EagleHead(json.loads((out / "baton-tiny" / "config.json").read_text()))
    # each batch: corpus windows for the draft alone, then the heads' (mostly the target's
    # continuations), which the draft learns from too
    draft_windows = corpus.random_windows(train_ids, recipe.batch, recipe.seq_len, recipe.seed + 1)
    head_windows = mixed_batches(distilled, corpus.random_windows(train_ids, recipe.batch, recipe.seq_len,
                                                                  recipe.seed + 4),
                                 recipe.batch, recipe.corpus_per_batch, recipe.seed + 3)
    batches = (np.concatenate([next(draft_windows), next(head_windows)]) for _ in iter(int, 1))
    s_log = train_students(target, draft, medusa, eagle, batches,
                           Schedule(recipe.student_steps, recipe.draft_lr),
                           Schedule(recipe.student_steps, recipe.heads_lr), seed=recipe.seed,
                           compile=recipe.compile, heads_from=recipe.batch)
    _save_lm(draft, out / "baton-tiny-draft", tok_dir, eos)
    medusa.save(out / "baton-tiny-medusa", tok.get_vocab_size(), "baton-tiny")
    eagle.save(out / "baton-tiny-eagle", "baton-tiny")
    shutil.rmtree(tok_dir)
    times["students"] = time.perf_counter() - t

    # 4. metrics from the saved files, in fp32, as the tests and users load them
    t = time.perf_counter()
    tgt = AutoModelForCausalLM.from_pretrained(str(out / "baton-tiny"), dtype=torch.float32).eval()
    drf = AutoModelForCausalLM.from_pretrained(str(out / "baton-tiny-draft"), dtype=torch.float32).eval()
    med = MedusaHeads.load(out / "baton-tiny-medusa").eval()
    eag = EagleHead.load(out / "baton-tiny-eagle").eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out / "baton-tiny"))
    metrics = family_metrics(tgt, drf, med, eag, corpus.fixed_windows(held_ids, recipe.seq_len, recipe.eval_windows))
    slice_w = heldout_slice_windows(hf_tok, slice_text, recipe.seq_len, recipe.slice_windows)
    metrics["slice"] = {"windows": len(slice_w), "seq_len": recipe.seq_len,
                        "target_ppl": perplexity(tgt, slice_w), "draft_ppl": perplexity(drf, slice_w)}
    metrics["samples"] = greedy_samples(tgt, hf_tok, SAMPLE_PROMPTS)
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all

    report = {
        "recipe": asdict(recipe), "metrics": metrics, "seconds": times,
        "params": {"target": sum(p.numel() for p in tgt.parameters()),
                   "draft": sum(p.numel() for p in drf.parameters()),
                   "medusa": sum(p.numel() for p in med.parameters()),
                   "eagle": sum(p.numel() for p in eag.parameters())},
        "train": target_train | {"student_tokens": s_log.tokens, "student_loss_first": s_log.losses[:5],
                                 "student_loss_last": s_log.losses[-5:],
                                 "distilled_windows": int(len(distilled))},
        "corpus": {"python": platform.python_version(), "train_files": len(split.train),
                   "heldout_files": len(split.heldout), "train_tokens": int(len(train_ids)),
                   "heldout_tokens": int(len(held_ids))},
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    from .report import write_readme

    write_readme(out, report)
    write_checksums(out)
    return report


def _slice_text(heldout: list[str], tok, min_tokens: int) -> str:  # noqa: ANN001
    """Whole held-out files joined by the end-of-text token, until they cover min_tokens."""
    parts, n = [], 0
    for text in heldout:
        parts.append(text)
        n += len(tok.encode(text, add_special_tokens=False).ids) + 1
        if n >= min_tokens:
            break
    return corpus.EOS.join(parts) + corpus.EOS


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="baton train-tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models")
    ap.add_argument("--recipe", default="full", choices=sorted(RECIPES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slower steps, no warm-up)")
    ap.add_argument("--students-only", action="store_true",
                    help="retrain the draft, Medusa and EAGLE against the target already in --out")
    a = ap.parse_args(argv)
    recipe = RECIPES[a.recipe]
    if a.no_compile:
        recipe.compile = False
    report = train_tiny(Path(a.out), recipe, a.threads, a.students_only)
    m = report["metrics"]
    print(f"[train-tiny] done in {report['seconds']['total'] / 60:.1f} min: target ppl {m['target_ppl']:.2f}, "
          f"draft ppl {m['draft_ppl']:.2f}, agreement {m['draft_target_agreement']:.1%}")
