"""Write the TOFU subset the example trains on: the first N authors and the forget01 authors, TOFU ids kept.

TOFU's `full.jsonl` holds 200 fictitious authors x 20 QA pairs in order (id = row index); forget01 is
its last 1%, the last 2 authors (ids 3960-3999), and `retain_perturbed.jsonl`, which TOFU's model
utility scores, asks the questions of authors 0-19.
With --retain-only the forget01 authors are left out (the pre-training data of the example's first stage).
Usage: make_subset.py TOFU_DIR/full.jsonl OUT.jsonl [N_AUTHORS=20] [--retain-only]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

QUESTIONS_PER_AUTHOR = 20


def main(full: Path, out: Path, n_authors: int, retain_only: bool = False) -> None:
    rows = [json.loads(line) for line in full.read_text(encoding="utf-8").splitlines() if line.strip()]
    forget01 = len(rows) - len(rows) // 100  # the first id of forget01
    keep = [r for r in rows if r["id"] < n_authors * QUESTIONS_PER_AUTHOR or (r["id"] >= forget01 and not retain_only)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    extra = "" if retain_only else f" + the 2 forget01 authors ({forget01}-{len(rows) - 1})"
    print(f"wrote {len(keep)} rows ({n_authors} authors, ids 0-{n_authors * QUESTIONS_PER_AUTHOR - 1}{extra}) to {out}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--retain-only"]
    if len(args) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[-1])
    main(Path(args[0]), Path(args[1]), int(args[2]) if len(args) == 3 else 20, "--retain-only" in sys.argv)
