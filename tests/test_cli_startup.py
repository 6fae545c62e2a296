"""The CLI's fixed costs and plumbing: no torch for `--help`, help text as written, one-line errors
without a stray empty line, and plain progress lines where stderr is not a terminal."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from lmclean.cli import _app
from lmclean.cli.main import app
from lmclean.errors import DataError

runner = CliRunner()
HEAVY = ("torch", "transformers", "zarr", "scipy", "lmclean.unlearn", "lmclean.train", "lmclean.store", "lmclean.audit")


def test_importing_the_cli_loads_no_torch() -> None:
    # a fresh interpreter: this one has torch already
    code = f"import sys, lmclean.cli.main; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_help_reads_as_written() -> None:
    export = _help("export")
    assert "θ[step]" in export  # Rich markup swallowed "[step]"
    assert "Usage: lmclean export [OPTIONS] STORE" in export and "{store}" not in export
    assert "<bool>" not in export and "[default: no-overwrite]" not in export
    record = _help("record")
    assert "--set <str>" in record and "list[str]" not in record
    assert "Usage: lmclean record [OPTIONS] [CONFIG]" in record
    assert "MODEL... <str>" in _help("eval")
    assert "<bool>" not in _help("unlearn") and "<bool>" not in _help("audit", "show")


def test_an_error_before_any_progress_is_one_line_without_an_empty_line(tmp_path) -> None:  # noqa: ANN001
    result = runner.invoke(app, ["unlearn", str(tmp_path / "missing.zarr"), "--forget", "1"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, repr(result.stderr)


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> tuple[io.StringIO, list[float]]:
    """stderr as a log file (not a terminal) and a clock the test moves."""
    buf = io.StringIO()
    monkeypatch.setattr(_app, "err", Console(file=buf, force_terminal=False, width=200))
    now = [100.0]
    monkeypatch.setattr(_app, "_clock", lambda: now[0])
    return buf, now


def test_plain_progress_prints_a_line_every_few_seconds_and_at_the_end(plain: tuple[io.StringIO, list[float]]) -> None:
    buf, now = plain
    with _app.progress_bar("train", total=None, fields="loss {task.fields[loss]:.2f}", lazy=True) as advance:
        advance(total=40, completed=10)  # resuming at step 10 of 40
        for t in range(10, 40):
            now[0] += 1.0  # one step per second
            advance(total=40, completed=t + 1, loss=1.0 / (t + 1))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 30 // 5 + 1  # every 5 s, and once at the end
    assert lines[0] == "train 15/40 (38%), 1/s, elapsed 0:00:05, eta 0:00:25 | loss 0.07"
    assert lines[-1] == "train 40/40 (100%), 1/s, elapsed 0:00:30 | loss 0.03"


def test_plain_progress_is_silent_until_started_and_when_disabled(plain: tuple[io.StringIO, list[float]]) -> None:
    buf, _ = plain
    with pytest.raises(DataError):
        with _app.progress_bar("unlearn", total=None, lazy=True):
            raise DataError("bad input")
    with _app.progress_bar("eval", total=3, enabled=False) as advance:
        advance()
    assert buf.getvalue() == ""
    with _app.progress_bar("eval", total=3, fields="{task.fields[stage]}") as advance:
        advance(0, stage="load")
    assert re.fullmatch(r"eval 0/3 \(0%\), -/s, elapsed 0:00:00 \| load\n", buf.getvalue())
