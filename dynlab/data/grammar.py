"""dynlab's embedded training and evaluation text: a small probabilistic English-like grammar.

Every sentence is lower case, words separated by single spaces, ending in " .". Documents are
3-8 sentences joined by a space. The grammar has three kinds of agreement, each one that a
model must learn from data:

- determiner-noun number:  "these dogs", "this dog", "a cat", "many cats"
- subject-verb number:     "the dog sleeps", "the dogs sleep", "the box is", "the boxes were"
- anaphor gender/number:   "the woman saw herself", "the kings saw themselves"

Agreement is made non-local by distractors: adverbs ("the dogs often bark"), prepositional
phrases and relative clauses whose nouns ("attractors") often have the other number
("the dog near the trees sleeps", "the girls that the king likes sing").

Everything is deterministic given the seed: each public function builds its own
`random.Random(seed)` and never touches the global RNG. The vocabulary has a few hundred words
(`vocabulary()`).

Public API:
    generate_corpus(n_documents, seed)   training documents
    heldout_domains(n_documents, seed)   perplexity domains (sentence families), disjoint seed
    minimal_pairs(n_per_uid, seed)       BLiMP-format records for the grammar's own suite
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------- lexicon
# Nouns: (singular, plural, gender); gender m/f for gendered people, "x" for people whose
# gender is unspecified (never the antecedent of a reflexive), "n" for animals and things.
PEOPLE: list[tuple[str, str, str]] = [
    ("man", "men", "m"), ("woman", "women", "f"), ("boy", "boys", "m"), ("girl", "girls", "f"),
    ("king", "kings", "m"), ("queen", "queens", "f"), ("father", "fathers", "m"),
    ("mother", "mothers", "f"), ("brother", "brothers", "m"), ("sister", "sisters", "f"),
    ("uncle", "uncles", "m"), ("aunt", "aunts", "f"), ("son", "sons", "m"),
    ("daughter", "daughters", "f"), ("prince", "princes", "m"), ("princess", "princesses", "f"),
    ("actor", "actors", "m"), ("actress", "actresses", "f"), ("waiter", "waiters", "m"),
    ("waitress", "waitresses", "f"), ("husband", "husbands", "m"), ("wife", "wives", "f"),
    ("gentleman", "gentlemen", "m"), ("lady", "ladies", "f"), ("monk", "monks", "m"),
    ("nun", "nuns", "f"), ("grandfather", "grandfathers", "m"),
    ("grandmother", "grandmothers", "f"),
    ("child", "children", "x"), ("teacher", "teachers", "x"), ("doctor", "doctors", "x"),
    ("farmer", "farmers", "x"), ("student", "students", "x"), ("baker", "bakers", "x"),
    ("sailor", "sailors", "x"), ("painter", "painters", "x"),
]
ANIMALS: list[tuple[str, str, str]] = [
    (s, p, "n") for s, p in [
        ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("horse", "horses"),
        ("mouse", "mice"), ("fox", "foxes"), ("wolf", "wolves"), ("goose", "geese"),
        ("rabbit", "rabbits"), ("duck", "ducks"), ("cow", "cows"), ("pig", "pigs"),
        ("goat", "goats"), ("frog", "frogs"), ("bear", "bears"), ("lion", "lions"),
        ("tiger", "tigers"), ("monkey", "monkeys"), ("owl", "owls"), ("snake", "snakes"),
        ("bee", "bees"), ("spider", "spiders"), ("donkey", "donkeys"), ("squirrel", "squirrels"),
    ]
]
THINGS: list[tuple[str, str, str]] = [
    (s, p, "n") for s, p in [
        ("tree", "trees"), ("table", "tables"), ("house", "houses"), ("river", "rivers"),
        ("stone", "stones"), ("book", "books"), ("door", "doors"), ("window", "windows"),
        ("box", "boxes"), ("cup", "cups"), ("bottle", "bottles"), ("chair", "chairs"),
        ("lamp", "lamps"), ("garden", "gardens"), ("bridge", "bridges"), ("road", "roads"),
        ("hill", "hills"), ("boat", "boats"), ("wall", "walls"), ("key", "keys"),
        ("clock", "clocks"), ("bell", "bells"), ("basket", "baskets"), ("candle", "candles"),
        ("ladder", "ladders"), ("knife", "knives"), ("leaf", "leaves"), ("shelf", "shelves"),
        ("church", "churches"), ("glass", "glasses"),
    ]
]
NAMES: list[tuple[str, str, str]] = [
    (n, "", "m") for n in ["john", "peter", "tom", "david", "paul", "mark", "james", "henry",
                           "oscar", "victor"]
] + [
    (n, "", "f") for n in ["mary", "anna", "lucy", "emma", "sarah", "clara", "julia", "alice",
                           "rose", "helen"]
]
# Verbs: (plural/base form, 3rd person singular present, past).
INTRANS_ANIMATE: list[tuple[str, str, str]] = [
    ("sleep", "sleeps", "slept"), ("run", "runs", "ran"), ("smile", "smiles", "smiled"),
    ("laugh", "laughs", "laughed"), ("wait", "waits", "waited"), ("sing", "sings", "sang"),
    ("dance", "dances", "danced"), ("swim", "swims", "swam"), ("jump", "jumps", "jumped"),
    ("rest", "rests", "rested"), ("cry", "cries", "cried"), ("shout", "shouts", "shouted"),
    ("walk", "walks", "walked"), ("eat", "eats", "ate"), ("hide", "hides", "hid"),
    ("play", "plays", "played"), ("work", "works", "worked"), ("listen", "listens", "listened"),
    ("sit", "sits", "sat"), ("bark", "barks", "barked"),
]
INTRANS_THING: list[tuple[str, str, str]] = [
    ("fall", "falls", "fell"), ("shake", "shakes", "shook"), ("move", "moves", "moved"),
    ("shine", "shines", "shone"), ("break", "breaks", "broke"), ("stand", "stands", "stood"),
    ("glow", "glows", "glowed"), ("turn", "turns", "turned"), ("crack", "cracks", "cracked"),
    ("vanish", "vanishes", "vanished"),
]
TRANSITIVE: list[tuple[str, str, str]] = [
    ("see", "sees", "saw"), ("watch", "watches", "watched"), ("find", "finds", "found"),
    ("notice", "notices", "noticed"), ("remember", "remembers", "remembered"),
    ("describe", "describes", "described"), ("like", "likes", "liked"),
    ("love", "loves", "loved"), ("hate", "hates", "hated"), ("admire", "admires", "admired"),
    ("touch", "touches", "touched"), ("hurt", "hurts", "hurt"), ("blame", "blames", "blamed"),
    ("praise", "praises", "praised"), ("protect", "protects", "protected"),
    ("help", "helps", "helped"), ("push", "pushes", "pushed"), ("follow", "follows", "followed"),
    ("carry", "carries", "carried"), ("forget", "forgets", "forgot"),
]
ADJECTIVES: list[str] = [
    "old", "young", "big", "small", "tall", "red", "green", "blue", "happy", "sad", "quiet",
    "loud", "brave", "clever", "gentle", "angry", "tired", "hungry", "lazy", "busy", "strange",
    "dark", "bright", "heavy", "soft", "warm", "cold", "wet", "dry", "new", "clean", "dirty",
    "wild", "calm", "proud", "kind", "famous", "lucky", "pretty", "empty",
]
ADVERBS: list[str] = ["often", "never", "always", "sometimes", "rarely", "still", "also"]
TIME: dict[str, list[str]] = {
    "present": ["today", "again", "at night", "every day", "in the morning"],
    "past": ["yesterday", "again", "at night", "last week", "in the morning"],
}
PREPS: list[str] = ["near", "behind", "beside", "under", "above", "with", "by", "next to"]
PLACE_PREPS: list[str] = ["in", "on", "at", "near", "behind", "under", "across"]
DET_SG: list[str] = ["the", "the", "a", "this", "that", "every", "one"]
DET_PL: list[str] = ["the", "the", "these", "those", "some", "many", "two", "three", "few"]
NUMBER_MARKED_DETS = frozenset({"a", "an", "this", "that", "every", "one", "these", "those",
                                "many", "two", "three", "few"})
COPULA = {("present", False): "is", ("present", True): "are",
          ("past", False): "was", ("past", True): "were"}
REFLEXIVE = {"m": "himself", "f": "herself", "n": "itself"}

UIDS: dict[str, tuple[str, str]] = {  # UID -> (field, linguistics_term)
    "grammar_determiner_noun_agreement": ("morphology", "determiner_noun_agreement"),
    "grammar_subject_verb_agreement": ("morphology", "subject_verb_agreement"),
    "grammar_subject_verb_agreement_distractor": ("syntax", "subject_verb_agreement"),
    "grammar_anaphor_agreement": ("morphology", "anaphor_agreement"),
}
FAMILIES: tuple[str, ...] = ("simple", "attractor", "relative", "reflexive")
_MIX = {"simple": 0.3, "attractor": 0.25, "relative": 0.2, "reflexive": 0.15, "narrative": 0.1}


def vocabulary() -> set[str]:
    """Every word the grammar can emit (including '.', 'an' and the words of multi-word items)."""
    words = {".", "an", "and", "that", "who", "is", "are", "was", "were", "themselves"}
    words |= set(REFLEXIVE.values())
    for s, p, _ in PEOPLE + ANIMALS + THINGS + NAMES:
        words |= {s, p} - {""}
    for verb in INTRANS_ANIMATE + INTRANS_THING + TRANSITIVE:
        words |= set(verb)
    for group in (ADJECTIVES, ADVERBS, *TIME.values(), PREPS, PLACE_PREPS, DET_SG, DET_PL):
        for item in group:
            words |= set(item.split())
    return words


# ---------------------------------------------------------------------------- generator
@dataclass
class Site:
    """One agreement in a sentence: the word at `index` would be wrong if replaced by `bad`."""

    kind: str  # "det_noun" | "subject_verb" | "anaphor"
    index: int
    bad: str
    distractor: bool = False  # an attractor of the other number between controller and target


@dataclass
class Sentence:
    words: list[str] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)

    def text(self) -> str:
        return " ".join(self.words)


@dataclass
class _Subject:
    noun: tuple[str, str, str]
    plural: bool
    attractor_opposite: bool = False


class _Grammar:
    """Sentence builders sharing one RNG and an optional per-document cast of nouns."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.cast: dict[str, tuple[str, str, str]] = {}

    def new_cast(self) -> None:
        """Pick the document's recurring characters (reused with probability 0.4)."""
        r = self.rng
        self.cast = {"person": r.choice(PEOPLE), "animal": r.choice(ANIMALS),
                     "thing": r.choice(THINGS)}

    def noun(self, cls: str) -> tuple[str, str, str]:
        r = self.rng
        if cls == "animate":
            cls = "person" if r.random() < 0.6 else "animal"
        elif cls == "any":
            cls = r.choices(["person", "animal", "thing"], [0.4, 0.3, 0.3])[0]
        elif cls == "gendered":
            return r.choice([n for n in PEOPLE if n[2] != "x"])
        if cls in self.cast and r.random() < 0.4:
            return self.cast[cls]
        return r.choice({"person": PEOPLE, "animal": ANIMALS, "thing": THINGS}[cls])

    def np(self, s: Sentence, noun: tuple[str, str, str], plural: bool, *,
           adj_p: float = 0.25, record: bool = True) -> None:
        """Determiner, optional adjective, noun; records a det-noun site for marked determiners."""
        r = self.rng
        if noun[1] == "":  # a proper name: no determiner, always singular
            s.words.append(noun[0])
            return
        det = r.choice(DET_PL if plural else DET_SG)
        words = [det] + ([r.choice(ADJECTIVES)] if r.random() < adj_p else [])
        words.append(noun[1] if plural else noun[0])
        if det == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        s.words.extend(words)
        if record and words[0] in NUMBER_MARKED_DETS:
            s.sites.append(Site("det_noun", len(s.words) - 1, noun[0] if plural else noun[1]))

    def subject(self, s: Sentence, cls: str, modifier: str | None,
                opposite: bool | None = None, name_p: float = 0.1) -> _Subject:
        """Subject NP with an optional PP or relative-clause modifier containing an attractor."""
        r = self.rng
        if cls in ("person", "animate", "gendered") and modifier is None and r.random() < name_p:
            noun = r.choice(NAMES)
            self.np(s, noun, False)
            return _Subject(noun, False)
        noun, plural = self.noun(cls), r.random() < 0.5
        self.np(s, noun, plural, record=False)  # its number also controls the verb
        if modifier is None:
            return _Subject(noun, plural)
        if opposite is None:
            opposite = r.random() < 0.6
        a_plural = (not plural) if opposite else plural
        a_noun = self.noun("any")
        if modifier == "pp":
            s.words.extend(r.choice(PREPS).split())
            self.np(s, a_noun, a_plural, adj_p=0.15)
        elif modifier == "rc_subj":  # "the dog that chases the cats ..." (the head agrees inside)
            s.words.append("who" if noun in PEOPLE and r.random() < 0.5 else "that")
            self.verb(s, r.choice(TRANSITIVE), plural, r.choice(["present", "past"]))
            self.np(s, a_noun, a_plural, adj_p=0.15)
        elif modifier == "rc_obj":  # "the dog that the cats chase ..." (the attractor agrees)
            s.words.append("that")
            self.np(s, self.noun("animate"), a_plural, adj_p=0.15)
            self.verb(s, r.choice(TRANSITIVE), a_plural, r.choice(["present", "past"]))
        else:
            raise ValueError(f"unknown modifier {modifier!r}")
        return _Subject(noun, plural, attractor_opposite=opposite)

    def verb(self, s: Sentence, verb: tuple[str, str, str] | None, plural: bool, tense: str,
             distractor: bool = False) -> None:
        """A finite verb (or copula when verb is None) agreeing with a subject of that number."""
        if verb is None:
            word, bad = COPULA[(tense, plural)], COPULA[(tense, not plural)]
        elif tense == "past":
            s.words.append(verb[2])
            return
        else:
            word, bad = (verb[0], verb[1]) if plural else (verb[1], verb[0])
        s.words.append(word)
        s.sites.append(Site("subject_verb", len(s.words) - 1, bad, distractor))

    def predicate(self, s: Sentence, subj: _Subject, tense: str, *, reflexive: bool = False,
                  adverb_p: float = 0.15) -> None:
        """Verb phrase agreeing with `subj`: intransitive, copula + adjective, or transitive."""
        r = self.rng
        animate = subj.noun not in THINGS
        distractor = subj.attractor_opposite
        if tense == "present" and r.random() < adverb_p:
            s.words.append(r.choice(ADVERBS))
        if reflexive:
            self.verb(s, r.choice(TRANSITIVE), subj.plural, tense, distractor)
            word = "themselves" if subj.plural else REFLEXIVE[subj.noun[2]]
            if subj.plural:
                bad = r.choice(["himself", "herself"]) if subj.noun[2] != "n" else "itself"
            elif subj.noun[2] == "n" or r.random() < 0.5:
                bad = "themselves"
            else:
                bad = "herself" if subj.noun[2] == "m" else "himself"
            s.words.append(word)
            s.sites.append(Site("anaphor", len(s.words) - 1, bad, distractor))
            return
        kind = r.choices(["intrans", "copula", "trans"], [0.35, 0.3, 0.35] if animate
                         else [0.5, 0.5, 0.0])[0]
        if kind == "copula":
            self.verb(s, None, subj.plural, tense, distractor)
            s.words.append(r.choice(ADJECTIVES))
        elif kind == "intrans":
            self.verb(s, r.choice(INTRANS_ANIMATE if animate else INTRANS_THING), subj.plural,
                      tense, distractor)
            if r.random() < 0.3:
                s.words.append(r.choice(PLACE_PREPS))
                self.np(s, self.noun("thing"), r.random() < 0.3, adj_p=0.2)
        else:
            self.verb(s, r.choice(TRANSITIVE), subj.plural, tense, distractor)
            self.np(s, self.noun("any"), r.random() < 0.5)
        if r.random() < 0.1:
            s.words.extend(r.choice(TIME[tense]).split())

    def sentence(self, family: str, *, tense: str | None = None) -> Sentence:
        """One sentence of a family: simple, attractor, relative, reflexive or narrative."""
        r = self.rng
        s = Sentence()
        tense = tense or ("present" if r.random() < 0.65 else "past")
        if family == "simple":
            if r.random() < 0.1:  # conjoined subject: always plural
                self.np(s, self.noun("animate"), r.random() < 0.5, record=False)
                s.words.append("and")
                self.np(s, self.noun("animate"), r.random() < 0.5, record=False)
                self.predicate(s, _Subject(ANIMALS[0], True), tense)
            else:
                subj = self.subject(s, r.choice(["animate", "animate", "thing"]), None)
                self.predicate(s, subj, tense, adverb_p=0.3)
        elif family in ("attractor", "relative"):
            modifier = "pp" if family == "attractor" else r.choice(["rc_subj", "rc_obj"])
            cls = r.choice(["animate", "animate", "thing"]) if family == "attractor" else "animate"
            subj = self.subject(s, cls, modifier)
            self.predicate(s, subj, tense)
        elif family == "reflexive":
            cls = "gendered" if r.random() < 0.75 else "animal"
            modifier = r.choice([None, None, "pp", "rc_subj"])
            subj = self.subject(s, cls, modifier, name_p=0.25)
            self.predicate(s, subj, tense, reflexive=True)
        elif family == "narrative":  # past-tense scene setting with locations and time
            subj = self.subject(s, "animate", None, name_p=0.3)
            self.verb(s, r.choice(INTRANS_ANIMATE), subj.plural, "past")
            s.words.append(r.choice(PLACE_PREPS))
            self.np(s, self.noun("thing"), r.random() < 0.3)
            if r.random() < 0.5:
                s.words.extend(r.choice(TIME["past"]).split())
        else:
            raise ValueError(f"unknown sentence family {family!r}; expected one of "
                             f"{sorted(_MIX)}")
        s.words.append(".")
        return s

    def document(self, families: dict[str, float]) -> str:
        """3-8 sentences drawn from the weighted families, sharing one cast of characters."""
        r = self.rng
        self.new_cast()
        names, weights = list(families), list(families.values())
        n = r.randint(3, 8)
        return " ".join(self.sentence(f).text() for f in r.choices(names, weights, k=n))


