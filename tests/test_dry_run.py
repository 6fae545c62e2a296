"""`lmclean record --dry-run` and lmclean/store/projection.py: the projected store and unlearning cost.

The projection is arithmetic over the run's shape; it is checked against a hand computation and
against the bytes a real recording of the same config writes (the projection is uncompressed: an
upper bound, within the stated factors of what lz4/zstd leave on disk).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import one_thread, tiny_config, tiny_overrides, write_rows
from typer.testing import CliRunner

from lmclean.cli.main import app
from lmclean.store.projection import RECOMPUTE_PER_STEP, cost_per_step, fidelity_table, project


def test_projection_by_hand() -> None:
    kw = dict(params=1000, steps=100, batch_size=8, max_length=16, checkpoint_every=50, state_buffers=2)
    p = project(**kw)
    tokens = 100 * (8 * 16 * 4 + 8 * 20 + 32)
    assert p.checkpoints == 3  # 0, 50 and the final θ at 100
    assert {k: f.bytes for k, f in p.families.items()} == {
        "gradients": 100 * 1000 * 4, "checkpoints": 3 * 1000 * 4 * 3, "tokens_ids": tokens}
    assert p.families["checkpoints"].bytes_per_param_step == pytest.approx(0.36)
    assert p.unlearn["replay"].training_steps == pytest.approx(cost_per_step()["replay"] * 100)
    assert project(**kw, precision="bf16").families["gradients"].bytes == 100 * 1000 * 2
    assert project(**kw, precision="int8").families["gradients"].bytes == round(100 * 1000 * (1 + 4 / 256))
    rc = project(**kw, gradients="recompute")
    assert rc.families["gradients"].bytes == 0 and rc.total_bytes == 3 * 1000 * 4 * 3 + tokens
    for m, cost in rc.unlearn.items():
        assert cost.per_step == pytest.approx(cost_per_step()[m] + RECOMPUTE_PER_STEP[m])
    window = project(**kw, keep_steps=10)  # rows of the last 10 steps; the checkpoints at 100 and the one before
    assert window.families["gradients"].bytes == 10 * 1000 * 4 and window.checkpoints == 2
    assert window.unlearn["replay"].steps_swept == 10
    assert "projected store" in rc.line() and "\n" not in rc.line()


def test_cli_dry_run_writes_nothing(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "data.jsonl")
    store = tmp_path / "run.zarr"
    args = ["record", "--store", str(store), "--dry-run", "--json"]
    for o in tiny_overrides(data, **{"record.gradients": "recompute"}):
        args += ["--set", o]
    with one_thread():
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert not store.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
    assert got["gradients"] == "recompute" and got["families"]["gradients"]["bytes"] == 0
    assert got["steps"] == 12 and got["checkpoints"] == 4 and set(got["unlearn"]) == {"replay", "rollback", "lmcleaner"}
    text = CliRunner().invoke(app, [a for a in args if a != "--json"])  # the table
    assert text.exit_code == 0 and "bytes/param/step" in text.stdout and "lmcleaner" in text.stdout


@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_projection_matches_a_recording(tmp_path: Path, mode: str) -> None:
    from lmclean.store.writer import store_size_bytes
    from lmclean.train.dry_run import project_run
    from lmclean.train.trainer import train

    cfg = tiny_config(write_rows(tmp_path / "data.jsonl"), **{"record.gradients": mode})
    p = project_run(cfg)
    with one_thread():
        res = train(cfg, tmp_path / "run.zarr", save_final=False)
    assert (p.steps, p.params) == (res.steps, res.run.manifest.size)
    ck = store_size_bytes(tmp_path / "run.zarr", "checkpoints")
    assert 0.9 < ck / p.families["checkpoints"].bytes < 1.1, ck / p.families["checkpoints"].bytes
    grad = tmp_path / "run.zarr" / "steps" / "grad"
    if mode == "recompute":
        assert not grad.exists() and p.families["gradients"].bytes == 0
    else:  # an upper bound: lz4 finds the zero rows of unused token embeddings (0.69 here; ~1 on real models)
        assert 0.5 < store_size_bytes(grad) / p.families["gradients"].bytes < 1.05
    rows = store_size_bytes(tmp_path / "run.zarr", "steps") - (0 if mode == "recompute" else store_size_bytes(grad))
    assert rows < p.families["tokens_ids"].bytes + 64_000  # zstd-compressed batches, plus the arrays' metadata


def test_cost_factors_are_the_worst_measured_in_the_shipped_table() -> None:
    """The dry-run's factors come from the table `--method auto` uses, not from typed-in figures."""
    configs = {c["name"]: c["measured"] for c in fidelity_table()["configs"]}
    worst = {m: max(v["per_step"] for v in configs[name].values())
             for m, name in (("replay", "replay"), ("rollback", "rollback"), ("lmcleaner", "lmcleaner ggn K=800"))}
    assert cost_per_step() == worst
    assert 0.9 < worst["replay"] < 1.5 and worst["lmcleaner"] > worst["replay"] > worst["rollback"]

