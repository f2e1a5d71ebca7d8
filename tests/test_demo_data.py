"""tools/demo_data.py: the grammar behind the demo pair's data, checked rule by rule on sentences whose German
follows from the rules of German grammar (written out here by hand, not produced by the generator)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from tools import demo_data
from tools.demo_data import (
    ADVERB_LIST,
    NOUN_LIST,
    PREPOSITION_LIST,
    SAYING_LIST,
    VERB_LIST,
    Clause,
    Phrase,
    PrepPhrase,
    translate,
)
from tools.demo_lexicon import ADJECTIVES, table


def noun(english, determiner="the", adjective=None, plural=False, number=None):
    found = next(n for n in NOUN_LIST if n.en == english)
    adjective = next(tuple(a) for a in table(ADJECTIVES) if a[0] == adjective) if adjective else None
    return Phrase(found, determiner, adjective, plural, number)


def verb(english):
    return next(v for v in VERB_LIST if v.en[0] == english)


def adverb(english):
    return next(a for a in ADVERB_LIST if a[0] == english)


def place(preposition, phrase):
    return PrepPhrase(next(p for p in PREPOSITION_LIST if p[0] == preposition), phrase)


def check(structure, english, german):
    assert translate(structure) == (english, german)


def test_the_seed_sentence():
    check(
        Clause(noun("house"), predicate=("wonderful", "wunderbar")),
        "The house is wonderful.",
        "Das Haus ist wunderbar.",
    )


def test_gender_and_case_of_articles():
    check(Clause(noun("man"), verb("see"), (noun("dog"),)), "The man sees the dog.", "Der Mann sieht den Hund.")
    check(Clause(noun("woman"), verb("see"), (noun("cat"),)), "The woman sees the cat.", "Die Frau sieht die Katze.")
    # helfen takes a dative object; geben a dative and an accusative one
    check(Clause(noun("child"), verb("help"), (noun("man"),)), "The child helps the man.", "Das Kind hilft dem Mann.")
    check(
        Clause(noun("woman"), verb("give"), (noun("child"), noun("ball", "a"))),
        "The woman gives the child a ball.",
        "Die Frau gibt dem Kind einen Ball.",
    )
    check(
        Clause(noun("dog", "my"), verb("see"), (noun("cat", "this"),)),
        "My dog sees this cat.",
        "Mein Hund sieht diese Katze.",
    )


def test_adjective_endings_weak_mixed_strong():
    # weak after der/die/das, mixed after ein, strong with no article
    check(
        Clause(noun("dog", "the", "big"), verb("see"), (noun("cat", "a", "small"),)),
        "The big dog sees a small cat.",
        "Der große Hund sieht eine kleine Katze.",
    )
    check(
        Clause(noun("dog", "a", "big"), verb("see"), (noun("horse", "a", "old"),)),
        "A big dog sees an old horse.",
        "Ein großer Hund sieht ein altes Pferd.",
    )
    check(
        Clause(noun("man"), verb("give"), (noun("woman", "the", "old"), noun("ball", "a", "red"))),
        "The man gives the old woman a red ball.",
        "Der Mann gibt der alten Frau einen roten Ball.",
    )
    check(Clause(noun("dog", "", "big", plural=True), verb("sleep")), "Big dogs sleep.", "Große Hunde schlafen.")
    # an adjective ending in -e takes the ending's e only once
    check(
        Clause(noun("man", "a", "tired"), verb("see"), (noun("key", "the", "tired"),)),
        "A tired man sees the tired key.",
        "Ein müder Mann sieht den müden Schlüssel.",
    )
    check(
        Clause(noun("man", "my"), verb("help"), (noun("child", "this", "small", plural=True),)),
        "My man helps these small children.",
        "Mein Mann hilft diesen kleinen Kindern.",
    )


def test_verb_second_after_a_fronted_adverb():
    check(
        Clause(noun("man"), verb("see"), (noun("dog"),), adverb=adverb("today"), fronted=True),
        "Today the man sees the dog.",
        "Heute sieht der Mann den Hund.",
    )
    check(
        Clause(noun("man"), verb("see"), (noun("dog"),), tense="past", adverb=adverb("yesterday"), fronted=True),
        "Yesterday the man saw the dog.",
        "Gestern hat der Mann den Hund gesehen.",
    )


def test_verb_last_in_subordinate_clauses():
    laughs, plays = Clause(noun("child"), verb("laugh")), Clause(noun("dog"), verb("play"))
    check(
        ("because", laughs, plays, "because"),
        "The child laughs because the dog plays.",
        "Das Kind lacht, weil der Hund spielt.",
    )
    seen = Clause(noun("man"), verb("see"), (noun("dog"),), tense="perfect")
    says = next(entry for entry in SAYING_LIST if entry[0] == "say")
    check(
        ("that", Phrase(name="Anna"), seen, says),
        "Anna says that the man has seen the dog.",
        "Anna sagt, dass der Mann den Hund gesehen hat.",
    )
    knows = next(entry for entry in SAYING_LIST if entry[0] == "know")
    sleeps = Clause(noun("cat"), verb("sleep"), negated=True)
    check(
        ("that", Phrase(pronoun="I"), sleeps, knows),
        "I know that the cat does not sleep.",
        "Ich weiß, dass die Katze nicht schläft.",
    )


def test_perfect_with_the_participle_last_and_sein_for_motion():
    check(
        Clause(noun("man"), verb("see"), (noun("dog"),), tense="perfect"),
        "The man has seen the dog.",
        "Der Mann hat den Hund gesehen.",
    )
    check(
        Clause(noun("dog"), verb("go"), place=place("to", noun("house")), tense="past"),
        "The dog went to the house.",
        "Der Hund ist zum Haus gegangen.",
    )
    check(Clause(Phrase(pronoun="we"), verb("sleep"), tense="perfect"), "We have slept.", "Wir haben geschlafen.")


def test_future_with_the_infinitive_last():
    check(
        Clause(noun("man"), verb("see"), (noun("dog"),), tense="future"),
        "The man will see the dog.",
        "Der Mann wird den Hund sehen.",
    )
    check(Clause(Phrase(pronoun="you"), verb("sleep"), tense="future"), "You will sleep.", "Du wirst schlafen.")


def test_questions():
    check(Clause(noun("dog"), verb("sleep"), asked="yes"), "Does the dog sleep?", "Schläft der Hund?")
    check(Clause(noun("cat"), asked="where"), "Where is the cat?", "Wo ist die Katze?")
    check(
        Clause(noun("man"), verb("see"), (noun("dog"),), asked="what"), "What does the man see?", "Was sieht der Mann?"
    )
    check(
        Clause(Phrase(name="Tom"), verb("see"), (noun("dog"),), asked="who"), "Who sees the dog?", "Wer sieht den Hund?"
    )
    check(
        Clause(noun("man"), verb("see"), (noun("dog"),), tense="past", asked="yes"),
        "Did the man see the dog?",
        "Hat der Mann den Hund gesehen?",
    )
    check(Clause(Phrase(pronoun="you"), verb("sleep"), asked="why"), "Why do you sleep?", "Warum schläfst du?")


def test_negation_nicht_and_kein():
    check(
        Clause(noun("man"), verb("see"), (noun("dog"),), negated=True),
        "The man does not see the dog.",
        "Der Mann sieht den Hund nicht.",
    )
    check(
        Clause(noun("man"), verb("see"), (noun("dog", "a"),), negated=True),
        "The man does not see a dog.",
        "Der Mann sieht keinen Hund.",
    )
    check(
        Clause(noun("man"), verb("buy"), (noun("apple", "", plural=True),), negated=True),
        "The man does not buy apples.",
        "Der Mann kauft keine Äpfel.",
    )
    check(
        Clause(noun("house"), predicate=("big", "groß"), negated=True),
        "The house is not big.",
        "Das Haus ist nicht groß.",
    )
    check(
        Clause(noun("man"), verb("see"), (Phrase(pronoun="he"),), tense="perfect", negated=True),
        "The man has not seen him.",
        "Der Mann hat ihn nicht gesehen.",
    )


def test_plurals_and_dative_plural():
    check(
        Clause(noun("dog", plural=True), verb("sleep"), place=place("in", noun("garden", plural=True))),
        "The dogs sleep in the gardens.",
        "Die Hunde schlafen in den Gärten.",
    )
    check(
        Clause(noun("child", plural=True), verb("help"), (noun("man", plural=True),)),
        "The children help the men.",
        "Die Kinder helfen den Männern.",
    )


def test_contractions_of_preposition_and_article():
    check(
        Clause(noun("dog"), verb("sleep"), place=place("in", noun("house"))),
        "The dog sleeps in the house.",
        "Der Hund schläft im Haus.",
    )
    check(
        Clause(noun("girl"), verb("go"), place=place("to", noun("school"))),
        "The girl goes to the school.",
        "Das Mädchen geht zur Schule.",
    )
    check(
        Clause(noun("girl"), verb("come"), place=place("from", noun("park"))),
        "The girl comes from the park.",
        "Das Mädchen kommt vom Park.",
    )
    # no contraction with another determiner
    check(
        Clause(noun("dog"), verb("sleep"), place=place("in", noun("house", "a"))),
        "The dog sleeps in a house.",
        "Der Hund schläft in einem Haus.",
    )


def test_names_and_numbers_are_copied_through():
    check(
        Clause(Phrase(name="Anna"), verb("see"), (noun("dog", "", number=17, plural=True),)),
        "Anna sees 17 dogs.",
        "Anna sieht 17 Hunde.",
    )
    for example in demo_data.sample(300, seed=11):
        english = example["prompt"].removeprefix(demo_data.PREFIX)
        copied = [
            word.strip(".,?") for word in english.split() if word.strip(".,?").isdigit() or word in demo_data.NAMES
        ]
        german = example["reference"].replace(",", " ").replace(".", " ").replace("?", " ").split()
        assert all(word in german for word in copied), example


def test_pronouns_and_conjugation():
    check(Clause(Phrase(pronoun="I"), predicate=("tired", "müde")), "I am tired.", "Ich bin müde.")
    check(Clause(Phrase(pronoun="you"), verb("see"), (Phrase(pronoun="he"),)), "You see him.", "Du siehst ihn.")
    check(Clause(Phrase(pronoun="she"), verb("read"), (noun("book"),)), "She reads the book.", "Sie liest das Buch.")
    check(Clause(Phrase(pronoun="they"), verb("help"), (Phrase(pronoun="we"),)), "They help us.", "Sie helfen uns.")


def test_sampling_is_seeded_and_held_out_sentences_never_reach_training():
    assert demo_data.sample(50, seed=3) == demo_data.sample(50, seed=3)
    assert demo_data.sample(50, seed=3) != demo_data.sample(50, seed=4)
    test = demo_data.sample(40, seed=5, split="test")
    train = demo_data.sample(400, seed=5, split="train")
    assert all(demo_data.is_held_out(e["prompt"].removeprefix(demo_data.PREFIX)) for e in test)
    assert not any(demo_data.is_held_out(e["prompt"].removeprefix(demo_data.PREFIX)) for e in train)
    # about one sentence in twenty is held out
    everything = demo_data.sample(2000, seed=6)
    share = sum(demo_data.is_held_out(e["prompt"].removeprefix(demo_data.PREFIX)) for e in everything) / 2000
    assert 0.03 < share < 0.07


def test_command_prints_json_lines():
    script = [sys.executable, "-m", "tools.demo_data"]
    result = subprocess.run([*script, "--sample", "3", "--seed", "5"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == demo_data.sample(3, seed=5)
    assert all(line["prompt"].startswith("translate English to German: ") and line["reference"] for line in lines)
    counted = subprocess.run([*script, "--count"], cwd=ROOT, capture_output=True, text=True)
    assert counted.returncode == 0 and "sentences" in counted.stdout


@pytest.mark.parametrize("seed", [0, 1])
def test_every_sentence_is_well_formed(seed):
    for example in demo_data.sample(500, seed=seed):
        english, german = example["prompt"].removeprefix(demo_data.PREFIX), example["reference"]
        assert not english[0].islower() and not german[0].islower(), example
        assert english[-1] == german[-1] and english[-1] in ".?", example
        assert "  " not in english + german and " ," not in english + german, example
