"""The Trainer-integration scripts run end to end as a user runs them (subprocesses, one torch
thread): benchmarks/gpu_check.py --device cpu --tiny, benchmarks/trainer_bench.py --quick and
examples/trainer/train.py. Each takes well under a minute on an idle 2-core machine; the timeouts
below are only a guard against a hang on a loaded one, not a timing check."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TOFU = ROOT.parent / "shared" / "data" / "tofu"
GUARD_S = 300


def _run(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _lmclean(*args: object) -> subprocess.CompletedProcess[str]:
    return _run("-m", "lmclean", *args)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_gpu_check_without_cuda_skips() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run the full check")
    proc = _run("benchmarks/gpu_check.py")
    assert proc.stdout.strip() == "no CUDA device: skipped"


def test_gpu_check_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = _run("benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", out)
    assert "| lora |" in proc.stdout and "| full |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["bf16"] is True  # TrainingArguments(bf16=True), as on the GPU
    assert set(report["runs"]) == {"lora", "full"}
    for run in report["runs"].values():
        assert run["steps"] > 0 and run["params"] > 0
        for key in ("overhead_pct", "bytes_per_param_step", "grad_bytes_per_param_step", "step_s_plain"):
            assert _finite(run[key]), (key, run[key])
        assert run["bytes_per_param_step"] > run["grad_bytes_per_param_step"] > 1  # fp32 gradients, lz4-compressed
        assert set(run["unlearn"]) == {"ggn", "krylov", "replay"}
        for u in run["unlearn"].values():
            assert _finite(u["per_step_in_train_steps"]) and u["per_step_in_train_steps"] > 0
    assert report["runs"]["lora"]["params"] < report["runs"]["full"]["params"]  # the adapter only


@pytest.mark.skipif(not (TOFU / "full.jsonl").is_file(), reason=f"TOFU data not at {TOFU}")
def test_trainer_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _run("benchmarks/trainer_bench.py", "--quick", "--threads", "1", "--out", out)
    assert "| full | ggn |" in proc.stdout and "| lora | replay |" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"full", "lora"}
    for mode in report["modes"].values():
        for key in ("overhead_step_pct", "overhead_wall_pct", "bytes_per_param_step", "theta_dist",
                    "forget_loss_orig", "forget_loss_retrain"):
            assert _finite(mode[key]), (key, mode[key])
        assert mode["theta_dist"] > 0  # retraining without the author moved θ: the residuals mean something
        assert set(mode["methods"]) == {"ggn", "replay", "rollback"}
        for m in mode["methods"].values():
            assert _finite(m["residual"]) and _finite(m["cost_train_steps"]) and m["seconds"] > 0
        # replay of the recorded Trainer run = the Trainer's own run with exclude= (float rounding)
        assert mode["methods"]["replay"]["residual"] < 1e-3, mode["methods"]["replay"]
        assert abs(mode["methods"]["replay"]["gap"] - 1) < 1e-2


@pytest.fixture(scope="module")
def example_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("example") / "facts.zarr"
    proc = _run("examples/trainer/train.py", "--store", store, "--max-steps", "4")
    assert f"recorded 4 steps of 24 rows into {store}" in proc.stdout
    return store


def test_example_writes_a_store_inspect_log_reads(example_store: Path) -> None:
    info = json.loads(_lmclean("inspect-log", "--json", example_store).stdout)
    assert info["steps"]["committed"] == info["steps"]["planned"] == 4 and info["steps"]["closed"]
    assert info["recorded_params"] == 131_392  # the example's tiny Llama, every parameter trainable
    assert len(info["optimizer"]["groups"]) > 1  # the Trainer's decay / no-decay split, recorded
    assert (example_store / "model" / "config.json").is_file()


def test_example_store_unlearns_and_audits_with_the_cli(example_store: Path, tmp_path: Path) -> None:
    """The README's flow: `lmclean unlearn` then `lmclean audit show` on the Trainer's store."""
    out = tmp_path / "forgot"
    _lmclean("unlearn", example_store, "--forget", "0,1", "--method", "lmcleaner", "--hvp", "ggn", "--out", out)
    assert (out / "config.json").is_file() and (out / "unlearn_report.json").is_file()
    shown = _lmclean("audit", "show", example_store).stdout
    assert "record" in shown and "unlearn" in shown
