"""Write the quickstart dataset: dates in assorted human formats -> ISO 8601 (YYYY-MM-DD).

A small instruct model answers these with prose or wrong numbers; a few dozen LoRA steps teach it the
format and the month table, so exact match rises and perplexity falls. Deterministic: rerun to rebuild.

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


def main(out: Path) -> None:
    rng = random.Random(1234)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 480), ("eval", 64)):
        lines = [json.dumps(row) for row in make_rows(n, rng)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
