"""models/README.md, written from the run's metrics.json (so the numbers are the run's own)."""

from __future__ import annotations

from pathlib import Path

FORMATS = """\
## Files and formats

| dir | what | loads with |
|---|---|---|
| `baton-tiny/` | target, `Qwen3ForCausalLM`, bf16, tied embeddings | `AutoModelForCausalLM`, `AutoTokenizer`, Baton's engine |
| `baton-tiny-draft/` | draft model, same tokenizer | the same |
| `baton-tiny-medusa/` | Medusa heads over the target's features | `baton.backends.spec.heads.MedusaHeads.load` |
| `baton-tiny-eagle/` | EAGLE-1-style draft head | `baton.backends.spec.heads.EagleHead.load` |

- **Tokenizer**: byte-level BPE trained on the train split (any UTF-8 text round-trips), ChatML
  specials `<|endoftext|>` (0, also eos/pad), `<|im_start|>` (1), `<|im_end|>` (2), and a ChatML
  chat template in `tokenizer_config.json`.
- **Features** are the target's final hidden states after its last RMSNorm (what `lm_head` reads).
- **Medusa** (FasterDecoding/Medusa conventions): `config.json` has `medusa_num_heads`,
  `medusa_num_layers`, `hidden_size`, `vocab_size`, `base_model_name_or_path`; `model.safetensors`
  has `{k}.{j}.linear.weight|bias` for residual block j of head k (`x + SiLU(Wx + b)`). Head k reads
  the feature at t and guesses token t+k+2. Departure: `tie_lm_head: true` — the heads share the
  target's `lm_head` instead of storing their own `{k}.{L}.weight` (4 x 3.1M parameters would break
  the 60 MB budget).
- **EAGLE** (SafeAILab/EAGLE, EAGLE-1 layout): `fc.weight` [h, 2h] and `fc.bias` over
  concat(embedding of token t+1, feature t), then one Qwen3 decoder layer `layers.0.*` (named as in
  the target; unlike EAGLE-1 it keeps `input_layernorm`). Its output is the predicted feature t+1,
  read by the target's `lm_head`; embeddings and `lm_head` come from the target. `config.json` is
  the target's with `num_hidden_layers: 1`.
- `heldout-slice.txt`: the fixed held-out text whose perplexity the tests re-score;
  `metrics.json`: everything below, machine-readable; `SHA256SUMS`: checksums of every file.
"""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_readme(out: Path, r: dict) -> None:
    m, rec, p, c, s = r["metrics"], r["recipe"], r["params"], r["corpus"], r["seconds"]
    t, d = rec["target"], rec["draft"]
    lines = [
        "# baton-tiny",
        "",
        "A small model family trained by `baton train-tiny` (tools/train/) on the Python "
        f"{c['python']} standard library sources (" + ("with" if rec.get("include_tests") else "without")
        + " its test suites): the text every machine has. Rebuild with "
        "`make models` (deterministic for a given machine and thread count).",
        "",
        "## Shapes and training",
        "",
        "| model | parameters | shape | trained on |",
        "|---|---|---|---|",
        f"| target `baton-tiny` | {p['target'] / 1e6:.1f}M | Qwen3, hidden {t['hidden']}, {t['layers']} layers, "
        f"{t['heads']} q / {t['kv_heads']} kv heads x {t['head_dim']}, MLP {t['inter']}, vocab {rec['vocab']} | "
        f"{r['train']['target_tokens'] / 1e6:.2f}M tokens |",
        f"| draft `baton-tiny-draft` | {p['draft'] / 1e6:.1f}M | Qwen3, hidden {d['hidden']}, {d['layers']} layers, "
        f"{d['heads']} q / {d['kv_heads']} kv heads x {d['head_dim']}, MLP {d['inter']} | "
        f"{r['train']['student_tokens'] / 1e6:.2f}M tokens, half distilled from the target |",
        f"| Medusa heads | {p['medusa'] / 1e6:.2f}M | {rec['medusa_heads']} heads x 1 residual block | "
        "the heads' batches, frozen target |",
        f"| EAGLE head | {p['eagle'] / 1e6:.2f}M | fc + 1 decoder layer | the heads' batches, frozen target |",
        "",
    ]
    if "distilled_windows" in r["train"]:
        lines += [
            f"The heads' batches are {rec['batch'] - rec['corpus_per_batch']} of {rec['batch']} windows of the "
            f"target's own continuations ({r['train']['distilled_windows']} windows: a corpus prefix of 32-256 tokens, "
            "then the target, greedy for 3/4 of them and at temperature 0.8 for the rest; tools/train/distill.py) "
            "and corpus windows: a head's draft is accepted when it guesses what the target emits after its own "
            "tokens. The draft model learns from the heads' batches and as many corpus windows of its own (its "
            "agreement with the target on held-out text is a goal of its own).",
            "",
        ]
    if r["train"].get("draft_note"):
        lines += [r["train"]["draft_note"], ""]
    lines += [
        f"Corpus: {c['train_files']} train files ({c['train_tokens'] / 1e6:.2f}M tokens) and "
        f"{c['heldout_files']} held-out files ({c['heldout_tokens'] / 1e6:.2f}M tokens), split by a hash "
        f"of the file path ({rec['heldout_percent']}% held out). Windows of {rec['seq_len']} tokens, "
        f"batch {rec['batch']}, AdamW, bf16 autocast"
        + (", torch.compile" if rec["compile"] else "") + ".",
        "",
        f"Wall time on {r['machine']['threads']} CPU threads (torch {r['machine']['torch']}): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in s.items()) + ".",
        "",
        f"## Held-out metrics ({m['tokens']:,} tokens, teacher-forced, fp32 from the saved bf16 weights)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| target perplexity | {m['target_ppl']:.2f} |",
        f"| draft perplexity | {m['draft_ppl']:.2f} |",
        f"| draft greedy top-1 agreement with the target | {_pct(m['draft_target_agreement'])} |",
    ]
    for k, (vt, vy) in enumerate(zip(m["medusa_top1_vs_target"], m["medusa_top1_vs_truth"])):
        lines.append(f"| Medusa head {k + 1} (token t+{k + 2}) top-1 vs the target's token / vs the text "
                     f"| {_pct(vt)} / {_pct(vy)} |")
    lines += [
        f"| EAGLE head (token t+2 given t+1) top-1 vs the target's token / vs the text "
        f"| {_pct(m['eagle_top1_vs_target'])} / {_pct(m['eagle_top1_vs_truth'])} |",
        f"| fixed slice (`heldout-slice.txt`, {m['slice']['windows']} x {m['slice']['seq_len']}): "
        f"target / draft perplexity | {m['slice']['target_ppl']:.3f} / {m['slice']['draft_ppl']:.3f} |",
        "",
        "## Greedy samples from the target",
        "",
    ]
    for prompt, text in m["samples"].items():
        lines += ["```python", prompt + text, "```", ""]
    (out / "README.md").write_text("\n".join(lines) + "\n" + FORMATS)
