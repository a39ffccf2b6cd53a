"""Write the language-modelling corpus: a ship's log of an imaginary voyage, one entry per paragraph.

The entries share a fixed style and vocabulary (dates, winds, distances, landmarks), so continued
pretraining on them makes held-out entries more predictable: perplexity falls. The text is generated
here, so it is free to use. Deterministic: rerun to rebuild.

    python recipes/data/lm/make_data.py [OUT_DIR]
"""

import random
import sys
from pathlib import Path

WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
SKIES = ["a clear sky", "low grey cloud", "a thin haze", "squalls of rain", "fog until noon", "a bright moon"]
PLACES = ["Kestrel Point", "the Otter Rocks", "Gannet Island", "Saltmarsh Bay", "the Lantern Reef", "Port Ellery"]
EVENTS = [
    "The cook caught {n} mackerel over the stern.",
    "We sighted {n} sails to windward and kept our course.",
    "A seam in the forward hold was caulked; {n} buckets of water were bailed.",
    "The bosun repaired the main sheet and spliced {n} fathoms of new line.",
    "Porpoises ran beside the bow for {n} minutes.",
    "The glass fell {n} tenths before evening, and we reefed the topsail.",
]


def entry(day: int, rng: random.Random) -> str:
    wind, force = rng.choice(WINDS), rng.randint(2, 7)
    miles, place = rng.randint(12, 90), rng.choice(PLACES)
    anchor = rng.choice([f"anchored off {place}", f"stood off {place} through the night", f"passed {place} at dusk"])
    event = rng.choice(EVENTS).format(n=rng.randint(2, 12))
    return (
        f"Day {day}. Wind from the {wind}, force {force}, with {rng.choice(SKIES)}. "
        f"We sailed {miles} miles and {anchor}. {event}"
    )


def main(out: Path) -> None:
    rng = random.Random(0)
    days = [entry(day, rng) for day in range(1, 341)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n\n".join(days[:300]) + "\n", encoding="utf-8")
    (out / "eval.txt").write_text("\n\n".join(days[300:]) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
