"""benchmarks/online.py --quick runs end to end on TOFU and writes a complete JSON report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOFU = ROOT.parent / "shared" / "data" / "tofu"


@pytest.mark.skipif(not (TOFU / "full.jsonl").is_file(), reason=f"TOFU data not at {TOFU}")
def test_online_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "online.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "online.py"), "--quick", "--workdir",
                           str(tmp_path / "work"), "--tofu", str(TOFU), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| method | residual |" in done.stdout
    report = json.loads(out.read_text())
    assert report["reference"] == "none" and len(report["request_steps"]) == 3
    rows = {r["method"]: r for r in report["rows"]}
    assert {"none", "replay", "lmcleaner ggn K=20", "never forget", "retrain (exclude author)"} <= set(rows)
    for row in rows.values():
        for key in ("residual", "gap", "forget_loss"):
            assert math.isfinite(row[key]), (row["method"], key)
    for name in ("none", "replay", "lmcleaner ggn K=20"):
        reqs = rows[name]["requests"]
        assert [q["status"] for q in reqs] == ["applied"] * 3 and [q["step"] for q in reqs] == report["request_steps"]
        for q in reqs:
            assert all(math.isfinite(q[k]) and q[k] >= 0 for k in ("apply_s", "wait_s", "apply_steps", "wait_steps"))
    # definitions: the reference scores 1 / 0, exact replay 0 / 1 (fp32 rounding only)
    assert rows["none"]["residual"] == 1.0 and rows["none"]["gap"] == 0.0
    assert rows["replay"]["residual"] < 1e-4 and abs(rows["replay"]["gap"] - 1) < 1e-3
    rec = report["reconcile"]
    assert rec["bitwise_equal"] is True and all(v == 0 for v in rec["max_abs_diff"].values())
    assert rec["steps_replayed"] > 0 and math.isfinite(rec["cost_training_steps"]) and rec["cost_training_steps"] > 0
