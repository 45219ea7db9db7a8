"""dynlab.eval against independent references: perplexity against a plain per-window loop and
the uniform model's exact value, BLiMP against a one-sentence-at-a-time loop, input handling."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dynlab.data.grammar import generate_corpus, minimal_pairs
from dynlab.eval import EvalData, EvalDataWarning, evaluate, load_eval_data
from dynlab.eval.scoring import sequence_logprobs, windows
from dynlab.model import ModelConfig, PicoDecoder

EOT = "<|endoftext|>"
CTX = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def bpe_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE with <|endoftext|>, trained here (independent of the trainer's code)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def tiny_model(vocab: int, ctx: int = CTX, seed: int = 0) -> PicoDecoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                      activation_hidden_dim=64, vocab_size=vocab, max_seq_len=ctx)
    return PicoDecoder(cfg).eval()


class UniformModel(nn.Module):
    """Constant logits: every token has probability 1 / vocab."""

    def __init__(self, vocab: int, ctx: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.config = ModelConfig(2, 1, 1, 1, 2, vocab, ctx)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab) + 0 * self.dummy


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer(generate_corpus(1500, seed=5), 600)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.get_vocab_size())


# ------------------------------------------------------------------ references (plain loops)
def ref_logprob(model: nn.Module, seq: list[int], first_target: int = 1) -> float:
    """Σ_{t >= first_target} log p(seq[t] | seq[:t]) with ONE forward pass over seq[:-1]."""
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]])).double()[0]
    lp = torch.log_softmax(logits, dim=-1)
    return sum(lp[t - 1, seq[t]].item() for t in range(first_target, len(seq)))


def ref_perplexity_nonoverlap(model, tok, docs: list[str], ctx: int) -> float:
    """Non-overlapping chunks of x = [eot] + ids: inputs x[s:s+ctx], targets x[s+1:s+ctx+1]."""
    bos = tok.token_to_id(EOT)
    nll, n = 0.0, 0
    for doc in docs:
        x = [bos] + tok.encode(doc, add_special_tokens=False).ids
        for s in range(0, len(x) - 1, ctx):
            chunk = x[s: s + ctx + 1]
            nll -= ref_logprob(model, chunk)
            n += len(chunk) - 1
    return math.exp(nll / n)


def ref_perplexity_every_context(model, tok, docs: list[str], ctx: int) -> float:
    """Each target t conditioned on the ctx tokens before it (what stride=1 must give)."""
    bos = tok.token_to_id(EOT)
    nll, n = 0.0, 0
    for doc in docs:
        x = [bos] + tok.encode(doc, add_special_tokens=False).ids
        for t in range(1, len(x)):
            seq = x[max(0, t - ctx): t + 1]
            nll -= ref_logprob(model, seq, first_target=len(seq) - 1)
            n += 1
    return math.exp(nll / n)


def ref_blimp(model, tok, pairs: list[dict]) -> dict:
    """One sentence at a time; correct iff log p(good) > log p(bad); means over UIDs."""
    bos = tok.token_to_id(EOT)
    per_uid: dict[str, list[int]] = {}
    field_of = {}
    for p in pairs:
        lg = ref_logprob(model, [bos] + tok.encode(p["sentence_good"]).ids)
        lb = ref_logprob(model, [bos] + tok.encode(p["sentence_bad"]).ids)
        per_uid.setdefault(p["UID"], []).append(1 if lg > lb else 0)
        field_of[p["UID"]] = p["field"]
    by_uid = {u: sum(v) / len(v) for u, v in per_uid.items()}
    by_field: dict[str, list[float]] = {}
    for u, a in by_uid.items():
        by_field.setdefault(field_of[u], []).append(a)
    return {"by_uid": by_uid, "by_field": {f: sum(v) / len(v) for f, v in by_field.items()},
            "overall": sum(by_uid.values()) / len(by_uid)}


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


HAND_PAIRS = [
    {"sentence_good": "the woman saw herself .", "sentence_bad": "the woman saw himself .",
     "field": "semantics", "linguistics_term": "hand", "UID": "hand_made", "pairID": "0"},
    {"sentence_good": "these dogs bark .", "sentence_bad": "these dog bark .",
     "field": "semantics", "linguistics_term": "hand", "UID": "hand_made", "pairID": "1"},
    {"sentence_good": "Katherine can't help herself.",
     "sentence_bad": "Katherine can't help himself.",
     "field": "semantics", "linguistics_term": "hand", "UID": "hand_made", "pairID": "2"},
]


@pytest.fixture(scope="module")
def blimp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("blimp")
    pairs = minimal_pairs(12, seed=7)
    for uid in sorted({p["UID"] for p in pairs}):
        write_jsonl(d / f"{uid}.jsonl", [p for p in pairs if p["UID"] == uid])
    write_jsonl(d / "hand_made.jsonl", HAND_PAIRS)
    return d


# ------------------------------------------------------------------ windows and scoring
def test_windows_hand_enumerated():
    ids = [10, 11, 12, 13, 14, 15, 16]  # x = [0, 10, ..., 16], targets x[1..7]
    assert windows(ids, 0, 3) == [([0, 10, 11, 12], 3), ([12, 13, 14, 15], 3), ([15, 16], 1)]
    assert windows(ids, 0, 4, stride=2) == [
        ([0, 10, 11, 12, 13], 4), ([11, 12, 13, 14, 15], 2), ([13, 14, 15, 16], 1)]
    assert windows([], 0, 4) == []
    for ctx, stride in [(1, 1), (3, 2), (5, 5), (8, 3), (20, 7)]:
        w = windows(list(range(1, 30)), 0, ctx, stride)
        assert sum(k for _, k in w) == 29  # every target exactly once
        assert all(len(s) - 1 <= ctx for s, _ in w)  # inputs fit the context
    with pytest.raises(ValueError, match="stride"):
        windows(ids, 0, 4, stride=5)


def test_sequence_logprobs_batching_matches_one_at_a_time(model):
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 500, size=n)) for n in (2, 9, 5, 17, 3, 12, 1)]
    k = [1, 8, 2, 16, 2, 5, 0]
    ref = [ref_logprob(model, s, first_target=len(s) - j) if j else 0.0
           for s, j in zip(seqs, k, strict=True)]
    for bs in (1, 3, 64):
        got = sequence_logprobs(model, seqs, k, batch_size=bs)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ perplexity
def test_uniform_model_perplexity_is_vocab_size(tok):
    vocab = tok.get_vocab_size()
    data = EvalData({"a": generate_corpus(5, seed=1), "b": ["the dog sleeps ."]}, [])
    res = evaluate(UniformModel(vocab, 8), tok, data)
    assert set(res) == {"perplexity"}
    for v in [*res["perplexity"]["by_domain"].values(), res["perplexity"]["macro"]]:
        assert v == pytest.approx(vocab, rel=1e-6)  # exp(n log V / n) = V


def test_perplexity_equals_plain_loop(tok, model):
    domains = {"one": generate_corpus(4, seed=11), "two": generate_corpus(3, seed=12)[:3]}
    n_tokens = [len(tok.encode(d).ids) for d in domains["one"]]
    assert max(n_tokens) > 2 * CTX  # several windows per document
    res = evaluate(model, tok, EvalData(domains, []), batch_size=5)["perplexity"]
    ref = {d: ref_perplexity_nonoverlap(model, tok, docs, CTX) for d, docs in domains.items()}
    for d in domains:
        assert res["by_domain"][d] == pytest.approx(ref[d], rel=1e-5)
    assert res["macro"] == pytest.approx((ref["one"] + ref["two"]) / 2, rel=1e-5)
    from dynlab.eval.perplexity import perplexity

    plain = perplexity(model, tok, domains, tok.token_to_id(EOT), CTX)
    assert plain["by_domain"] == pytest.approx(res["by_domain"], rel=1e-6)
    # overlapping windows with stride 1 give every token the full context of CTX tokens
    docs = domains["two"][:2]
    got = evaluate(model, tok, EvalData({"x": docs}, []), stride=1)["perplexity"]["macro"]
    assert got == pytest.approx(ref_perplexity_every_context(model, tok, docs, CTX), rel=1e-5)
    assert got != pytest.approx(ref_perplexity_nonoverlap(model, tok, docs, CTX), rel=1e-4)


def test_evaluate_restores_mode_and_device(tok, model):
    model.train()
    evaluate(model, tok, EvalData({"a": ["the dog sleeps ."]}, []), device=None)
    assert model.training
    model.eval()


# ------------------------------------------------------------------ BLiMP
def test_blimp_equals_reference_loop(tok, blimp_dir):
    data = load_eval_data(ppl="none", blimp=blimp_dir)
    assert data.ppl_domains == {} and len(data.blimp_pairs) == 4 * 12 + 3
    model = tiny_model(tok.get_vocab_size(), ctx=64)
    res = evaluate(model, tok, data, batch_size=7)
    assert set(res) == {"blimp"}
    ref = ref_blimp(model, tok, data.blimp_pairs)
    assert res["blimp"]["by_uid"] == ref["by_uid"]
    assert res["blimp"]["by_field"] == pytest.approx(ref["by_field"])
    assert res["blimp"]["overall"] == pytest.approx(ref["overall"])
    assert set(res["blimp"]["by_field"]) == {"morphology", "syntax", "semantics"}
    from dynlab.eval.blimp import blimp

    assert blimp(model, tok, data.blimp_pairs, tok.token_to_id(EOT), 64) == res["blimp"]
    # a different random model gives different accuracies: the test can fail
    other = tiny_model(tok.get_vocab_size(), ctx=64, seed=3)
    res_other = evaluate(other, tok, data, batch_size=64)["blimp"]
    assert res_other["by_uid"] == ref_blimp(other, tok, data.blimp_pairs)["by_uid"]
    assert res_other["by_uid"] != res["blimp"]["by_uid"]
    with pytest.raises(ValueError, match="max_seq_len 65 must be in"):
        evaluate(model, tok, data, max_seq_len=65)


def test_blimp_tie_counts_as_incorrect(tok, blimp_dir):
    """Uniform model: log p = -n log V, so the shorter sentence wins and equal lengths tie."""
    pairs = [{"sentence_good": "these dogs bark .", "sentence_bad": "these dogs barks .",
              "field": "f", "UID": "u", "pairID": "0"}]
    n_good, n_bad = (len(tok.encode(p).ids) for p in ("these dogs bark .", "these dogs barks ."))
    res = evaluate(UniformModel(tok.get_vocab_size(), 32), tok, EvalData({}, pairs))
    assert res["blimp"]["overall"] == (1.0 if n_good < n_bad else 0.0)
    tie = [dict(pairs[0], sentence_bad="those dogs bark .")]
    assert len(tok.encode("those dogs bark .").ids) == n_good
    res = evaluate(UniformModel(tok.get_vocab_size(), 32), tok, EvalData({}, tie))
    assert res["blimp"]["overall"] == 0.0


def test_blimp_filters_glob_and_limit(tok, model, blimp_dir):
    data = load_eval_data(ppl="none", blimp=str(blimp_dir / "grammar_*agreement*.jsonl"),
                          uid_filter="grammar_subject_verb*", limit_per_uid=5)
    assert sorted({p["UID"] for p in data.blimp_pairs}) == [
        "grammar_subject_verb_agreement", "grammar_subject_verb_agreement_distractor"]
    assert len(data.blimp_pairs) == 10
    assert [p["pairID"] for p in data.blimp_pairs[:5]] == ["0", "1", "2", "3", "4"]
    with pytest.raises(ValueError, match="--uid 'island_\\*' matches no UID"):
        load_eval_data(ppl="none", blimp=blimp_dir, uid_filter="island_*")


# ------------------------------------------------------------------ bad input
def test_malformed_lines_report_file_and_line(tmp_path):
    good = HAND_PAIRS[0]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"sentence_good": "x"})
                    + "\n" + json.dumps(HAND_PAIRS[1]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_eval_data(ppl="none", blimp=path)
    with pytest.warns(EvalDataWarning) as record:
        data = load_eval_data(ppl="none", blimp=path, on_error="skip")
    assert [p["pairID"] for p in data.blimp_pairs] == ["0", "1"]
    messages = [str(w.message) for w in record]
    assert any("bad.jsonl:2" in m for m in messages)
    assert any("bad.jsonl:3: missing string field(s) ['sentence_bad', 'UID']" in m
               for m in messages)
    ppl = tmp_path / "web.jsonl"
    ppl.write_text('{"text": "a b ."}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"web\.jsonl:2: expected an object with a 'text'"):
        load_eval_data(ppl=ppl, blimp="none")
    with pytest.raises(FileNotFoundError, match="--blimp .*nowhere: no such file"):
        load_eval_data(ppl="none", blimp=tmp_path / "nowhere")


def test_empty_and_too_long_pairs(tok, model):
    long = " ".join(["the old dogs near the tall trees bark"] * 4) + " ."
    pairs = [dict(HAND_PAIRS[0]), dict(HAND_PAIRS[1], sentence_bad="  "),
             dict(HAND_PAIRS[0], sentence_good=long, pairID="9")]
    assert len(tok.encode(long).ids) > CTX
    with pytest.raises(ValueError, match="hand_made/1: empty sentence"):
        evaluate(model, tok, EvalData({}, pairs), on_error="fail")
    with pytest.raises(ValueError, match="hand_made/9: .* longer than the model's context of 16"):
        evaluate(model, tok, EvalData({}, pairs[2:]), on_error="fail")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate(model, tok, EvalData({}, pairs))  # default on_error="skip"
    assert sum(issubclass(w.category, EvalDataWarning) for w in caught) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        only_ppl = evaluate(model, tok, EvalData({"a": ["x y ."]}, pairs[2:]))
    assert only_ppl.keys() == {"perplexity"}  # nothing scorable: BLiMP left out, evaluation goes on
    assert [str(w.message) for w in caught][-1].startswith("BLiMP: none of the 1 pairs")
    assert res["blimp"] == ref_blimp(model, tok, pairs[:1])  # only the scorable pair counts


def test_ppl_directory_domains(tmp_path):
    (tmp_path / "books.txt").write_text("first doc .\nstill first .\n\n\nsecond doc .\n")
    write_jsonl(tmp_path / "web.jsonl", [{"text": "w1"}, {"text": "r1", "source": "reddit"},
                                         {"text": "w2"}])
    (tmp_path / "ignored.csv").write_text("x")
    data = load_eval_data(ppl=tmp_path, blimp="none")
    assert data.ppl_domains == {"books": ["first doc .\nstill first .", "second doc ."],
                                "web": ["w1", "w2"], "reddit": ["r1"]}
    assert data.blimp_pairs == []


def test_default_eval_data_has_every_part(tok):
    data = load_eval_data(limit_per_uid=3)
    assert sorted(data.ppl_domains) == ["attractor", "mixed", "reflexive", "relative", "simple"]
    assert all(len(v) == 200 for v in data.ppl_domains.values())
    assert len(data.blimp_pairs) == 4 * 3
    from dynlab.eval import default_eval_data

    none = default_eval_data(None, None)  # the trainer passes None for "default size"
    assert len(none.blimp_pairs) == 4 * 50 and len(none.ppl_domains["simple"]) == 200


def test_hub_blimp_needs_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="`datasets` package"):
            load_eval_data(ppl="none", blimp="nyu-mll/blimp")
    else:
        pytest.skip("datasets is installed; the hub is not reachable from tests")
