"""Every speculative method on the trained baton-tiny family (models/): greedy output token-exact with
speculation off (alone, in a batch of 8, under chunked prefill, with prefix hits, under forced
preemption), drafts accepted, no block leaked in the target's pool or the proposer's own, no
unverified token in the prefix index; lossless sampling as a statistical test (and the same test
catching a wrong verifier); the bad configurations."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from baton import LLM, ConfigError, SamplingParams
from baton.backends.engine.sequence import Sequence
from baton.backends.kv import KVPool

MODELS = Path(__file__).resolve().parents[1] / "models"
TARGET = MODELS / "baton-tiny"
HEADS = {"ngram": "", "draft": str(MODELS / "baton-tiny-draft"), "medusa": str(MODELS / "baton-tiny-medusa"),
         "eagle": str(MODELS / "baton-tiny-eagle")}
SLICE = (MODELS / "heldout-slice.txt").read_text()
# held-out code: the start of each of 8 top-level definitions
PROMPTS = [SLICE[i:i + 300] for i in [SLICE.find("\ndef ", j * 3000) + 1 for j in range(8)]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def spec_llm(method: str, k: int = 3, spec: dict | None = None, **kw) -> LLM:
    spec = {"method": method, "num_speculative_tokens": k, "model": HEADS[method], "max_batch": 256,
            "adaptive": False} | (spec or {})
    return LLM(TARGET, dtype="float32", max_model_len=1024, num_blocks=kw.pop("num_blocks", 256),
               speculative_config=spec, **kw)


@pytest.fixture(scope="module")
def plain():
    llm = LLM(TARGET, dtype="float32", max_model_len=1024, num_blocks=256)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def expected(plain):
    return {p: o.token_ids for p, o in zip(PROMPTS, plain.generate(PROMPTS, GREEDY))}


def used_blocks(llm: LLM) -> tuple[int, int]:
    """Blocks in use in the target's pool and in the proposer's own (draft model, EAGLE layer)."""
    dec = getattr(llm.engine.proposer, "dec", None)
    return llm.engine.block_manager.num_used, dec.bm.num_used if dec is not None else 0


MODES = {
    "batch1": {},
    "batch8": {},
    "chunked": {"max_num_batched_tokens": 24},           # prompts in chunks, verify rows cut by the budget
    "prefix": {},
    "preemption": {"num_blocks": 24, "max_num_batched_tokens": 64},
    "draft-vocab": {"spec": {"draft_vocab": 1024}},      # drafts from the first 1,024 ids only
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", list(HEADS))
def test_greedy_is_token_exact(method, mode, expected):
    llm = spec_llm(method, **MODES[mode])
    try:
        if mode == "batch1":
            outs = [llm.generate(p, GREEDY)[0] for p in PROMPTS[:3]]
        elif mode == "prefix":
            llm.generate(PROMPTS, GREEDY)
            outs = llm.generate(PROMPTS, GREEDY)
            assert all(o.num_cached_tokens > 0 for o in outs)
        else:
            outs = llm.generate(PROMPTS, GREEDY)
        got = {p: o.token_ids for p, o in zip(PROMPTS, outs)}
        assert got == {p: expected[p] for p in got}
        stats = llm.engine.spec_stats
        assert 0 < stats["accepted"] < stats["drafted"]                 # accepts and rejects both happened
        assert sum(o.num_accepted_tokens for o in outs) <= stats["accepted"]
        assert all(o.mean_acceptance_length >= 1.0 for o in outs)
        if mode == "preemption":
            assert llm.engine.scheduler.num_preemptions > 0
        assert used_blocks(llm) == (0, 0)
    finally:
        llm.close()


@pytest.mark.parametrize("method", list(HEADS))
def test_seeded_sampling_gives_the_tokens_it_gives_without_speculation(method, plain):
    """A seeded request's draw for each position is keyed by (seed, position): a verified row draws
    what plain decoding draws there, so speculation (in a batch of 8 here) changes no token."""
    sp = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=40, ignore_eos=True) for i in range(8)]
    llm = spec_llm(method)
    try:
        outs = llm.generate(PROMPTS, sp)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate(PROMPTS, sp)]
        assert llm.engine.spec_stats["accepted"] > 0
    finally:
        llm.close()


@pytest.mark.parametrize("method", list(HEADS))
def test_no_unverified_token_is_published_and_cancelling_leaks_nothing(method):
    llm = spec_llm(method, k=3, block_size=4)
    bm = llm.engine.block_manager
    published = []
    real = bm.cache_block
    bm.cache_block = lambda block, h: (published.append(h), real(block, h))[1]
    try:
        outs = llm.generate(PROMPTS[:4], GREEDY)
        final = set()
        for o in outs:
            final |= set(Sequence(o.prompt_token_ids + o.token_ids, SamplingParams(), 4).block_hashes)
        assert published and set(published) <= final
        eng = llm.engine
        for i, p in enumerate(PROMPTS[:4]):
            eng.add_request(p, GREEDY, request_id=f"c{i}")
        for _ in range(6):                        # past prefill, into speculating steps
            eng.step()
        assert eng.spec_stats["drafted"] > 0 and used_blocks(llm) != (0, 0)
        for i in range(4):
            eng.abort(f"c{i}")
        assert used_blocks(llm) == (0, 0)
        # a drafter's KV is process memory: no /dev/shm file that a killed process would leave behind
        dec = getattr(eng.proposer, "dec", None)
        if dec is not None:
            assert not KVPool.data_path(dec.pool.name).exists() and not KVPool.meta_path(dec.pool.name).exists()
    finally:
        llm.close()


def test_each_request_reports_its_own_acceptance(expected):
    llm = spec_llm("draft")
    try:
        outs = llm.generate(PROMPTS[:2], GREEDY)
        for o in outs:
            assert o.num_spec_steps > 0 and 0 < o.num_accepted_tokens < o.num_draft_tokens
            assert o.mean_acceptance_length == pytest.approx(1 + o.num_accepted_tokens / o.num_spec_steps)
        stats = llm.engine.spec_stats
        assert sum(o.num_draft_tokens for o in outs) == stats["drafted"]
        assert stats["accepted_at"][0] >= stats["accepted_at"][1] >= stats["accepted_at"][2]   # a chain
        assert sum(stats["accepted_at"]) == stats["accepted"] and sum(stats["drafted_at"]) == stats["drafted"]
    finally:
        llm.close()


def test_adaptive_speculation_stays_off_in_a_large_batch_and_for_a_sequence_that_never_accepts():
    spec = {"method": "draft", "model": HEADS["draft"], "num_speculative_tokens": 3, "max_batch": 4}
    llm = LLM(TARGET, dtype="float32", max_model_len=1024, num_blocks=256, speculative_config=spec)
    try:
        seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=20, ignore_eos=True)
        batched = llm.generate(PROMPTS, [seeded] + [GREEDY] * 7)[0]      # 8 decoding: over max_batch
        assert llm.engine.spec_stats["drafted"] == 0
        alone = llm.generate(PROMPTS[0], seeded)[0]                       # alone: it speculates
        assert alone.num_draft_tokens > 0 and alone.token_ids == batched.token_ids
    finally:
        llm.close()
    # a sequence whose drafts are always rejected stops drafting: the break-even pinned at 2 tokens
    llm = spec_llm("ngram", spec={"adaptive": True, "probe_every": 8})
    gov = llm.engine.governor
    gov.tick = lambda: None
    gov.plain, gov.ratio = 1.0, 2.0
    llm.engine.proposer.propose = lambda seqs, k: [[1] * k for _ in seqs]     # token 1: never the target's
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        o = llm.generate(PROMPTS[0], sp)[0]
        assert o.token_ids == llm.generate(PROMPTS[0], sp)[0].token_ids
        # EXPLORE verifying steps (1 token < 2), then probes every 8 * probe_every steps; and one
        # plain step in every REMEASURE
        assert 8 <= o.num_spec_steps <= 11
    finally:
        llm.close()


def test_no_drafts_while_another_stage_on_the_cores_works(tmp_path, plain):
    """Served, decode drafts only while its node's prefill is idle: a wave's first sequence out of
    prefill must not take the cores the rest of the wave's prompts wait for."""
    from baton.backends.stages.cores import CoreShare

    CoreShare.create(tmp_path / "cores")
    prefill = CoreShare(tmp_path / "cores", "prefill", 2)
    decode = CoreShare(tmp_path / "cores", "decode", 2)
    threads = torch.get_num_threads()
    llm = spec_llm("ngram")
    llm.engine.cores_contended = decode.other_busy
    try:
        prefill.busy()
        held = llm.generate(PROMPTS[0], GREEDY)[0]
        assert held.num_draft_tokens == 0 and llm.engine.spec_stats["drafted"] == 0
        prefill.idle()
        free = llm.generate(PROMPTS[0], GREEDY)[0]
        assert free.num_draft_tokens > 0
        assert held.token_ids == free.token_ids == plain.generate(PROMPTS[0], GREEDY)[0].token_ids
    finally:
        llm.close()
        torch.set_num_threads(threads)


