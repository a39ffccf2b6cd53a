"""Write the quickstart dataset: dates in assorted human formats -> ISO 8601 (YYYY-MM-DD).

A small instruct model answers these with prose or wrong numbers; a few dozen LoRA steps teach it the
format and the month table, so exact match rises and perplexity falls. Deterministic: rerun to rebuild.

It also writes preference pairs for the same prompts (pref_train.jsonl, pref_eval.jsonl): chosen is the
correct ISO date, rejected a plausible wrong one (day and month swapped, a day off, a year off, or the
date echoed in its input format), for the dpo / orpo / simpo / kto / reward-model recipes.

    python recipes/data/quickstart/make_data.py [OUT_DIR]
"""

import calendar
import datetime
import json
import random
import sys
from pathlib import Path

FORMATS = [
    lambda d: f"{calendar.month_name[d.month]} {d.day}, {d.year}",
    lambda d: f"{d.day} {calendar.month_name[d.month]} {d.year}",
    lambda d: f"{calendar.month_abbr[d.month]} {d.day} {d.year}",
    lambda d: f"{d.day} {calendar.month_abbr[d.month]}. {d.year}",
    lambda d: f"the {d.day}{_suffix(d.day)} of {calendar.month_name[d.month]}, {d.year}",
    lambda d: f"{calendar.month_name[d.month]} {d.day}{_suffix(d.day)} {d.year}",
]


def _suffix(day: int) -> str:
    if 11 <= day <= 13:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def make_rows(n: int, rng: random.Random) -> list[dict]:
    start = datetime.date(1950, 1, 1).toordinal()
    end = datetime.date(2049, 12, 31).toordinal()
    rows = []
    for _ in range(n):
        day = datetime.date.fromordinal(rng.randint(start, end))
        text = rng.choice(FORMATS)(day)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Write this date in ISO format (YYYY-MM-DD): {text}"},
                    {"role": "assistant", "content": day.isoformat()},
                ]
            }
        )
    return rows


def wrong_date(day: datetime.date, text: str, rng: random.Random) -> str:
    """A mistake a model makes on this task: never the right answer."""
    mistakes = [
        lambda: (day + datetime.timedelta(days=rng.choice([-1, 1]))).isoformat(),
        lambda: f"{day.year + rng.choice([-1, 1])}{day.isoformat()[4:]}",
        lambda: f"{day.year}-{day.day:02d}-{day.month:02d}" if day.day != day.month and day.day <= 12 else "",
        lambda: text,
    ]
    while True:
        answer = rng.choice(mistakes)()
        if answer and answer != day.isoformat():
            return answer


def preference_rows(rows: list[dict], rng: random.Random) -> list[dict]:
    pairs = []
    for row in rows:
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        text = prompt.split(": ", 1)[1]
        rejected = wrong_date(datetime.date.fromisoformat(answer), text, rng)
        pairs.append({"prompt": prompt, "chosen": answer, "rejected": rejected})
    return pairs


def main(out: Path) -> None:
    rng = random.Random(1234)
    # A separate generator for the pairs, so adding them left the SFT files byte for byte as they were.
    pair_rng = random.Random(4321)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 480), ("eval", 64)):
        rows = make_rows(n, rng)
        for prefix, written in (("", rows), ("pref_", preference_rows(rows, pair_rng))):
            lines = [json.dumps(row) for row in written]
            (out / f"{prefix}{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
