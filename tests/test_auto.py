"""`--method auto --budget`: the shipped fidelity table, the cost model, the choice, and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import error_line
from typer.testing import CliRunner

from lmclean.audit import AuditLog
from lmclean.cli.main import app
from lmclean.errors import ConfigError
from lmclean.unlearn.auto import RequestShape, choose, parse_budget, project, step_seconds, swept_steps, table

README = Path(__file__).resolve().parents[1] / "benchmarks" / "README.md"
ROW = re.compile(r"^(.*?)\s+(-?[\d.]+)\s+(n/a|-?[\d.]+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+\d+$")
runner = CliRunner()


def readme_rows(heading: str, block: int) -> dict[str, tuple[float, float]]:
    """name -> (residual, /step) of the `block`-th table under the ### heading starting with `heading`."""
    text = README.read_text(encoding="utf-8")
    start = text.index("### " + heading)
    end = text.find("\n### ", start + 4)
    blocks = re.findall(r"```\n(.*?)```", text[start:end if end > 0 else None], re.S)
    rows = {}
    for line in blocks[block].splitlines():
        m = ROW.match(line.strip())
        if m:
            rows[m.group(1).strip()] = (float(m.group(2)), float(m.group(4)))
    return rows


@pytest.mark.parametrize("case", sorted(table()["cases"]))
def test_the_table_is_a_faithful_copy_of_the_benchmark_readme(case: str) -> None:
    """Every figure is the README's, and every case says where it came from (update both together)."""
    info = table()["cases"][case]
    assert info["date"] and info["command"].startswith("python benchmarks/fidelity.py")
    rows = readme_rows(info["heading"], info["block"])
    copied = [(c["name"], c["measured"][case]) for c in table()["configs"] if case in c["measured"]]
    assert copied
    for name, measured in copied:
        row = rows["replay (exact)" if name == "replay" else name]
        assert (measured["residual"], measured["per_step"]) == row, name


@pytest.mark.parametrize("case", sorted(k for k, v in table()["cases"].items() if "results" in v))
def test_cases_with_a_results_file_match_it(case: str) -> None:
    """The run's own JSON (benchmarks/results) has the same command, date, scenario and residuals."""
    info = table()["cases"][case]
    run = json.loads((README.parent.parent / info["results"]).read_text(encoding="utf-8"))
    assert (run["command"], run["date"][:10], run["scenario"]) == (info["command"], info["date"], info["scenario"])
    rows = {r["method"]: r for r in run["rows"]}
    for c in table()["configs"]:
        if case in c["measured"]:
            row = rows["replay (exact)" if c["name"] == "replay" else c["name"]]
            assert c["measured"][case]["residual"] == (0.0 if c["name"] == "replay" else round(row["residual"], 3)), c["name"]


@pytest.mark.parametrize("text, value, unit", [("200", 200, "steps"), ("200steps", 200, "steps"), ("12.5 step", 12.5, "steps"),
                                               ("90s", 90, "seconds"), ("90 seconds", 90, "seconds")])
def test_budget_forms(text: str, value: float, unit: str) -> None:
    budget = parse_budget(text)
    assert (budget.value, budget.unit) == (value, unit)


@pytest.mark.parametrize("text", ["", "0", "-3", "abc", "5 minutes", "3x"])
def test_bad_budget_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a budget"):
        parse_budget(text)


SAMPLE = RequestShape(affected=(10, 40, 90), replay_affected=(10, 40, 90), tau=200, level="sample", optimizer="sgd")


def test_cost_model_counts_the_steps_each_configuration_sweeps() -> None:
    assert swept_steps({"method": "replay"}, SAMPLE) == 190
    assert swept_steps({"method": "rollback"}, SAMPLE) == 81
    assert swept_steps({"method": "lmcleaner", "K": 20}, SAMPLE) == 101  # 10..110
    assert swept_steps({"method": "lmcleaner", "K": 20, "tail": "ekfac"}, SAMPLE) == 190  # the tail runs to the end
    earlier = RequestShape((50,), (5, 50), 200, "sample", "sgd")  # replay also removes an earlier request's sample
    assert swept_steps({"method": "replay"}, earlier) == 195 and swept_steps({"method": "lmcleaner", "K": 800}, earlier) == 150
    by_name = {c.name: c for c in project(SAMPLE)}
    replay = by_name["replay"]
    assert replay.expected_residual == 0 and replay.projected_cost == pytest.approx(190 * replay.per_step)
    ggn = by_name["lmcleaner ggn K=800"]  # worst case over the matching (memorise, SGD) cases, cost too
    worst = [c["measured"][k] for c in table()["configs"] if c["name"] == ggn.name for k in ggn.cases]
    assert ggn.expected_residual == max(m["residual"] for m in worst) and ggn.per_step == max(m["per_step"] for m in worst)
    assert all(table()["cases"][k]["scenario"] == "memorise" for k in ggn.cases)


