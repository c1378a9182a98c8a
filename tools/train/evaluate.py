"""Held-out metrics of a trained family, computed from the saved artifacts (fp32 compute) so that
anyone can reproduce them with transformers: perplexity, draft/target greedy agreement, and top-1
accuracy of the Medusa and EAGLE heads against the target's next token."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baton.backends.spec.heads import EagleHead, MedusaHeads


@torch.no_grad()
def perplexity(model: nn.Module, windows: np.ndarray, batch: int = 8) -> float:
    nll, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(windows[i:i + batch]).long()
        logits = model(input_ids=w[:, :-1]).logits.float()
        nll += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    return math.exp(nll / n)


@torch.no_grad()
def family_metrics(target: nn.Module, draft: nn.Module, medusa: MedusaHeads, eagle: EagleHead,
                   windows: np.ndarray, batch: int = 8) -> dict:
    """All teacher-forced on held-out windows; "target's next token" is the target's greedy choice."""
    lm_head = target.get_output_embeddings().weight.float()
    embed = target.get_input_embeddings()
    K = medusa.num_heads
    sums = {"target_nll": 0.0, "draft_nll": 0.0, "agree": 0, "n": 0, "eagle_vs_target": 0,
            "eagle_vs_truth": 0, "eagle_n": 0}
    med_t, med_y, med_n = np.zeros(K), np.zeros(K), np.zeros(K)
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(windows[i:i + batch]).long()
        x, y = w[:, :-1], w[:, 1:]
        T = x.shape[1]
        feats = target.model(input_ids=x).last_hidden_state.float()
        t_logits = feats @ lm_head.T
        d_logits = draft(input_ids=x).logits.float()
        sums["target_nll"] += F.cross_entropy(t_logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        sums["draft_nll"] += F.cross_entropy(d_logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        t_next = t_logits.argmax(-1)                      # target's greedy token after position t
        sums["agree"] += (d_logits.argmax(-1) == t_next).sum().item()
        sums["n"] += y.numel()
        # Medusa head k at t guesses token t+k+2; the target's own guess for it is t_next[t+k+1]
        m_pred = (medusa(feats) @ lm_head.T).argmax(-1)   # [K, B, T]
        for k in range(K):
            n = T - k - 1                                 # positions whose token t+k+2 is in the window
            med_t[k] += (m_pred[k, :, :n] == t_next[:, k + 1:]).sum().item()
            med_y[k] += (m_pred[k, :, :n] == w[:, k + 2:]).sum().item()
            med_n[k] += x.shape[0] * n
        # EAGLE at t: (token t+1, feature t) -> feature t+1 -> token t+2
        e_pred = (eagle(embed(x[:, 1:]).float(), feats[:, :-1]) @ lm_head.T).argmax(-1)
        sums["eagle_vs_target"] += (e_pred == t_next[:, 1:]).sum().item()
        sums["eagle_vs_truth"] += (e_pred == w[:, 2:]).sum().item()
        sums["eagle_n"] += e_pred.numel()
    return {
        "tokens": sums["n"],
        "target_ppl": math.exp(sums["target_nll"] / sums["n"]),
        "draft_ppl": math.exp(sums["draft_nll"] / sums["n"]),
        "draft_target_agreement": sums["agree"] / sums["n"],
        "medusa_top1_vs_target": (med_t / med_n).tolist(),
        "medusa_top1_vs_truth": (med_y / med_n).tolist(),
        "eagle_top1_vs_target": sums["eagle_vs_target"] / sums["eagle_n"],
        "eagle_top1_vs_truth": sums["eagle_vs_truth"] / sums["eagle_n"],
    }


@torch.no_grad()
def greedy_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> dict:  # noqa: ANN001
    out = {}
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        out[p] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=False)
    return out
