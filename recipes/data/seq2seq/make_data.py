"""Write the seq2seq example dataset: numbers written in English words -> digits.

A source -> target mapping with one right answer, so BLEU, ROUGE and exact match all mean something, and
a small T5 learns it in a few hundred steps. Format prompt_completion: the prompt is the encoder's source,
the completion the decoder's target. Deterministic: rerun to rebuild.

    python recipes/data/seq2seq/make_data.py [OUT_DIR]
"""

import json
import random
import sys
from pathlib import Path

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + words(rest))
    rest = n % 1000
    tail = "" if rest == 0 else (" and " if rest < 100 else " ") + words(rest)
    return words(n // 1000) + " thousand" + tail


def rows(numbers: list[int]) -> list[dict[str, str]]:
    return [{"prompt": f"Write as digits: {words(n)}", "completion": str(n)} for n in numbers]


def main(out: Path) -> None:
    rng = random.Random(0)
    # Every magnitude, so "seven" and "seventy thousand and seven" are both seen.
    numbers = rng.sample(range(1, 100), 45) + rng.sample(range(100, 1000), 90) + rng.sample(range(1000, 100_000), 225)
    rng.shuffle(numbers)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", numbers[:320]), ("eval", numbers[320:])):
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows(part))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