def test_default_budget_is_exact_replay_and_a_budget_picks_the_best_that_fits() -> None:
    default = choose(SAMPLE, None)
    assert default.chosen.name == "replay" and default.budget_steps == pytest.approx(default.chosen.projected_cost)
    candidates = project(SAMPLE)
    usable = sorted(c.projected_cost for c in candidates if c.expected_residual is not None and c.expected_residual < 1)
    for steps in usable:  # every threshold: the choice fits, and nothing that fits is expected to do better
        pick = choose(SAMPLE, parse_budget(f"{steps + 1e-6}"))
        assert pick.chosen.projected_cost <= steps + 1e-6 and pick.chosen.expected_residual < 1
        better = [c for c in pick.candidates if c.expected_residual is not None and c.expected_residual < pick.chosen.expected_residual]
        assert all(c.verdict.startswith(("over budget", "no better", "not ")) for c in better)
        report = pick.report()
        assert report["chosen"] == pick.chosen.name and len(report["alternatives"]) == len(candidates) - 1
    with pytest.raises(ConfigError, match=r"fits no configuration .* the cheapest, .* projects [\d.]+ steps .* raise --budget"):
        choose(SAMPLE, parse_budget(f"{usable[0] * 0.9}"))


def test_seconds_need_a_step_time_and_inapplicable_methods_are_skipped() -> None:
    with pytest.raises(ConfigError, match="give the budget in training steps"):
        choose(SAMPLE, parse_budget("90s"), None)
    assert choose(SAMPLE, parse_budget("900s"), 0.5).budget_steps == 1800
    batch_adamw = RequestShape((3, 4), (3, 4), 50, "batch", "adamw", propagation_ok="adamw batch level unsupported")
    pick = choose(batch_adamw, None)
    assert pick.chosen.name == "replay"
    assert all(c.verdict.startswith("not applicable") for c in pick.candidates if c.options["method"] == "lmcleaner")
    with_base = RequestShape(SAMPLE.affected, SAMPLE.replay_affected, 200, "sample", "sgd", replay_ok="--base given")
    pick = choose(with_base, parse_budget("100000"))
    assert pick.chosen.options["method"] != "replay" and pick.chosen.expected_residual < 1


def _unlearn(store: Path, *args: object):
    return runner.invoke(app, ["unlearn", str(store), *map(str, args)])


def test_cli_auto_replays_without_budget_and_reports_why_and_its_quality(store_copy: Path, tmp_path: Path) -> None:
    r = _unlearn(store_copy, "--forget", "101", "--method", "auto", "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["method"] == "replay" and report["auto"]["chosen"] == "replay"
    assert report["auto"]["expected_residual"] == 0 and report["auto"]["alternatives"]
    quality = report["quality"]
    assert len(quality["check_steps"]) == 3 and quality["defect_ratio"] < 1e-4  # exact replay (float32 store)
    assert quality["forget_loss"]["delta"] is not None
    (record,) = AuditLog(store_copy).find(lambda rec: rec.get("kind") == "unlearn")
    assert record["auto"] == "replay" and record["quality"]["defect_ratio"] == quality["defect_ratio"]
    assert json.loads((tmp_path / "o" / "unlearn_report.json").read_text())["quality"]["check_steps"] == quality["check_steps"]


def test_cli_budget_in_seconds_uses_the_recorded_step_time(recorded_store: Path) -> None:
    r = _unlearn(recorded_store, "--forget", "101", "--method", "auto", "--budget", "90s", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    auto = json.loads(r.stdout)["auto"]
    assert auto["step_seconds"] == pytest.approx(step_seconds(recorded_store))
    assert auto["budget_steps"] == pytest.approx(90 / auto["step_seconds"], rel=1e-3)


@pytest.mark.parametrize("args, needle", [
    (["--method", "auto", "--budget", "0.01"], "raise --budget"),
    (["--method", "rollback", "--budget", "50"], "--budget is used only with --method auto"),
    (["--method", "auto", "--budget", "soon"], "'soon' is not a budget"),
    (["--method", "auto", "--K", "20"], "--K is used only with --method lmcleaner or replay, not with --method auto"),
    (["--check-steps", "-1"], "--check-steps"),
])
def test_cli_refusals_are_one_line(recorded_store: Path, args: list[str], needle: str) -> None:
    assert needle in error_line(_unlearn(recorded_store, "--forget", "101", *args))


def test_cli_check_steps_zero_disables_the_spot_check(store_copy: Path, tmp_path: Path) -> None:
    r = _unlearn(store_copy, "--forget", "102", "--method", "rollback", "--check-steps", "0", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "quality: no spot check" in r.stderr


@pytest.mark.parametrize("name", [c["name"] for c in table()["configs"]])
def test_every_table_configuration_maps_onto_the_options_the_benchmark_ran(name: str) -> None:
    from lmclean.unlearn.auto import apply_choice
    from lmclean.unlearn.service import UnlearnOptions

    chosen = next(c["options"] for c in table()["configs"] if c["name"] == name)
    options = apply_choice(UnlearnOptions(method="auto", seed=7, check_steps=5), chosen, {"chosen": name})
    assert (options.method, options.seed, options.check_steps, options.auto_choice) == (chosen["method"], 7, 5, {"chosen": name})
    assert options.K == chosen.get("K") and options.fraction == chosen.get("fraction")
    if chosen["method"] == "lmcleaner":
        op, prop = options.propagation.operator, options.propagation
        assert op.hvp == chosen["hvp"] and op.curvature_fraction == chosen.get("curvature_fraction", 1.0)
        assert op.refresh_steps == chosen.get("refresh", 100) and prop.tail == chosen.get("tail", "carry")
        assert op.krylov_dim == chosen.get("krylov_dim", 4) and op.anchor_fraction == chosen.get("anchor_fraction", 0.5)
        assert prop.curvature_batch == chosen.get("curvature_batch", "retained")
        if prop.tail != "carry":  # the tail's curvature is the named one, with the row's refresh
            assert prop.tail_operator.hvp == prop.tail and prop.tail_operator.refresh == chosen["refresh"]
