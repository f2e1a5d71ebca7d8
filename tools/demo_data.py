"""English sentences and their German translations, generated together from one structure: the demo pair's data.

    python -m tools.demo_data --sample 5 --seed 1        # five JSON lines {"prompt": ..., "reference": ...}
    python -m tools.demo_data --count                    # how many sentences the grammar can make

A sentence is drawn as a structure (who does what to whom, tense, negation, question, clauses) and then written out
in each language by its own rules. German differs where a small model has to learn it: gender and case of articles
and adjective endings, dative objects and prepositions (with contractions: `im`, `zum`, `vom`), the verb second after
a fronted adverb, the verb last in `weil`/`dass`/`obwohl` clauses, the perfect with its participle at the end (and
`sein` for verbs of motion), `werden` with the infinitive at the end, questions by inversion, `nicht` placed after
the objects or `kein` for an indefinite object, and plurals. Names and numbers are copied through.

A sentence is held out (never trained on) when a hash of its English says so: `is_held_out`.
"""

import argparse
import json
import random
import zlib
from dataclasses import dataclass, replace

from tools.demo_lexicon import ADJECTIVES, ADVERBS, NAMES, NOUNS, PREPOSITIONS, SAYING_VERBS, VERBS, table

PREFIX = "translate English to German: "
HELD_OUT_EVERY = 20  # one English sentence in twenty

PERSONS = ["1s", "2s", "3s", "1p", "3p"]  # ich, du, er/sie, wir, sie: the forms a German verb has here
PRONOUNS = {  # English subject, object | German nominative, accusative, dative | person
    "I": ("I", "me", "ich", "mich", "mir", "1s"),
    "you": ("you", "you", "du", "dich", "dir", "2s"),
    "he": ("he", "him", "er", "ihn", "ihm", "3s"),
    "she": ("she", "her", "sie", "sie", "ihr", "3s"),
    "we": ("we", "us", "wir", "uns", "uns", "1p"),
    "they": ("they", "them", "sie", "sie", "ihnen", "3p"),
}
DEFINITE = {"nom": dict(m="der", f="die", n="das", pl="die"), "acc": dict(m="den", f="die", n="das", pl="die"),
            "dat": dict(m="dem", f="der", n="dem", pl="den")}  # fmt: skip
DER_ENDINGS = {"nom": dict(m="er", f="e", n="es", pl="e"), "acc": dict(m="en", f="e", n="es", pl="e"),
               "dat": dict(m="em", f="er", n="em", pl="en")}  # fmt: skip
EIN_ENDINGS = {"nom": dict(m="", f="e", n="", pl="e"), "acc": dict(m="en", f="e", n="", pl="e"),
               "dat": dict(m="em", f="er", n="em", pl="en")}  # fmt: skip
# English determiner -> (German stem, declension): `der` words take DER_ENDINGS (weak adjectives after them), `ein`
# words EIN_ENDINGS (mixed adjectives); none (a bare plural or a number) leaves the adjective strong.
DETERMINERS = {
    "the": ("d", "der"), "this": ("dies", "der"), "a": ("ein", "ein"), "my": ("mein", "ein"),
    "your": ("dein", "ein"), "his": ("sein", "ein"), "her": ("ihr", "ein"), "our": ("unser", "ein"),
    "their": ("ihr", "ein"), "": ("", None),
}  # fmt: skip
CONTRACTIONS = {("in", "dem"): "im", ("zu", "dem"): "zum", ("zu", "der"): "zur", ("von", "dem"): "vom"}
BE = {"present": ["bin", "bist", "ist", "sind", "sind"], "past": ["war", "warst", "war", "waren", "waren"]}
HABEN = ["habe", "hast", "hat", "haben", "haben"]
WERDEN = ["werde", "wirst", "wird", "werden", "werden"]
CONJUNCTIONS = {"because": "weil", "although": "obwohl"}
QUESTION_WORDS = {"where": "wo", "why": "warum", "when": "wann"}


