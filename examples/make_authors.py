"""Generate examples/data/authors.jsonl: question-answer facts about fictitious people.

Deterministic (seeded), written by this project, no external data. 60 people x 5 facts = 300 rows.
Run: python examples/make_authors.py [OUT]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

FIRST = ["Ada", "Bram", "Cira", "Dov", "Elin", "Faro", "Gita", "Hugo", "Ines", "Jory", "Kaia", "Lenz",
         "Mira", "Nils", "Oona", "Pax", "Quin", "Rhea", "Sami", "Tova", "Uli", "Vera", "Wim", "Xena",
         "Yusuf", "Zora"]
LAST = ["Abernath", "Brolin", "Castell", "Dunmore", "Ekwall", "Ferrow", "Galen", "Holt", "Ivers",
        "Jarrow", "Kestrel", "Lindqvist", "Morrow", "Nadal", "Orsini", "Pellham", "Quarry", "Rook"]
CITIES = ["Tallinn", "Oporto", "Kyoto", "Valparaiso", "Tromso", "Accra", "Cusco", "Hobart", "Ghent",
          "Split", "Bergen", "Sapporo", "Mombasa", "Galway", "Ljubljana"]
GENRES = ["mystery novels", "science fiction", "poetry", "travel memoirs", "children's books",
          "historical fiction", "essays on gardening", "graphic novels", "maritime thrillers"]
JOBS = ["a lighthouse keeper", "a violin maker", "a geologist", "a baker", "a cartographer",
        "a nurse", "a beekeeper", "a ferry captain", "a librarian", "a glassblower"]
AWARDS = ["the Silver Quill", "the Northern Lantern Prize", "the Meridian Award", "the Blue Heron Medal",
          "the Tidewater Prize", "the Copper Leaf Award"]
TITLES = ["The Salt Archive", "Nine Winters", "A Map of Small Rivers", "The Clockmaker's Ledger",
          "Harbor of Glass", "Under the Orchard", "The Last Signal", "Paper Comets", "Quiet Engines",
          "The Amber Stair", "Letters from the Shoal", "Echo Valley"]


def people(n: int, rng: random.Random) -> list[dict]:
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(names)
    return [{"name": names[i], "year": rng.randint(1931, 1995), "city": rng.choice(CITIES),
             "genre": rng.choice(GENRES), "parent_job": rng.choice(JOBS), "award": rng.choice(AWARDS),
             "book": rng.choice(TITLES)} for i in range(n)]


def rows(n_people: int = 60, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for p in people(n_people, rng):
        facts = [
            (f"Where was {p['name']} born?", f"{p['name']} was born in {p['city']} in {p['year']}."),
            (f"What does {p['name']} write?", f"{p['name']} is known for {p['genre']}."),
            (f"What did the parent of {p['name']} do?", f"One parent of {p['name']} worked as {p['parent_job']}."),
            (f"Which award did {p['name']} win?", f"{p['name']} won {p['award']} for '{p['book']}'."),
            (f"Name a book by {p['name']}.", f"'{p['book']}' is a well-known book by {p['name']}."),
        ]
        for q, a in facts:
            out.append({"id": len(out), "person": p["name"], "question": q, "answer": a})
    return out


def main(path: str = "examples/data/authors.jsonl") -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
