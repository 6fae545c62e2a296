"""Shared fixtures: a tiny data set and config, and a recorded store built once per session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("LMCLEAN_TEST_THREADS", "2")))

TINY_MODEL = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2}


def write_rows(path: Path, n: int = 24) -> Path:
    rows = [{"id": 100 + i, "question": f"Who is person {i}?",
             "answer": f"Person {i} lives in town {i * 7 % 11} and likes {['tea', 'maps', 'owls'][i % 3]}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "data.jsonl")


def tiny_overrides(data: Path, **extra: object) -> list[str]:
    base = {
        "data.path": str(data), "data.max_length": 48, "train.batch_size": 4, "train.epochs": 2,
        "train.lr": 0.1, "record.checkpoint_every": 4,
        "model.config": json.dumps(TINY_MODEL),
    }
    base.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(data: Path, **extra: object):
    """The tiny record config (defaults + tiny_overrides), as a validated LmcleanConfig."""
    from lmclean import config as config_mod

    return config_mod.load(None, tiny_overrides(data, **extra))


def error_line(result) -> str:  # noqa: ANN001 - a typer.testing Result
    """The single stderr line of a failed CLI command (asserting exit code 1 and no traceback)."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def recorded_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny store (16 samples, ids 100..115, 3 epochs) recorded once per test module."""
    from lmclean.train.trainer import train

    tmp = tmp_path_factory.mktemp("recorded")
    path = tmp / "run.zarr"
    train(tiny_config(write_rows(tmp / "data.jsonl", n=16), **{"train.epochs": 3}), path)
    return path


@pytest.fixture
def store_copy(recorded_store: Path, tmp_path: Path) -> Path:
    """A private copy of `recorded_store` for a test that unlearns, scrubs or damages it."""
    copy = tmp_path / "run.zarr"
    shutil.copytree(recorded_store, copy)
    return copy


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """This process computes like a killed subprocess (OMP_NUM_THREADS=1): bitwise the same steps."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torchrun(worker: str, *args: str | Path, nproc: int = 2, timeout: int = 600) -> None:
    """Run tests/<worker> under `torch.distributed.run` with `nproc` gloo processes on a free local
    port, one torch thread each (two processes on two cores); fails the test with the ranks' stderr."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-addr", "127.0.0.1", "--master-port", str(port), str(here / worker),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