# ---------------------------------------------------------------------------- public API
def generate_corpus(n_documents: int = 20_000, seed: int = 0) -> list[str]:
    """Training documents: sentences mixed over all families (simple 30 %, attractor 25 %,
    relative 20 %, reflexive 15 %, narrative 10 %), 3-8 sentences each."""
    if n_documents < 0:
        raise ValueError(f"n_documents must be >= 0, got {n_documents}")
    g = _Grammar(random.Random(seed))
    return [g.document(_MIX) for _ in range(n_documents)]


def heldout_domains(n_documents: int = 500, seed: int = 10_000) -> dict[str, list[str]]:
    """Perplexity domains: `n_documents` documents PER domain, one domain per sentence family
    ("simple", "attractor", "relative", "reflexive") plus "mixed" (the training mixture).

    Disjoint from training by seed (the default seed differs from generate_corpus's); with
    3-8 sentences per document, whole-document collisions with the default training corpus do
    not occur (tested), although short single sentences naturally recur.
    """
    if n_documents < 0:
        raise ValueError(f"n_documents must be >= 0, got {n_documents}")
    g = _Grammar(random.Random(seed))
    domains = {fam: [g.document({fam: 1.0}) for _ in range(n_documents)] for fam in FAMILIES}
    domains["mixed"] = [g.document(_MIX) for _ in range(n_documents)]
    return domains