@dataclass(frozen=True)
class Noun:
    en: str
    en_plural: str
    de: str
    de_plural: str
    gender: str
    kinds: frozenset


@dataclass(frozen=True)
class Verb:
    en: tuple  # base, 3rd singular, past, participle
    de: tuple  # ich, du, er, wir, sie
    participle: str
    auxiliary: str  # haben or sein
    infinitive: str
    subjects: frozenset
    objects: tuple  # (case, kinds) per object: (), one accusative or dative, or dative then accusative
    motion: bool


def german_forms(infinitive, du, er):
    stem = infinitive[:-2]
    return (stem + "e", du, er, infinitive, infinitive)


NOUN_LIST = [Noun(*fields[:5], frozenset(fields[5].split())) for fields in table(NOUNS)]
ADJECTIVE_LIST = table(ADJECTIVES)
VERB_LIST = []
for base, third, past, participle, infinitive, du, er, de_participle, auxiliary, subjects, objects, flags in table(
    VERBS
):
    parsed = []
    for part in filter(None, objects.split(";")):
        case, _, kinds = part.strip().rpartition(":")
        parsed.append((case.strip() or "acc", frozenset(kinds.split())))
    VERB_LIST.append(
        Verb(
            (base, third, past, participle), german_forms(infinitive, du, er), de_participle, auxiliary, infinitive,
            frozenset(subjects.split()), tuple(parsed), flags == "motion",
        )
    )  # fmt: skip
SAYING_LIST = table(SAYING_VERBS)
ADVERB_LIST = [(en, de, set(tenses.split()), where) for en, de, tenses, where in table(ADVERBS)]
PREPOSITION_LIST = [(en, de, case, frozenset(kinds.split()), use) for en, de, case, kinds, use in table(PREPOSITIONS)]


@dataclass(frozen=True)
class Phrase:
    """A noun phrase: a noun with determiner, adjective and number, a name, or a pronoun."""

    noun: Noun | None = None
    determiner: str = "the"  # a key of DETERMINERS; "" for a bare plural or a number
    adjective: tuple | None = None  # (English, German stem)
    plural: bool = False
    number: int | None = None
    name: str | None = None
    pronoun: str | None = None

    @property
    def person(self):
        if self.pronoun:
            return PRONOUNS[self.pronoun][5]
        return "3p" if self.plural else "3s"

    @property
    def definite(self):
        """Negated with `nicht` after it (a definite phrase) rather than turned into `kein` (an indefinite one)."""
        return self.noun is None or self.determiner not in ("a", "")

    def english(self, role="subject"):
        if self.pronoun:
            return PRONOUNS[self.pronoun][0 if role == "subject" else 1]
        if self.name:
            return self.name
        words = [str(self.number)] if self.number else []
        if self.adjective:
            words.append(self.adjective[0])
        words.append(self.noun.en_plural if self.plural else self.noun.en)
        if self.determiner == "a":
            words.insert(0, "an" if words[0][0] in "aeiou" else "a")
        elif self.determiner:
            words.insert(0, "these" if self.determiner == "this" and self.plural else self.determiner)
        return " ".join(words)

    def german(self, case, negated=False):
        """The phrase in `case`; `negated` turns an indefinite phrase into its `kein` form."""
        if self.pronoun:
            return PRONOUNS[self.pronoun][{"nom": 2, "acc": 3, "dat": 4}[case]]
        if self.name:
            return self.name
        gender = "pl" if self.plural else self.noun.gender
        stem, declension = DETERMINERS[self.determiner]
        if negated and not self.definite:
            stem, declension = "kein", "ein"
        words = []
        if stem == "d":
            words.append(DEFINITE[case][gender])
        elif declension == "der":
            words.append(stem + DER_ENDINGS[case][gender])
        elif declension == "ein":
            words.append(stem + EIN_ENDINGS[case][gender])
        if self.number:
            words.append(str(self.number))
        if self.adjective:
            ending = adjective_ending(declension, case, gender)
            stem = self.adjective[1]
            words.append(stem + (ending[1:] if stem.endswith("e") else ending))  # müde + en -> müden
        noun = self.noun.de_plural if self.plural else self.noun.de
        if self.plural and case == "dat" and not noun.endswith(("n", "s")):
            noun += "n"  # dative plural
        words.append(noun)
        return " ".join(words)


