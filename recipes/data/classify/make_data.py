"""Write the sentiment dataset: short reviews of films, books, meals and gadgets, labelled negative or positive.

Each review joins an opening, one or two judgements and a closing; the judgements carry the sentiment,
some through negation ("not worth it", "never boring"), so a model has to read more than one word.
The text is generated here, so it is free to use. Deterministic: rerun to rebuild.

    python recipes/data/classify/make_data.py [OUT_DIR]
"""

import json
import random
import sys
from pathlib import Path

SUBJECTS = {
    "film": ["the film", "this movie", "the sequel", "the documentary"],
    "book": ["the novel", "this book", "the memoir", "the short story collection"],
    "meal": ["the pasta", "dinner here", "the tasting menu", "the soup"],
    "gadget": ["the phone", "this blender", "the headphones", "the new laptop"],
}
OPENINGS = [
    "I tried {s} last week.",
    "We finally got around to {s}.",
    "A friend recommended {s}.",
    "{S} arrived on time.",
]
POSITIVE = [
    "{S} was a delight from start to finish.",
    "{S} is never boring.",
    "I would happily pay for {s} again.",
    "{S} exceeded every expectation I had.",
    "Honestly, {s} is worth every penny.",
    "{S} left me smiling for days.",
    "There is nothing I would change about {s}.",
    "{S} works beautifully.",
]
NEGATIVE = [
    "{S} was a chore from start to finish.",
    "{S} is not worth it.",
    "I would never pay for {s} again.",
    "{S} fell short of every expectation I had.",
    "Honestly, {s} is a waste of money.",
    "{S} left me annoyed for days.",
    "There is little I would keep about {s}.",
    "{S} barely works.",
]
CLOSINGS = ["", "Would recommend.", "Make of that what you will.", "That is all.", "Five stars from my sister, though."]


def review(label: str, rng: random.Random) -> str:
    s = rng.choice(SUBJECTS[rng.choice(list(SUBJECTS))])
    pool = POSITIVE if label == "positive" else NEGATIVE
    parts = [rng.choice(OPENINGS), *rng.sample(pool, rng.randint(1, 2)), rng.choice(CLOSINGS)]
    text = " ".join(p for p in parts if p)
    return text.replace("{S}", s[0].upper() + s[1:]).replace("{s}", s)


def main(out: Path) -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(400):
        label = ["negative", "positive"][rng.random() < 0.5]
        rows.append({"text": review(label, rng), "label": label})
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", rows[:320]), ("eval.jsonl", rows[320:])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
