"""The embedded grammar: determinism, held-out disjointness, minimal-pair format and that
its agreements hold (checked by an independent rule over the lexicon, not the generator)."""

from __future__ import annotations

import random
import re

import pytest

from dynlab.data import grammar
from dynlab.data.grammar import generate_corpus, heldout_domains, minimal_pairs

SING = {n[0] for n in grammar.PEOPLE + grammar.ANIMALS + grammar.THINGS + grammar.NAMES}
PLUR = {n[1] for n in grammar.PEOPLE + grammar.ANIMALS + grammar.THINGS}
V3SG = {v[1] for v in grammar.INTRANS_ANIMATE + grammar.INTRANS_THING + grammar.TRANSITIVE}
VPL = {v[0] for v in grammar.INTRANS_ANIMATE + grammar.INTRANS_THING + grammar.TRANSITIVE}
PAST = {v[2] for v in grammar.INTRANS_ANIMATE + grammar.INTRANS_THING + grammar.TRANSITIVE}
SG_DETS = {"a", "an", "this", "that", "every", "one"}
PL_DETS = {"these", "those", "many", "two", "three", "few"}


def sentences(docs: list[str]) -> list[str]:
    return [s.strip() + " ." for d in docs for s in d.split(" .") if s.strip()]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_corpus()  # the default arguments, as the trainer uses them


def test_deterministic_and_no_global_rng():
    state = random.getstate()
    a = generate_corpus(50, seed=3)
    assert random.getstate() == state  # the global RNG is never touched
    assert a == generate_corpus(50, seed=3)
    assert a != generate_corpus(50, seed=4)
    assert heldout_domains(5) == heldout_domains(5)
    assert minimal_pairs(7) == minimal_pairs(7)
    assert minimal_pairs(7, seed=1) != minimal_pairs(7)
    # documents are generated one after another: a smaller corpus is a prefix of a larger one
    assert generate_corpus(20, seed=3) == a[:20]


def test_corpus_shape_and_vocabulary(corpus):
    assert len(corpus) == 20_000
    n_sent = [len(sentences([d])) for d in corpus[:500]]
    assert min(n_sent) >= 3 and max(n_sent) <= 8
    words = {w for d in corpus for w in d.split()}
    vocab = grammar.vocabulary()
    assert words <= vocab
    assert 300 <= len(words) <= 600  # "a vocabulary of a few hundred words"
    assert all(re.fullmatch(r"[a-z .]+", d) for d in corpus[:1000])


def test_heldout_documents_do_not_occur_in_training(corpus):
    domains = heldout_domains()
    assert sorted(domains) == ["attractor", "mixed", "reflexive", "relative", "simple"]
    assert all(len(docs) == 500 for docs in domains.values())
    train = set(corpus)
    held = [d for docs in domains.values() for d in docs]
    assert sum(d in train for d in held) == 0
    # the families really differ: attractor documents have prepositions after the subject,
    # reflexive ones a reflexive pronoun in every sentence
    refl = sentences(domains["reflexive"])
    assert all(re.search(r"\b(him|her|it|them)sel(f|ves) \.$", s) for s in refl)


def test_determiner_noun_agreement_holds_in_corpus(corpus):
    """Independent check: a number-marked determiner is followed (after at most one
    adjective) by a noun of its number."""
    checked = 0
    for doc in corpus[:3000]:
        w = doc.split()
        for i, det in enumerate(w[:-1]):
            if det not in SG_DETS | PL_DETS or (det == "that" and w[i - 1] in SING | PLUR):
                continue  # ("that" after a noun is a relative pronoun)
            j = i + 1 if w[i + 1] in SING | PLUR else i + 2
            if w[i: i + 2] == ["every", "day"]:
                continue
            assert (w[j] in SING) == (det in SG_DETS), doc
            checked += 1
    assert checked > 5000


def test_subject_verb_agreement_holds_in_simple_sentences():
    """Independent check on the 'simple' domain: [det] [adj] noun [adverb] verb."""
    checked = 0
    for s in sentences(heldout_domains(200)["simple"]):
        w = s.split()
        if "and" in w:
            continue
        k = next(i for i, x in enumerate(w) if x in SING | PLUR)
        v = w[k + 2] if w[k + 1] in grammar.ADVERBS else w[k + 1]
        if v in (V3SG | VPL | {"is", "are"}) - PAST:  # present tense ("hurt" is ambiguous)
            assert (w[k] in SING) == (v in V3SG | {"is"}), s
            checked += 1
    assert checked > 300


def test_minimal_pairs_format(corpus):
    pairs = minimal_pairs(40)
    assert len(pairs) == 4 * 40
    assert {p["UID"] for p in pairs} == set(grammar.UIDS)
    train_sentences = set(sentences(corpus))
    bad_seen = 0
    for p in pairs:
        assert set(p) == {"sentence_good", "sentence_bad", "field", "linguistics_term", "UID",
                          "pairID"}
        assert p["field"] in ("morphology", "syntax") and isinstance(p["pairID"], str)
        g, b = p["sentence_good"].split(), p["sentence_bad"].split()
        assert len(g) == len(b)
        diff = [i for i in range(len(g)) if g[i] != b[i]]
        assert len(diff) == 1, p  # exactly the agreeing word differs
        bad_seen += p["sentence_bad"] in train_sentences
    # the grammar never generates the ungrammatical member of a pair
    assert bad_seen == 0
    for uid in grammar.UIDS:
        goods = [p["sentence_good"] for p in pairs if p["UID"] == uid]
        assert len(set(goods)) == len(goods)
        assert [p["pairID"] for p in pairs if p["UID"] == uid] == [str(i) for i in range(40)]


def test_minimal_pair_contents():
    pairs = minimal_pairs(60)
    by_uid = {u: [p for p in pairs if p["UID"] == u] for u in grammar.UIDS}
    for p in by_uid["grammar_anaphor_agreement"]:
        g, b = p["sentence_good"].split(), p["sentence_bad"].split()
        assert g[-2].endswith(("self", "selves")) and b[-2].endswith(("self", "selves"))
    for p in by_uid["grammar_subject_verb_agreement_distractor"]:
        # an attractor of the other number sits between the subject and the verb
        w = p["sentence_good"].split()
        nouns = [x for x in w if x in SING | PLUR]
        assert len(nouns) >= 2 and (nouns[0] in SING) != (nouns[1] in SING), p
    for p in by_uid["grammar_determiner_noun_agreement"]:
        g, b = p["sentence_good"].split(), p["sentence_bad"].split()
        i = next(i for i in range(len(g)) if g[i] != b[i])
        assert g[i] in SING | PLUR and b[i] in SING | PLUR and (g[i] in SING) != (b[i] in SING)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_documents"):
        generate_corpus(-1)
    with pytest.raises(ValueError, match="n_per_uid"):
        minimal_pairs(-2)