def _pair_sentence(g: _Grammar, uid: str) -> tuple[Sentence, Site]:
    """A sentence built for `uid` and the agreement site to corrupt."""
    r = g.rng
    if uid == "grammar_determiner_noun_agreement":
        s = Sentence()  # past tense subject + object NP with a number-marked determiner
        subj = g.subject(s, "animate", None)
        g.verb(s, r.choice(TRANSITIVE), subj.plural, "past")
        s.sites.clear()
        noun, plural = g.noun("any"), r.random() < 0.5
        while True:
            start = len(s.words)
            g.np(s, noun, plural, adj_p=0.3)
            if s.sites:
                break
            del s.words[start:]
        s.words.append(".")
        return s, s.sites[-1]
    if uid == "grammar_subject_verb_agreement":
        s = Sentence()
        subj = g.subject(s, r.choice(["animate", "animate", "thing"]), None)
        g.predicate(s, subj, "present", adverb_p=0.3)
        s.words.append(".")
    elif uid == "grammar_subject_verb_agreement_distractor":
        s = Sentence()
        subj = g.subject(s, r.choice(["animate", "animate", "thing"]),
                         r.choice(["pp", "pp", "rc_subj", "rc_obj"]), opposite=True)
        g.predicate(s, subj, "present")
        s.words.append(".")
    elif uid == "grammar_anaphor_agreement":
        s = Sentence()
        cls = "gendered" if r.random() < 0.8 else "animal"
        subj = g.subject(s, cls, r.choice([None, None, "pp"]), name_p=0.25)
        g.predicate(s, subj, "past", reflexive=True)
        s.words.append(".")
        return s, s.sites[-1]
    else:
        raise ValueError(f"unknown grammar UID {uid!r}; expected one of {sorted(UIDS)}")
    # the main verb's site is the last subject-verb site (a relative clause's comes first)
    site = [x for x in s.sites if x.kind == "subject_verb"][-1]
    return s, site


