"""`baton train-tiny --recipe ci`: every phase of the real recipe on a sliver of the corpus."""

import json

import numpy as np
import pytest
import torch

from baton.tools.train import corpus


def test_split_is_by_file_and_stable():
    a = corpus.read_split(5, max_bytes=200_000)
    b = corpus.read_split(5, max_bytes=200_000)
    assert a.heldout_files == b.heldout_files and a.heldout_files
    for name in a.heldout_files:
        assert corpus.is_heldout(name, 5)
    assert not set(a.train) & set(a.heldout)
    assert not any(corpus.is_test(n) for n in a.heldout_files)


def test_test_suites_are_recognised():
    assert corpus.is_test("test/test_os.py") and corpus.is_test("idlelib/idle_test/htest.py")
    assert corpus.is_test("unittest/test/test_case.py") and corpus.is_test("lib2to3/tests/data/x.py")
    assert not corpus.is_test("unittest/case.py") and not corpus.is_test("contest.py")


def test_windows():
    stream = np.arange(100, dtype=np.int32)
    w = next(corpus.random_windows(stream, 3, 9, seed=0))
    assert w.shape == (3, 10) and (np.diff(w, axis=1) == 1).all()
    f = corpus.fixed_windows(stream, 10, 4)
    assert f.shape == (4, 11) and f[1, 0] == 10
    assert corpus.first_bytes(["abc", "de", "fgh"], 4) == ["abc", "de"]    # the last one crosses the mark
    with pytest.raises(ValueError, match="shorter than one window"):
        next(corpus.random_windows(stream[:5], 1, 9, seed=0))


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    from baton.tools.train.tiny import RECIPES, train_tiny

    out = tmp_path_factory.mktemp("tiny")
    return out, train_tiny(out, RECIPES["ci"], threads=2)


def test_short_run_lowers_loss(ci_run):
    _, r = ci_run
    t = r["train"]
    assert np.mean(t["target_loss_last"]) < np.mean(t["target_loss_first"]) - 0.3
    assert np.mean(t["student_loss_last"]) < np.mean(t["student_loss_first"])


def test_short_run_writes_loadable_family(ci_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baton.backends.spec.heads import EagleHead, MedusaHeads

    out, r = ci_run
    for name in ("baton-tiny", "baton-tiny-draft"):
        model = AutoModelForCausalLM.from_pretrained(str(out / name), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(out / name))
        assert model.config.vocab_size == len(tok) == r["recipe"]["vocab"]
    MedusaHeads.load(out / "baton-tiny-medusa")
    EagleHead.load(out / "baton-tiny-eagle")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["target_ppl"] == pytest.approx(r["metrics"]["target_ppl"])
    assert "## Held-out metrics" in (out / "README.md").read_text()
    listed = {ln.split("  ", 1)[1] for ln in (out / "SHA256SUMS").read_text().splitlines()}
    assert "baton-tiny/model.safetensors" in listed and "metrics.json" in listed


def test_self_distillation_windows_are_a_corpus_prefix_and_the_targets_continuation(ci_run):
    from baton import LLM, SamplingParams
    from baton.tools.train.distill import continued_windows, mixed_batches

    out, r = ci_run
    assert r["train"]["distilled_windows"] == r["recipe"]["distill_windows"]
    stream = np.random.default_rng(1).integers(3, r["recipe"]["vocab"], size=2000).astype(np.int32)
    w = continued_windows(out / "baton-tiny", stream, 6, 64, seed=0)
    assert w.shape == (6, 65)
    assert np.array_equal(w, continued_windows(out / "baton-tiny", stream, 6, 64, seed=0))   # reproducible
    llm = LLM(out / "baton-tiny", enable_prefix_caching=False)
    greedy = 0
    for row in w:
        starts = [s for s in range(len(stream) - 32) if np.array_equal(stream[s:s + 32], row[:32])]
        assert starts, "each window starts with a corpus prefix"
        # a greedy window's tail is the target's own greedy continuation (a sampled one differs)
        cont = llm.generate(row[:32].tolist(), SamplingParams(temperature=0, max_tokens=33, ignore_eos=True))[0]
        greedy += cont.token_ids == row[32:].tolist()
    llm.close()
    assert greedy >= 3
    corpus_rows = iter([np.full((4, 65), -1)] * 3)
    b = next(mixed_batches(w, corpus_rows, 4, 1, seed=0))
    assert b.shape == (4, 65) and (b[3] == -1).all() and (b[:3] >= 0).all()


def test_each_student_is_clipped_on_its_own(ci_run):
    """The draft's training depends on its own rows and loss only: heads that start elsewhere (and
    so have other gradients) leave the trained draft bit for bit the same."""
    from transformers import AutoModelForCausalLM

    from baton.backends.spec.heads import EagleHead, MedusaHeads
    from baton.tools.train.loop import Schedule, train_students
    from baton.tools.train.tiny import RECIPES, _new_model

    out, r = ci_run
    rc = RECIPES["ci"]
    target = AutoModelForCausalLM.from_pretrained(str(out / "baton-tiny"), dtype=torch.bfloat16)
    cfg = json.loads((out / "baton-tiny" / "config.json").read_text())
    rows = np.random.default_rng(0).integers(3, rc.vocab, size=(4, 2 * rc.batch, rc.seq_len + 1))

    def draft_after(head_scale: float) -> dict:
        draft = _new_model(rc.draft, rc.vocab, 0, rc.max_positions, seed=1)
        torch.manual_seed(2)
        medusa, eagle = MedusaHeads(rc.target["hidden"], rc.medusa_heads), EagleHead(cfg)
        with torch.no_grad():
            for p in list(medusa.parameters()) + list(eagle.parameters()):
                p.mul_(head_scale)
        train_students(target, draft, medusa, eagle, iter(rows), Schedule(4, 1e-2, warmup=1),
                       Schedule(4, 1e-2, warmup=1), head_positions=16, heads_from=rc.batch)
        return {k: v.clone() for k, v in draft.state_dict().items()}

    a, b = draft_after(1.0), draft_after(30.0)
    assert all(torch.equal(a[k], b[k]) for k in a)