def test_the_governor_drafts_while_it_pays_and_probes_rarely_when_it_does_not():
    from baton.backends.spec.adaptive import BACKOFF, REMEASURE, SETTLE, Governor
    from baton.backends.spec.config import SpeculativeConfig

    gov = Governor(SpeculativeConfig(method="ngram", probe_every=4))
    assert gov.break_even() is None and not gov.step_may_speculate()     # the plain cost is measured first
    gov.plain, gov.ratio = 1.0, 2.5
    assert gov.break_even() == 2.5
    # then a plain step every REMEASURE speculating steps, until one is timed, after SETTLE untimed
    # ones (caches the proposer filled)
    assert all(gov.step_may_speculate() for _ in range(REMEASURE - 1)) and not gov.step_may_speculate()
    for _ in range(SETTLE):
        gov.measured(False)                                              # plain steps ran, untimed
        assert not gov.step_may_speculate()
    gov.measured(False)                                                  # timed
    assert all(gov.step_may_speculate() and gov.measured(True) is None for _ in range(REMEASURE))
    for _ in range(SETTLE + 1):
        assert not gov.step_may_speculate()
        gov.measured(False)
    assert gov.step_may_speculate()

    def run(gov: Governor, emit: list[int], steps: int) -> list[int]:
        """The steps (1-based) at which a sequence drafts, its verifying steps emitting from `emit`."""
        s = Sequence([1, 2], SamplingParams(), 16)
        drafted = []
        for i in range(1, steps + 1):
            if gov.wants(s):
                drafted.append(i)
                s.spec_steps += 1
                gov.verified(s, emit[(len(drafted) - 1) % len(emit)])
        return drafted

    # a head accepted ~75% per draft: its steps emit 1 to 4, 2.8 on average, above the break-even of
    # 2.5. A short moving average fell below it after two rejections in a row and paused
    head = [1, 1, 4, 4, 3, 1, 4, 2, 4, 4]
    assert len(run(gov, head, 200)) == 200
    assert len(run(gov, [1, 1, 1, 4, 4, 4, 2, 4, 3, 4], 200)) == 200   # even one that starts badly
    # a sequence whose drafts never pay, alone: EXPLORE verifying steps, then a probe 8 * probe_every
    # steps later, each next one twice as late (a probe costs: a draft model catches up)
    gov = Governor(SpeculativeConfig(method="ngram", probe_every=4))
    gov.plain, gov.ratio = 1.0, 2.5
    assert run(gov, [2], 400) == [*range(1, 10), 42, 107, 236]
    assert run(gov, [2], 400)[:1] == [33]       # a new sequence: not at once, the population's drafts do not pay
    gov = Governor(SpeculativeConfig(method="ngram", probe_every=4))
    gov.plain, gov.ratio, gov.probe_ratio = 1.0, 2.5, 5.0     # a probe costs 4 plain steps more (a
    assert run(gov, [2], 400) == [*range(1, 10), 210]         # draft model's catch-up): 200 apart
    gov.probe_ratio = None
    longest = 8 * 4 << BACKOFF                  # unless nobody has verified drafts for that long
    s = Sequence([1, 2], SamplingParams(), 16)
    assert not gov.wants(s)
    for _ in range(longest):
        gov.step_may_speculate()
    assert gov.wants(Sequence([1, 2], SamplingParams(), 16))
    # back above the break-even (the others do well) one step after it stopped: it waits probe_every
    gov.pop = [10.0, 30.0, 95.0]
    s = Sequence([1, 2], SamplingParams(), 16)
    s.spec_steps, s.spec_idle = 1, 1
    assert gov.bound(s) > 2.5 and [gov.wants(s) for _ in range(5)] == [False, False, False, True, True]
    assert Governor(SpeculativeConfig(method="ngram", adaptive=False)).wants(Sequence([1], SamplingParams(), 16))


