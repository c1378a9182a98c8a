"""Accept or reject draft tokens against the target's logits, losslessly.

`rows[j]` is the target's logits for the token after draft j-1 (row 0: the token after the last
verified one), so m drafts come with m+1 rows; `noise(j)` is the generator for row j's token
(engine.sampler.Sampler.noise: keyed by position for a seeded request).
- Greedy: accept the longest prefix of drafts equal to the target's argmax, then emit the target's
  own token at the first mismatch (or after the last draft): exactly the non-speculative tokens.
- Sampling, one-hot drafts (every proposer here): rejection sampling with q a point mass at draft d
  accepts with probability min(1, p(d) / 1) = p(d) and on rejection samples norm(p without d). Both
  at once: sample x from p with row j's own draw, accept if x == d, else emit x (x is then
  distributed as p given x != d). The draw is the one plain decoding would make for that position,
  so a seeded request gets the very tokens it gets without speculation.
- Sampling with draft probabilities q (Leviathan et al. 2023; Chen et al. 2023): accept draft x with
  probability min(1, p(x) / q(x)); on rejection sample from norm(max(p - q, 0)); after m acceptances
  sample the bonus token from p.
p is the target distribution after temperature / top-k / top-p / min-p (engine.sampler.target_probs;
penalties are applied to the rows before)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..engine.sampler import race, target_probs
from ..engine.sampling_params import SamplingParams


def verify(rows: torch.Tensor, drafts: list[int], params: SamplingParams, noise: Callable[[int], torch.Generator],
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
        if draft_probs is None:
            x = race(p, noise(j))
            if x != d:
                return out + [x]
            out.append(d)
            continue
        p = p / p.sum()
        q = draft_probs[j]
        gen = noise(j)
        if torch.rand((), generator=gen).item() * float(q[d]) < float(p[d]):    # accept with min(1, p/q)
            out.append(d)
            continue
        residual = (p - q).clamp_min(0.0)
        if float(residual.sum()) <= 0:           # p == q: any rejection was impossible; keep p
            residual = p
        return out + [int(torch.multinomial(residual / residual.sum(), 1, generator=gen))]
    return out + [race(target_probs(rows[len(drafts)], params), noise(len(drafts)))]
