"""README.md runs as written: its ```bash blocks, in order, as a new user would type them after
`make demo` (the quick start's ```sh block, which is `make demo` and `make test` themselves).

They run in a temporary directory holding a copy of `examples/` and a link to this virtual
environment as `.venv`, so `source .venv/bin/activate` works there as in a clone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M)


def test_readme_never_touches_the_demos_outputs() -> None:
    """`make demo` has run before: a README command on one of its paths would be refused."""
    demo = set(re.findall(r"runs/[\w.-]+", (ROOT / "examples" / "demo.sh").read_text()))
    readme = set(re.findall(r"runs/[\w.-]+", "\n".join(bash_blocks((ROOT / "README.md").read_text()))))
    assert demo and readme and not demo & readme


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path: Path) -> None:
    blocks = bash_blocks((ROOT / "README.md").read_text())
    assert blocks, "README.md has no ```bash block"
    work = tmp_path / "clone"
    shutil.copytree(ROOT / "examples", work / "examples")
    (work / ".venv").symlink_to(Path(sys.prefix))
    env = {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "120",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # as examples/demo.sh: tiny models, no spinning threads
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(blocks)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README command failed:\n{done.stderr[-3000:]}"
    assert "ok: " in done.stdout  # audit verify
    assert (work / "runs" / "facts-forget-6" / "model.safetensors").exists()
