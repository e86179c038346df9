"""Writes the example tasks' data (no hub, no download): shop.csv, arithmetic word problems with a
number answer, and cities.jsonl, sentences from which to extract the city (a short text answer).
Deterministic: `python examples/tasks/make_data.py` rewrites the committed files byte for byte."""

import csv
import json
import random
import sys
from pathlib import Path

NAMES = ["Ana", "Ben", "Carla", "Dev", "Elif", "Femi", "Greta", "Hugo", "Ines", "Jon", "Kira", "Liam", "Maya",
         "Nils", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma"]
ITEMS = ["pen", "apple", "book", "stamp", "cup", "ticket", "candle", "shirt", "plate", "card"]
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Osaka", "Denver", "Cairo", "Porto", "Quito", "Hanoi", "Perth", "Dakar",
          "Seville", "Krakow", "Nairobi", "Boston", "Madrid", "Tunis", "Leeds", "Zagreb"]


def shop_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        kind = i % 3
        if kind == 0:
            count, price = rng.randint(2, 9), rng.randint(2, 12)
            text, answer = f"{name} buys {count} {item}s at {price} dollars each. How many dollars does {name} pay?", count * price
        elif kind == 1:
            have, give = rng.randint(10, 40), rng.randint(1, 9)
            text, answer = f"{name} has {have} {item}s and gives {give} of them away. How many {item}s are left?", have - give
        else:
            have, more = rng.randint(3, 30), rng.randint(2, 20)
            text, answer = f"{name} has {have} {item}s and buys {more} more. How many {item}s does {name} have now?", have + more
        rows.append({"uid": f"shop-{i:04d}", "problem": text, "answer": str(answer)})
    return rows


def city_rows(rng: random.Random, n: int) -> list[dict]:
    forms = ["{name} is flying to {city} next week.", "The conference this year takes place in {city}.",
             "After ten years in {city}, {name} moved back home.", "{name} sent a postcard from {city} to a friend.",
             "Our train to {city} leaves at nine.", "{name} grew up in {city} and still loves its markets."]
    rows, seen = [], set()
    while len(rows) < n:  # distinct sentences: a repeated row would sit in train and test at once
        city = rng.choice(CITIES)
        sentence = rng.choice(forms).format(name=rng.choice(NAMES), city=city)
        if sentence not in seen:
            seen.add(sentence)
            rows.append({"sentence": sentence, "city": city})
    return rows


def main(out: Path) -> None:
    rng = random.Random(0)
    for split, n in (("train", 160), ("test", 40)):
        with open(out / f"shop_{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["uid", "problem", "answer"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(shop_rows(rng, n))
    (out / "cities.jsonl").write_text("".join(json.dumps(r) + "\n" for r in city_rows(random.Random(1), 200)))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