def minimal_pairs(n_per_uid: int = 100, seed: int = 20_000) -> list[dict]:
    """BLiMP-format records (sentence_good, sentence_bad, field, linguistics_term, UID, pairID)
    for the grammar's four UIDs; good and bad differ in exactly the agreeing word.

    UIDs: grammar_determiner_noun_agreement (object NP, the noun's number flipped),
    grammar_subject_verb_agreement (no intervening noun), grammar_subject_verb_agreement_distractor
    (a PP or relative clause with an attractor of the other number between subject and verb),
    grammar_anaphor_agreement (reflexive of the wrong gender or number; past tense so that
    only the reflexive agrees). Good sentences within a UID are distinct.
    """
    if n_per_uid < 0:
        raise ValueError(f"n_per_uid must be >= 0, got {n_per_uid}")
    g = _Grammar(random.Random(seed))
    records: list[dict] = []
    for uid, (fld, term) in UIDS.items():
        seen: set[str] = set()
        attempts = 0
        while len(seen) < n_per_uid:
            attempts += 1
            if attempts > 50 * n_per_uid + 1000:
                raise RuntimeError(f"{uid}: could not generate {n_per_uid} distinct pairs")
            g.new_cast()
            s, site = _pair_sentence(g, uid)
            good = s.text()
            if good in seen:
                continue
            bad_words = list(s.words)
            bad_words[site.index] = site.bad
            records.append({"sentence_good": good, "sentence_bad": " ".join(bad_words),
                            "field": fld, "linguistics_term": term, "UID": uid,
                            "pairID": str(len(seen))})
            seen.add(good)
    return records