def test_the_governor_times_steady_steps_only(monkeypatch: pytest.MonkeyPatch):
    """Its estimates are medians of steady cycles: not a plain step's right after drafts or a prompt
    chunk (caches the other work filled), not a speculative one's right after plain steps (the
    proposer's catch-up: timed as a probe's cost), and not moved by a long-tailed cycle."""
    import baton.backends.spec.adaptive as adaptive
    from baton.backends.spec.adaptive import RATIOS, SAMPLES, SETTLE, Governor
    from baton.backends.spec.config import SpeculativeConfig

    clock = [0.0]
    monkeypatch.setattr(adaptive, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    gov = Governor(SpeculativeConfig(method="ngram"))

    def step(kind: bool | None, seconds: float) -> None:
        gov.tick()
        gov.measured(kind)
        clock[0] += seconds

    step(None, 0.05)                     # a prompt chunk
    for _ in range(SETTLE):              # the decode steps right after it: cold, not timed
        step(False, 0.007)
    for _ in range(SAMPLES):
        step(False, 0.004)
    step(True, 0.003)                    # the last plain cycle ends here (timed); this first
    assert gov.plain == pytest.approx(0.004)            # speculative step after plain ones is not timed
    step(True, 0.002)
    step(True, 0.002)
    step(True, 0.030)                    # the last step of a request, then the next one's prefill
    step(True, 0.002)
    step(True, 0.002)
    assert gov.ratio == pytest.approx(0.5)              # the 30 ms cycle did not move the median
    assert gov.probe_ratio is None
    for _ in range(RATIOS):              # the cost really changed: the median follows
        step(True, 0.02)
    step(True, 0.02)
    assert gov.ratio == pytest.approx(5)
    before = list(gov._samples[False])
    for dt in (0.009, 0.006):            # drafts stop: the plain steps right after them, slow
        step(False, dt)
    step(False, 0.004)
    step(True, 0.003)
    assert list(gov._samples[False]) == [*before[1:], pytest.approx(0.004)]     # only the settled one timed
    assert gov.plain == pytest.approx(0.004)
    step(False, 0.004)
    gov._probing = True                  # a sequence probed: that step's cost, catch-up and all
    step(True, 0.03)
    step(True, 0.01)
    assert gov.probe_ratio == pytest.approx(7.5) and gov.ratio == pytest.approx(5)
    # the box slows down 2x while nobody drafts: the plain cost follows, the break-even (a ratio) stays
    for _ in range(SETTLE + SAMPLES + 1):
        step(False, 0.008)
    assert gov.plain == pytest.approx(0.008) and gov.break_even() == pytest.approx(5)

    # a fresh server's first decode steps are slow: nobody drafts (a speculative cycle over one of
    # them read a break-even of 1.6 tokens for a true 3) until SAMPLES are timed, whose median they
    # do not move
    gov = Governor(SpeculativeConfig(method="ngram"))
    for dt in (0.008, 0.008, 0.007, 0.007, 0.004, 0.004, 0.004, 0.004, 0.004, 0.004):
        step(False, dt)
        assert gov.plain is None and not gov.step_may_speculate()
    step(False, 0.004)
    step(False, 0.004)
    assert gov.plain == pytest.approx(0.004) and gov.step_may_speculate()


def test_the_governor_traces_its_cycles_and_decisions_on_request(tmp_path, monkeypatch: pytest.MonkeyPatch):
    from baton.backends.spec.adaptive import Governor
    from baton.backends.spec.config import SpeculativeConfig

    assert Governor(SpeculativeConfig(method="ngram"))._trace is None and not list(tmp_path.iterdir())
    monkeypatch.setenv("BATON_SPEC_TRACE", str(tmp_path / "trace"))       # made if missing
    gov = Governor(SpeculativeConfig(method="ngram"))
    gov.tick()
    gov.measured(False)
    gov.tick()
    gov.plain, gov.ratio = 0.004, 2.5
    gov.pop = [10.0, 10.0, 10.0]                    # every verifying step emitted 1 token: below 2.5
    seq = Sequence([1, 2], SamplingParams(), 16)
    seq.spec_steps = 1
    assert not gov.wants(seq)
    lines = (tmp_path / "trace" / f"governor-{os.getpid()}.log").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("cycle ") and "timed_as=None" in lines[1]
    assert lines[2].startswith(f"seq {seq.seq_id} out=0 drafts=False ") and "break_even=2.5" in lines[2]
    gov.close()                                     # the engine's close closes it
    assert gov._trace is None and gov.wants(seq) is False
    assert len((tmp_path / "trace" / f"governor-{os.getpid()}.log").read_text().splitlines()) == 3


# ---- lossless sampling ------------------------------------------------------------------------

def _chi2_homogeneity(a: list[int], b: list[int]) -> float:
    """p-value of a chi-square test that two samples of categories come from one distribution
    (categories expected under 5 times are pooled)."""
    cats = sorted(set(a) | set(b))
    ca = torch.tensor([a.count(c) for c in cats], dtype=torch.float64)
    cb = torch.tensor([b.count(c) for c in cats], dtype=torch.float64)
    tot = ca + cb
    small = tot * min(len(a), len(b)) / (len(a) + len(b)) < 5
    if small.any():
        ca = torch.cat([ca[~small], ca[small].sum(0, keepdim=True)])
        cb = torch.cat([cb[~small], cb[small].sum(0, keepdim=True)])
        tot = ca + cb
    na, nb = ca.sum(), cb.sum()
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = float((((ca - ea) ** 2) / ea + ((cb - eb) ** 2) / eb).sum())
    df = len(tot) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


N_SAMPLES = 600
ALPHA = 1e-3      # per position; 3 positions: a false alarm in at most 0.3% of seed sets


def _samples(llm: LLM, seed0: int) -> list[list[int]]:
    params = [SamplingParams(temperature=1.0, top_k=6, max_tokens=4, seed=seed0 + i, ignore_eos=True)
              for i in range(N_SAMPLES)]
    return [o.token_ids for o in llm.generate([PROMPTS[1]] * N_SAMPLES, params)]


def _p_values(spec: LLM, plain: LLM) -> list[float]:
    on, off = _samples(spec, 0), _samples(plain, 100_000)
    # output positions 1..3 come from verify steps (position 0 is prefill's); each token conditioned
    # on its own prefix, so compare (previous token, token) pairs
    return [_chi2_homogeneity([tuple(s[j - 1:j + 1]) for s in on], [tuple(s[j - 1:j + 1]) for s in off])
            for j in (1, 2, 3)]


@pytest.fixture(scope="module")
def plain_top6():
    llm = LLM(TARGET, dtype="float32", max_model_len=1024, num_blocks=512, max_num_seqs=128)
    yield llm
    llm.close()


def test_sampling_with_drafts_is_distributed_as_without(plain_top6):
    """With a 6-token support per step, speculation (draft model, many accepts and rejects) and plain
    sampling give the same distribution at every verified position (chi-square, alpha 1e-3)."""
    spec = spec_llm("draft", num_blocks=512, max_num_seqs=128)
    try:
        ps = _p_values(spec, plain_top6)
        st = spec.engine.spec_stats
        assert st["drafts"] >= N_SAMPLES and 0.2 * st["drafted"] < st["accepted"] < 0.9 * st["drafted"]
        assert min(ps) > ALPHA, ps
    finally:
        spec.close()


def test_the_same_test_catches_a_wrong_verifier(plain_top6, monkeypatch):
    """A classic bug: after a rejection, sample from p instead of norm(max(p - q, 0)). The rejected
    draft then comes out too often, and the test above sees it."""
    from baton.backends.engine.sampler import target_probs

    def wrong(rows, drafts, params, noise, draft_probs=None):
        out = []
        for j, d in enumerate(drafts):
            p = target_probs(rows[j], params)
            p = p / p.sum()
            gen = noise(j)
            if torch.rand((), generator=gen).item() < float(p[d]):
                out.append(d)
                continue
            return out + [int(torch.multinomial(p, 1, generator=gen))]
        p = target_probs(rows[len(drafts)], params)
        return out + [int(torch.multinomial(p / p.sum(), 1, generator=noise(len(drafts))))]

    monkeypatch.setattr("baton.backends.engine.llm_engine.verify", wrong)
    spec = spec_llm("draft", num_blocks=512, max_num_seqs=128)
    try:
        ps = _p_values(spec, plain_top6)
        assert min(ps) < ALPHA, ps
    finally:
        spec.close()


def test_the_proposer_runs_on_proposer_threads_and_the_engine_keeps_its_own(expected, monkeypatch):
    """`proposer_threads` bounds the torch threads of the proposer's ops only (served, waking a
    second OpenMP thread per small op cost more than the op); the target's steps keep theirs."""
    torch.set_num_threads(2)
    llm = spec_llm("eagle", spec={"proposer_threads": 1})
    try:
        proposer, seen = llm.engine.proposer, {"propose": set(), "step": set()}
        propose, run = proposer.propose, llm.engine.runner.run

        def counting_propose(*a, **kw):
            seen["propose"].add(torch.get_num_threads())
            return propose(*a, **kw)

        def counting_run(*a, **kw):
            seen["step"].add(torch.get_num_threads())
            return run(*a, **kw)

        monkeypatch.setattr(proposer, "propose", counting_propose)
        monkeypatch.setattr(llm.engine.runner, "run", counting_run)
        assert llm.generate(PROMPTS[:1], GREEDY)[0].token_ids == expected[PROMPTS[0]]
        assert seen == {"propose": {1}, "step": {2}}
    finally:
        llm.close()


# ---- bad configurations -----------------------------------------------------------------------

def test_bad_speculative_configs_name_the_field(tmp_path, qwen3_dir):
    def bad(spec: dict, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            LLM(TARGET, dtype="float32", num_blocks=32, max_model_len=256, speculative_config=spec).close()

    bad({"method": "ngram", "num_speculative_tokens": 0}, r"speculative\.num_speculative_tokens: must be >= 1")
    bad({"method": "lookahead"}, r"speculative\.method: unknown method 'lookahead'")
    bad({"method": "draft"}, r"speculative\.model: method 'draft' needs")
    bad({"method": "eagle", "model": str(tmp_path / "nowhere")}, r"speculative\.model: .*config\.json does not exist")
    bad({"method": "ngram", "k": 3}, r"unknown key 'k' in speculative")
    bad({"method": "ngram", "proposer_threads": -1}, r"speculative\.proposer_threads: must be >= 0, got -1")
    bad({"method": "ngram", "num_speculative_tokens": "3"}, r"num_speculative_tokens: expected int")
    bad({"method": "draft", "model": str(qwen3_dir)}, r"speculative\.model: the draft's vocab_size \d+ differs")
    bad({"method": "medusa", "model": HEADS["medusa"], "num_speculative_tokens": 9},
        r"speculative\.num_speculative_tokens: 9 exceeds the 4 Medusa heads")
    bad({"method": "medusa", "model": HEADS["eagle"]}, r"speculative\.model: .* is not a Medusa checkpoint")
    # heads of another hidden size
    other = tmp_path / "medusa-wide"
    shutil.copytree(HEADS["medusa"], other)
    meta = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(meta | {"hidden_size": 512}))
    bad({"method": "medusa", "model": str(other)}, r"speculative\.model: the heads' hidden_size 512 differs")
    eagle = tmp_path / "eagle-wide"
    shutil.copytree(HEADS["eagle"], eagle)
    meta = json.loads((eagle / "config.json").read_text())
    (eagle / "config.json").write_text(json.dumps(meta | {"vocab_size": 100}))
    bad({"method": "eagle", "model": str(eagle)}, r"speculative\.model: the head's vocab_size 100 differs")


# ---- through Triton ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", list(HEADS))
def test_a_node_with_each_method_streams_the_plain_engines_tokens(method, expected):
    """Profile spec_<method>: alone and 8 at once (max_batch raised so the batch speculates too),
    prompts prefilled in 32-token chunks, then all 8 again (prefix hits): token-exact; the final
    response carries the request's drafts; per-position counters on the metrics port; no block left
    in use."""
    import threading
    import time

    from conftest import blocks_in_use
    from test_serving import _metrics

    from baton.backends.serving.launcher import Node
    from baton_client import BatonClient

    spec = {"method": method, "num_speculative_tokens": 3, "model": HEADS[method], "max_batch": 8,
            "adaptive": False}
    n = Node(str(TARGET), f"spec_{method}", overrides={"dtype": "float32", "max_model_len": 1024,
                                                      "kv_cache_memory_mb": 16, "speculative": spec,
                                                      "prefill_chunk_tokens": 32})
    n.start(timeout=180, quiet=True)
    try:
        client = BatonClient(n.grpc_url)
        for p in PROMPTS[:2]:
            chunks = list(client.stream(p, temperature=0.0, max_tokens=40, ignore_eos=True))
            assert [t for c in chunks for t in c.token_ids] == expected[p]
            drafted, accepted, steps = chunks[-1].speculative_tokens
            assert steps > 0 and drafted >= accepted >= 0
            assert any(len(c.token_ids) > 1 for c in chunks) or accepted == 0   # accepted drafts go out together
        for again in (False, True):
            got, cached = {}, {}

            def one(p: str, got: dict = got, cached: dict = cached) -> None:
                r = client.generate(p, temperature=0.0, max_tokens=40, ignore_eos=True)
                got[p], cached[p] = r.token_ids, r.cached_tokens

            threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert got == expected
            assert all(cached.values()) if again else True
        assert blocks_in_use(n.manager.address) == 0
        deadline = time.monotonic() + 10           # decode sends its counters when it goes idle
        while not (m := _metrics(n)).get("baton:spec_accepted_tokens_total") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert 0 < m["baton:spec_accepted_tokens_total"] < m["baton:spec_draft_tokens_total"]
        assert m["baton:spec_drafts_total"] > 0
        assert 0 < m["baton:spec_accepted_tokens_per_position_total"] <= m["baton:spec_accepted_tokens_total"]
    finally:
        n.stop()


@pytest.mark.slow
@pytest.mark.parametrize("channel", ["ipc", "grpc"])
def test_the_draft_stage_frees_its_blocks_and_decode_never_depends_on_it(channel, expected):
    """Profile spec_draft runs the draft model as the Triton model `draft`, called over its socket
    (ipc) or through tritonserver (grpc). Its own KV blocks are all free once the requests end; with
    its process killed, decode streams the same tokens without drafts (the node's supervisor is what
    reports the dead stage)."""
    import subprocess
    import time

    from test_serving import _metrics

    from baton.backends.serving.launcher import Node
    from baton_client import BatonClient

    n = Node(str(TARGET), "spec_draft", overrides={"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_mb": 16,
                                                   "draft_channel": channel})
    n.start(timeout=180, quiet=True)
    try:
        address = json.loads((n.run_dir / "node.json").read_text())["draft_address"]
        assert address.startswith("ipc://") == (channel == "ipc")
        client = BatonClient(n.grpc_url)
        first = client.generate(PROMPTS[0], temperature=0.0, max_tokens=40, ignore_eos=True)
        assert first.token_ids == expected[PROMPTS[0]] and first.speculative_tokens[1] > 0
        deadline = time.monotonic() + 10
        while (m := _metrics(n)).get("baton:draft_calls_total", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert m["baton:draft_calls_total"] > 0 and m["baton:draft_tokens_total"] > 0
        assert m["baton:draft_kv_blocks_used"] == 0
        pids = subprocess.run(["pgrep", "-f", f"{n.run_dir}/models/draft/1/model.py"], capture_output=True,
                              text=True).stdout.split()
        assert pids
        for pid in pids:
            subprocess.run(["kill", "-9", pid])
        again = client.generate(PROMPTS[0], temperature=0.0, max_tokens=40, ignore_eos=True)
        assert again.token_ids == first.token_ids and again.speculative_tokens == [0, 0, 0]
    finally:
        n.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine's CUDA path needs a GPU")
@pytest.mark.parametrize("method", list(HEADS))
def test_each_method_on_cuda_is_token_exact(method):
    """The offline engine on a GPU (benchmarks/gpu_check.sh runs this): the proposers' own KV pools
    and heads live on the device too."""
    kw = dict(dtype="float32", device="cuda", max_model_len=1024, num_blocks=256)
    plain = LLM(TARGET, **kw)
    want = [o.token_ids for o in plain.generate(PROMPTS, GREEDY)]
    plain.close()
    spec = LLM(TARGET, **kw, speculative_config={"method": method, "model": HEADS[method], "max_batch": 256,
                                                 "adaptive": False, "num_speculative_tokens": 3})
    try:
        assert [o.token_ids for o in spec.generate(PROMPTS, GREEDY)] == want
        assert spec.engine.spec_stats["accepted"] > 0 and used_blocks(spec) == (0, 0)
    finally:
        spec.close()


def test_a_node_published_tied_head_still_gives_drafters_their_cut_head():
    """A node publishes a tied lm_head processed (oneDNN-packed on CPU). The drafters' `draft_vocab`
    head is still cut from the embedding's rows, as in-process: it was None there, so EAGLE and
    Medusa drafted through the full vocabulary's head when served, at several times the cost."""
    from baton.backends.models.config import ModelConfig
    from baton.backends.models.decoder import DecoderLM, load_weights, process_linears
    from baton.kernels.linear import select_linear_method

    cfg = ModelConfig.from_dir(TARGET)
    assert cfg.tie_word_embeddings
    method = select_linear_method(torch.bfloat16, "cpu", pack=True)
    published = process_linears(cfg, load_weights(cfg, TARGET, torch.bfloat16), method)
    model = DecoderLM(cfg, published, 64, method)
    head = model.head_over(1024)
    assert head is not None
    hidden = torch.randn(3, cfg.hidden_size, dtype=torch.bfloat16)
    torch.testing.assert_close(model.logits(hidden, head=head), model.logits(hidden)[:, :1024], atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("layers", [1, 2])
def test_medusa_proposes_each_heads_top1_of_the_stacked_heads(layers, tmp_path):
    """The proposer runs the heads' first blocks as one stacked GEMM: its drafts are still, per
    sequence, head j's top-1 under the target's lm_head (MedusaHeads' own forward), for heads of one
    and of two residual blocks."""
    from baton.backends.spec.heads import MedusaHeads

    cfg = json.loads((TARGET / "config.json").read_text())
    torch.manual_seed(0)
    ref = MedusaHeads(cfg["hidden_size"], 4, layers)
    for p in ref.parameters():                 # trained-looking heads: not the identity they start as
        torch.nn.init.normal_(p, std=0.05)
    ref.save(tmp_path, cfg["vocab_size"], str(TARGET))
    llm = spec_llm("medusa", spec={"model": str(tmp_path)})
    try:
        proposer = llm.engine.proposer
        feats = torch.randn(5, cfg["hidden_size"]) * 3
        seqs = [SimpleNamespace(seq_id=i, num_tokens=20) for i in range(5)]
        for s, f in zip(seqs, feats):
            proposer.last[s.seq_id] = (18, f)
        ref = MedusaHeads.load(tmp_path).eval()       # as saved (bf16 on disk), in fp32 like the engine
        with torch.inference_mode():
            want = llm.engine.model.logits(ref(feats)[:3].reshape(-1, feats.shape[1])).argmax(-1).view(3, 5).T.tolist()
        assert proposer.propose(seqs, 3) == want
        assert proposer.propose(seqs, 2) == [w[:2] for w in want]
    finally:
        llm.close()