def adjective_ending(declension, case, gender):
    """Weak after a `der` word, mixed after an `ein` word, strong with no article."""
    weak = "en" if gender == "pl" or case == "dat" or (gender == "m" and case == "acc") else "e"
    if declension == "der":
        return weak
    if declension == "ein":
        if gender == "m" and case == "nom":
            return "er"
        return "es" if gender == "n" and case != "dat" else weak
    return DER_ENDINGS[case][gender]


@dataclass(frozen=True)
class PrepPhrase:
    preposition: tuple  # a PREPOSITION_LIST entry
    phrase: Phrase

    def english(self):
        return f"{self.preposition[0]} {self.phrase.english('object')}"

    def german(self):
        _, preposition, case, _, _ = self.preposition
        words = self.phrase.german(case).split(" ", 1)
        contracted = CONTRACTIONS.get((preposition, words[0])) if self.phrase.determiner == "the" else None
        if contracted and len(words) == 2 and self.phrase.noun:
            return f"{contracted} {words[1]}"
        return f"{preposition} {self.phrase.german(case)}"


@dataclass(frozen=True)
class Clause:
    """Who does what: a verb with its objects, or `be` with an adjective or a place (`predicate`)."""

    subject: Phrase
    verb: Verb | None = None  # None: the copula
    objects: tuple = ()  # Phrases, in the order of verb.objects
    predicate: object = None  # copula: an adjective (English, German) or a PrepPhrase
    place: PrepPhrase | None = None
    tense: str = "present"  # present, past, perfect, future
    negated: bool = False
    adverb: tuple | None = None  # an ADVERB_LIST entry
    fronted: bool = False  # a time adverb stands first
    asked: str | None = None  # a question: "yes", where/why/when, "what" (the object), "who" (the subject)

    # English -----------------------------------------------------------------------------------------------------
    def english_words(self):
        """The clause as English words, without final punctuation; a question is inverted."""
        subject = "who" if self.asked == "who" else self.subject.english()
        third = self.subject.person == "3s" or self.asked == "who"
        complement = [] if self.asked == "what" else [o.english("object") for o in self.objects]
        if self.verb is None and self.predicate is not None:
            predicate = self.predicate[0] if isinstance(self.predicate, tuple) else self.predicate.english()
            complement = [predicate]
        if self.place:
            complement.append(self.place.english())
        if self.adverb and self.adverb[3] == "time" and not self.fronted:
            complement.append(self.adverb[0])
        auxiliary, verb = self.english_verb(third)
        often = [self.adverb[0]] if self.adverb and self.adverb[3] == "often" else []
        negation = ["not"] if self.negated else []
        if self.asked and self.asked != "who":
            front = [] if self.asked == "yes" else [self.asked]
            if auxiliary is None:  # do-support
                auxiliary = "did" if self.tense == "past" else "does" if third else "do"
            return front + [auxiliary, subject] + often + negation + verb + complement
        front = [self.adverb[0]] if self.fronted else []
        if auxiliary is None and self.negated:
            auxiliary, verb = ("did" if self.tense == "past" else "does" if third else "do"), [self.verb.en[0]]
        if auxiliary is None:
            return front + [subject] + often + verb + complement
        return front + [subject, auxiliary] + often + negation + verb + complement

    def english_verb(self, third):
        """(auxiliary or None, the rest of the verb as a list of words) in English."""
        person = self.subject.person
        if self.verb is None:
            if self.tense == "future":
                return "will", ["be"]
            if self.tense == "past":
                return ("was" if person in ("1s", "3s") or self.asked == "who" else "were"), []
            return ({"1s": "am"}.get(person, "is" if third else "are")), []
        base, singular, past, participle = self.verb.en
        if self.tense == "future":
            return "will", [base]
        if self.tense == "perfect":
            return ("has" if third else "have"), [participle]
        if self.asked and self.asked != "who":
            return None, [base]
        return None, [past if self.tense == "past" else singular if third else base]

    # German ------------------------------------------------------------------------------------------------------
    def german_parts(self):
        """(subject, finite verb, middle field, end of the clause) in German."""
        subject = "wer" if self.asked == "who" else self.subject.german("nom")
        index = PERSONS.index("3s" if self.asked == "who" else self.subject.person)
        if self.verb is None:
            if self.tense == "future":
                finite, end = WERDEN[index], ["sein"]
            else:
                finite, end = BE["past" if self.tense == "past" else "present"][index], []
        elif self.tense in ("past", "perfect"):
            finite = (HABEN if self.verb.auxiliary == "haben" else BE["present"])[index]
            end = [self.verb.participle]
        elif self.tense == "future":
            finite, end = WERDEN[index], [self.verb.infinitive]
        else:
            finite, end = self.verb.de[index], []
        cases = [case for case, _ in self.verb.objects] if self.verb else []
        objects = [] if self.asked == "what" else list(zip(self.objects, cases))
        pronouns = [o.german(case) for o, case in objects if o.pronoun]
        phrases = [(o, case) for o, case in objects if not o.pronoun]
        negation = []
        if self.negated:
            if phrases and not phrases[-1][0].definite:  # `kein` for an indefinite last object
                phrases[-1] = (phrases[-1][0], phrases[-1][1], True)
            else:
                negation = ["nicht"]
        adverb = [self.adverb[1]] if self.adverb and not self.fronted else []
        middle = pronouns + adverb + [p[0].german(p[1], negated=len(p) == 3) for p in phrases] + negation
        if self.verb is None and self.predicate is not None:
            middle.append(self.predicate[1] if isinstance(self.predicate, tuple) else self.predicate.german())
        if self.place:
            middle.append(self.place.german())
        return subject, finite, middle, end

    def german_main(self):
        """The German main clause (V2; V1 in a yes/no question) as a list of words."""
        subject, finite, middle, end = self.german_parts()
        if self.asked == "who":
            return [subject, finite] + middle + end
        if self.asked == "what":
            return ["was", finite, subject] + middle + end
        if self.asked in QUESTION_WORDS:
            return [QUESTION_WORDS[self.asked], finite, subject] + middle + end
        if self.asked == "yes":
            return [finite, subject] + middle + end
        if self.fronted:
            return [self.adverb[1], finite, subject] + middle + end
        return [subject, finite] + middle + end

    def german_subordinate(self):
        """The German subordinate clause: the finite verb last."""
        subject, finite, middle, end = self.german_parts()
        return [subject] + middle + end + [finite]


