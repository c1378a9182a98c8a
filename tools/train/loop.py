"""Training loops: the target language model, then the students (draft model, Medusa heads, EAGLE
head) against the frozen target. bf16 autocast on CPU; AdamW with warmup + cosine decay."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baton.backends.spec.heads import EagleHead, MedusaHeads


@dataclass
class Schedule:
    steps: int
    lr: float
    warmup: int = 30
    final_frac: float = 0.1

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        p = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.final_frac + (1 - self.final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass
class Log:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def _adamw(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.1)


def _set_lr(opt: torch.optim.Optimizer, scheds: list[Schedule], step: int) -> None:
    for g, s in zip(opt.param_groups, scheds):
        g["lr"] = s.lr_at(step)


def _run(name: str, steps: int, batches: Iterator[np.ndarray], step_fn: Callable[[torch.Tensor], dict],
         opt: torch.optim.Optimizer, scheds: list[Schedule], clip_groups: list[list[nn.Parameter]]) -> Log:
    """Each of clip_groups is clipped to norm 1 on its own, so one model's large gradients never
    shrink another's steps (the students share a loss but not their updates)."""
    from tqdm import tqdm

    log = Log()
    bar = tqdm(range(steps), desc=name, unit="step", dynamic_ncols=True, mininterval=2.0)
    t0 = time.perf_counter()
    for step in bar:
        window = torch.from_numpy(next(batches)).long()
        _set_lr(opt, scheds, step)
        losses = step_fn(window)
        for params in clip_groups:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.tokens += window.shape[0] * (window.shape[1] - 1)
        log.losses.append(float(losses["loss"]))
        dt = time.perf_counter() - t0
        bar.set_postfix({k: f"{float(v):.3f}" for k, v in losses.items()} | {"tok/s": f"{log.tokens / dt:.0f}"},
                        refresh=False)
    log.seconds = time.perf_counter() - t0
    return log


def train_target(model: nn.Module, batches: Iterator[np.ndarray], sched: Schedule,
                 compile: bool = False) -> Log:
    """Next-token cross-entropy on the corpus. `model` is a Hugging Face causal LM in fp32."""
    model.train()

    def step(window: torch.Tensor) -> dict:
        x, y = window[:, :-1], window[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        return {"loss": loss.detach()}

    fn = torch.compile(step) if compile else step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw([{"params": params}])
    return _run("target", sched.steps, batches, fn, opt, [sched], [params])


def soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's distribution (KL up to the teacher's entropy)."""
    return -(F.softmax(teacher_logits.float(), -1) * F.log_softmax(student_logits.float(), -1)).sum(-1).mean()


def train_students(target: nn.Module, draft: nn.Module, medusa: MedusaHeads, eagle: EagleHead,
                   batches: Iterator[np.ndarray], draft_sched: Schedule, heads_sched: Schedule,
                   head_positions: int = 128, seed: int = 0, compile: bool = False, heads_from: int = 0) -> Log:
    """One frozen target forward per batch feeds three students. The draft learns from every window
    of a batch, the heads from windows heads_from onward. Each student's gradients are clipped on
    their own (_run), so a student's training depends only on its loss and the rows it sees:
    - draft: half ground-truth CE, half distillation from the target's next-token distribution. Its
      greedy agreement with the target on held-out text is a goal of its own (>= 55%): trained only
      on the target's continuations it fell to 54% (from 61% on corpus windows), so the batch's
      first heads_from windows are corpus windows for the draft alone;
    - Medusa head k: distillation of the target's distribution of token t+k+2 (its logits at t+k+1)
      from the target's feature at t (a random subset of positions, since every head pays a
      full-vocabulary projection). On the target's own continuations (distill.py) that is the token
      the head must guess for its draft to be accepted; the text's token t+k+2 is not;
    - EAGLE: feature regression (smooth L1) + 0.1 x distillation of the token after next, as in EAGLE-1.
    """
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    draft.train()
    medusa.train()
    eagle.train()
    lm_head = target.get_output_embeddings().weight
    embed = target.get_input_embeddings()
    K = medusa.num_heads
    gen = torch.Generator().manual_seed(seed)

    def step(window: torch.Tensor) -> dict:
        with torch.no_grad():                            # the bf16 target, once for every row
            feats_all = target.model(input_ids=window[:, :-1]).last_hidden_state
            logits_all = feats_all @ lm_head.T
        d_x, d_y, d_t = window[:, :-1], window[:, 1:], logits_all            # the draft: every row
        x, feats, t_logits = window[heads_from:, :-1], feats_all[heads_from:], logits_all[heads_from:]
        B, T = x.shape
        with torch.no_grad():
            next_emb = embed(x[:, 1:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d_logits = draft(input_ids=d_x).logits
            pos = torch.randperm(T - K - 1, generator=gen)[:head_positions].sort().values
            m_out = medusa(feats[:, pos].float())                          # [K, B, P, h]
            m_logits = m_out @ lm_head.T
            e_pred = eagle(next_emb.float(), feats[:, :-1].float())       # predicts feats[:, 1:]
            e_logits = e_pred[:, pos] @ lm_head.T
        d_loss = 0.5 * F.cross_entropy(d_logits.float().flatten(0, 1), d_y.flatten()) \
            + 0.5 * soft_ce(d_logits.flatten(0, 1), d_t.flatten(0, 1))
        m_teacher = torch.stack([t_logits[:, pos + k + 1] for k in range(K)])   # [K, B, P, V]
        m_loss = soft_ce(m_logits.flatten(0, 2), m_teacher.flatten(0, 2))
        e_vloss = F.smooth_l1_loss(e_pred.float(), feats[:, 1:].float())
        e_ploss = soft_ce(e_logits.flatten(0, 1), t_logits[:, 1:][:, pos].flatten(0, 1))
        loss = d_loss + m_loss + e_vloss + 0.1 * e_ploss
        loss.backward()
        return {"loss": loss.detach(), "draft": d_loss.detach(), "medusa": m_loss.detach(),
                "eagle": e_ploss.detach()}

    fn = torch.compile(step) if compile else step
    d_params = [p for p in draft.parameters() if p.requires_grad]
    h_params = list(medusa.parameters()) + list(eagle.parameters())
    opt = _adamw([{"params": d_params}, {"params": h_params}])
    return _run("students", draft_sched.steps, batches, fn, opt, [draft_sched, heads_sched],
                [d_params, list(medusa.parameters()), list(eagle.parameters())])
