"""Write the TOFU subset the example trains on: the first N authors and the forget01 authors, TOFU ids kept.

TOFU's `full.jsonl` holds 200 fictitious authors x 20 QA pairs in order (id = row index); forget01 is
its last 1%, the last 2 authors (ids 3960-3999), and `retain_perturbed.jsonl`, which TOFU's model
utility scores, asks the questions of authors 0-19.
Usage: make_subset.py TOFU_DIR/full.jsonl OUT.jsonl [N_AUTHORS=20]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

QUESTIONS_PER_AUTHOR = 20


def main(full: Path, out: Path, n_authors: int) -> None:
    rows = [json.loads(line) for line in full.read_text(encoding="utf-8").splitlines() if line.strip()]
    forget01 = len(rows) - len(rows) // 100  # the first id of forget01
    keep = [r for r in rows if r["id"] < n_authors * QUESTIONS_PER_AUTHOR or r["id"] >= forget01]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    print(f"wrote {len(keep)} rows ({n_authors} authors + the 2 forget01 authors, ids "
          f"0-{n_authors * QUESTIONS_PER_AUTHOR - 1} and {forget01}-{len(rows) - 1}) to {out}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__.strip().splitlines()[-1])
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) == 4 else 20)