def sentence(words, mark="."):
    text = " ".join(words)
    return text[0].upper() + text[1:] + mark


def translate(structure):
    """(English, German) of a sentence structure: a Clause, or (kind, ...) for two clauses."""
    if isinstance(structure, Clause):
        mark = "?" if structure.asked else "."
        return sentence(structure.english_words(), mark), sentence(structure.german_main(), mark)
    kind, first, second, word = structure
    if kind == "and":  # two main clauses: `und` without a comma, `aber` with one
        english = first.english_words() + ([",", word] if word == "but" else [word]) + second.english_words()
        german = first.german_main() + ([",", "aber"] if word == "but" else ["und"]) + second.german_main()
        return sentence(english).replace(" ,", ","), sentence(german).replace(" ,", ",")
    if kind == "because":  # main clause, then `weil`/`obwohl` with the verb last
        english = first.english_words() + [word] + second.english_words()
        german = first.german_main() + [",", CONJUNCTIONS[word]] + second.german_subordinate()
        return sentence(english), sentence(german).replace(" ,", ",")
    # that: a saying verb, then `dass` with the verb last
    base, third, *forms = word
    index = PERSONS.index(first.person)
    english = [first.english(), third if first.person == "3s" else base, "that"] + second.english_words()
    german = [first.german("nom"), forms[min(index, 3)], ",", "dass"] + second.german_subordinate()
    return sentence(english), sentence(german).replace(" ,", ",")


