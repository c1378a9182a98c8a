"""Accept or reject draft tokens against the target's logits, losslessly.

`rows[j]` is the target's logits for the token after draft j-1 (row 0: the token after the last
verified one), so m drafts come with m+1 rows.
- Greedy: accept the longest prefix of drafts equal to the target's argmax, then emit the target's
  own token at the first mismatch (or after the last draft): exactly the non-speculative tokens.
- Sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft x with probability
  min(1, p(x) / q(x)); on rejection sample from norm(max(p - q, 0)); after m acceptances sample the
  bonus token from p. p is the target distribution after temperature / top-k / top-p / min-p
  (engine.sampler.target_probs), q the draft's (one-hot when the proposer gives none). The output is
  distributed exactly as sampling from p token by token. Draws come from the request's generator, so
  a seeded request repeats whatever the batch."""

from __future__ import annotations

import torch

from ..engine.sampler import target_probs
from ..engine.sampling_params import SamplingParams


def verify(rows: torch.Tensor, drafts: list[int], params: SamplingParams, gen: torch.Generator,
           draft_probs: torch.Tensor | None = None) -> list[int]:
    """The tokens to emit: accepted drafts, then one token of the target's (len(drafts) + 1 at most)."""
    if params.greedy:
        target = rows.argmax(-1).tolist()
        out = []
        for d, t in zip(drafts, target):
            if d != t:
                break
            out.append(d)
        return out + [target[len(out)]]
    out = []
    for j, d in enumerate(drafts):
        p = target_probs(rows[j], params)
        p = p / p.sum()
        q = draft_probs[j] if draft_probs is not None else None
        q_d = float(q[d]) if q is not None else 1.0
        u = torch.rand((), generator=gen).item()
        if u * q_d < float(p[d]):               # accept with min(1, p/q)
            out.append(d)
            continue
        if q is None:                            # one-hot q: max(p - q, 0) is p without d
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - q).clamp_min(0.0)
        if float(residual.sum()) <= 0:           # p == q: any rejection was impossible; keep p
            residual = p
        return out + [int(torch.multinomial(residual / residual.sum(), 1, generator=gen))]
    p = target_probs(rows[len(drafts)], params)
    return out + [int(torch.multinomial(p / p.sum(), 1, generator=gen))]
