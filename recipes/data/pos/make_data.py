"""Write the part-of-speech dataset: short English sentences, each word tagged with its Universal POS tag.

Sentences come from a small grammar (pronoun or noun-phrase subjects, present or past verbs, prepositional
phrases, adverbs, "is/was + adjective" clauses, two clauses joined by a conjunction). Several words are
nouns in one sentence and verbs in another ("They book a train." / "The book was old."; watch, train,
plant, park, ship, light, paint, fish), and "light" is an adjective too, so a tagger has to read the context,
not only the word. The text is generated here, so it is free to use. Deterministic: rerun to rebuild.

    python recipes/data/pos/make_data.py [OUT_DIR]
"""

import json
import random
import sys
from pathlib import Path

TAGS = ["DET", "ADJ", "NOUN", "VERB", "ADP", "PRON", "ADV", "AUX", "CCONJ", "PUNCT"]

DETERMINERS = ["the", "a", "this", "that", "every", "my", "her", "our"]
ADJECTIVES = ["old", "small", "red", "quiet", "busy", "bright", "cold", "light", "heavy", "new"]
# Words that are nouns here and verbs below (in their base or past form).
SHARED = ["book", "watch", "train", "plant", "park", "ship", "light", "paint", "fish"]
NOUNS = ["dog", "teacher", "city", "river", "letter", "garden", "car", "window", "room", "tree", *SHARED]
VERBS = ["book", "watch", "train", "plant", "park", "ship", "light", "paint", "visit", "carry", "open", "clean"]
PAST = {"carry": "carried", "ship": "shipped", "plant": "planted", "light": "lit"}
PRONOUNS = ["I", "we", "they", "you"]
PREPOSITIONS = ["in", "near", "under", "with", "behind", "across"]
ADVERBS = ["quickly", "often", "slowly", "today", "again", "carefully"]
CONJUNCTIONS = ["and", "but"]


def past(verb: str) -> str:
    if verb in PAST:
        return PAST[verb]
    return verb + ("d" if verb.endswith("e") else "ed")


def noun_phrase(rng: random.Random) -> list[tuple[str, str]]:
    words = [(rng.choice(DETERMINERS), "DET")]
    if rng.random() < 0.4:
        words.append((rng.choice(ADJECTIVES), "ADJ"))
    return [*words, (rng.choice(NOUNS), "NOUN")]


def clause(rng: random.Random) -> list[tuple[str, str]]:
    kind = rng.random()
    if kind < 0.2:  # the light was bright
        return [*noun_phrase(rng), (rng.choice(["is", "was"]), "AUX"), (rng.choice(ADJECTIVES), "ADJ")]
    if kind < 0.6:  # they book a room (base form after a plural or first/second-person pronoun)
        words = [(rng.choice(PRONOUNS), "PRON"), (rng.choice(VERBS), "VERB")]
    else:  # the teacher painted the old window
        words = [*noun_phrase(rng), (past(rng.choice(VERBS)), "VERB")]
    words += noun_phrase(rng)
    if rng.random() < 0.4:
        words += [(rng.choice(PREPOSITIONS), "ADP"), *noun_phrase(rng)]
    if rng.random() < 0.3:
        words.append((rng.choice(ADVERBS), "ADV"))
    return words


def sentence(rng: random.Random) -> dict[str, list[str]]:
    words = clause(rng)
    if rng.random() < 0.25:
        words += [(",", "PUNCT"), (rng.choice(CONJUNCTIONS), "CCONJ"), *clause(rng)]
    words.append((rng.choice([".", ".", "!"]), "PUNCT"))
    first, tag = words[0]
    words[0] = (first[0].upper() + first[1:], tag)
    return {"tokens": [w for w, _ in words], "tags": [t for _, t in words]}


def main(out: Path) -> None:
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < 500:
        row = sentence(rng)
        key = " ".join(row["tokens"])
        if key not in seen:  # no held-out sentence is also a training sentence
            seen.add(key)
            rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", rows[:400]), ("eval.jsonl", rows[400:])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