# Drawing structures ----------------------------------------------------------------------------------------------


def nouns_of(kinds):
    return [noun for noun in NOUN_LIST if noun.kinds & kinds]


def draw_phrase(rng, kinds, allow_pronoun=True):
    """A noun phrase whose noun is of one of `kinds` (persons and animals may also be names or pronouns)."""
    animate = kinds & {"person"}
    roll = rng.random()
    if animate and allow_pronoun and roll < 0.15:
        return Phrase(pronoun=rng.choice(list(PRONOUNS)))
    if animate and roll < 0.3:
        return Phrase(name=rng.choice(NAMES))
    noun = rng.choice(nouns_of(kinds))
    adjective = rng.choice(ADJECTIVE_LIST) if rng.random() < 0.35 else None
    if "drink" in noun.kinds:  # uncountable here: no `a`, no plural
        return Phrase(noun, rng.choice(["the", "the", "this", "my", "your", "our"]), adjective)
    roll = rng.random()
    if roll < 0.1:
        return Phrase(noun, "", adjective, plural=True, number=rng.randint(2, 99))
    if roll < 0.2:
        return Phrase(noun, "", adjective, plural=True)
    determiner = rng.choice(["the", "the", "the", "a", "a", "this", "my", "your", "his", "her", "our", "their"])
    return Phrase(noun, determiner, adjective, plural=determiner != "a" and rng.random() < 0.25)


def draw_place(rng, use):
    preposition = rng.choice([p for p in PREPOSITION_LIST if p[4] == use])
    phrase = draw_phrase(rng, preposition[3], allow_pronoun=False)
    return PrepPhrase(preposition, phrase)


def draw_clause(rng, question=False, subordinate=False):
    """A clause with everything drawn: verb or copula, objects, tense, negation, adverb, place."""
    tense = rng.choice(["present", "present", "past", "perfect", "future"])
    asked = None
    if question:
        asked = rng.choice(["yes", "yes", "where", "why", "when", "what", "who"])
    if rng.random() < 0.25 and asked not in ("what",):
        subject = draw_phrase(rng, frozenset({"person", "animal", "thing", "place", "vehicle", "food"}))
        if tense == "perfect":
            tense = "present"
        if asked == "where":  # where is the dog?
            predicate = None
        elif rng.random() < 0.25:
            predicate = draw_place(rng, "place")
        else:
            predicate = tuple(rng.choice(ADJECTIVE_LIST))
        clause = Clause(subject, predicate=predicate, tense=tense, asked=asked)
    else:
        verbs = [v for v in VERB_LIST if v.objects or asked != "what"]
        if asked == "what":
            verbs = [v for v in verbs if len(v.objects) == 1 and v.objects[0][0] == "acc"]
        verb = rng.choice(verbs)
        subject = draw_phrase(rng, verb.subjects)
        objects = tuple(draw_phrase(rng, kinds, allow_pronoun=len(verb.objects) == 1) for _, kinds in verb.objects)
        place = None
        if rng.random() < 0.35 and asked != "where":
            use = rng.choice(["to"] if verb.motion else ["place", "place", "with"] + (["for"] if objects else []))
            place = draw_place(rng, use)
        clause = Clause(subject, verb, objects, place=place, tense=tense, asked=asked)
    if asked == "who" and clause.subject.person != "3s":
        clause = replace(clause, subject=Phrase(name="Anna"))  # only its number matters: `who` is singular
    if rng.random() < 0.2 and asked is None and not any(o.number for o in clause.objects):
        clause = replace(clause, negated=True)  # (`nicht`/`kein` with a number reads badly: not drawn)
    if rng.random() < 0.3 and asked is None:
        adverbs = [a for a in ADVERB_LIST if tense in a[2] and not (a[3] == "often" and (clause.negated))]
        if adverbs:
            adverb = rng.choice(adverbs)
            fronted = adverb[3] == "time" and not subordinate and rng.random() < 0.5
            clause = replace(clause, adverb=adverb, fronted=fronted)
    return clause


def draw_sentence(rng):
    """(English, German) of one drawn sentence."""
    roll = rng.random()
    if roll < 0.45:
        return translate(draw_clause(rng))
    if roll < 0.6:
        return translate(draw_clause(rng, question=True))
    if roll < 0.72:
        return translate(("and", draw_clause(rng, subordinate=True), draw_clause(rng), rng.choice(["and", "but"])))
    if roll < 0.86:
        word = rng.choice(list(CONJUNCTIONS))
        return translate(("because", draw_clause(rng, subordinate=True), draw_clause(rng, subordinate=True), word))
    first = draw_phrase(rng, frozenset({"person"}))
    return translate(("that", first, draw_clause(rng, subordinate=True), rng.choice(SAYING_LIST)))


def is_held_out(english):
    """Whether a sentence belongs to the held-out set: by a hash of its English, the same on every machine."""
    return zlib.crc32(english.encode()) % HELD_OUT_EVERY == 0


def sample(count, seed, split="all"):
    """`count` examples {"prompt", "reference"} drawn with `seed`; `split` keeps only "train" or "test" sentences."""
    rng = random.Random(seed)
    examples = []
    while len(examples) < count:
        english, german = draw_sentence(rng)
        if split == "all" or (split == "test") == is_held_out(english):
            examples.append({"prompt": PREFIX + english, "reference": german})
    return examples


def count_sentences():
    """A lower bound on the number of distinct sentences: single declarative clauses with one accusative object
    (full noun phrases only, no place, adverb or negation), in each tense."""
    # a drink takes 5 determiners, singular; another noun 9 determiners singular, 8 plural, a bare plural, 98 numbers
    phrases_of = {}
    for kinds in {v.subjects for v in VERB_LIST} | {k for v in VERB_LIST for _, k in v.objects}:
        forms = [5 if "drink" in noun.kinds else 9 + 8 + 1 + 98 for noun in nouns_of(kinds)]
        phrases_of[kinds] = sum(forms) * (len(ADJECTIVE_LIST) + 1)
    total = 0
    for verb in VERB_LIST:
        if len(verb.objects) == 1:
            total += phrases_of[verb.subjects] * phrases_of[verb.objects[0][1]] * 4
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=int, default=10, help="How many examples to print, one JSON line each")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random draw")
    parser.add_argument("--split", choices=["all", "train", "test"], default="all", help="Keep only this split")
    parser.add_argument("--count", action="store_true", help="Print the size of the grammar instead")
    args = parser.parse_args()
    if args.count:
        print(f"{len(NOUN_LIST)} nouns, {len(ADJECTIVE_LIST)} adjectives, {len(VERB_LIST) + len(SAYING_LIST)} verbs, "
              f"{len(ADVERB_LIST)} adverbs, {len(PREPOSITION_LIST)} prepositions, {len(NAMES)} names; "
              f"more than {count_sentences():.2e} sentences")  # fmt: skip
        return
    for example in sample(args.sample, args.seed, args.split):
        print(json.dumps(example, ensure_ascii=False))


if __name__ == "__main__":
    main()
