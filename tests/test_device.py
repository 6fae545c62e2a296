"""Devices and precision (CPU only): device selection and refusal, `--device`, and a bf16-autocast run
whose θ the store rebuilds bitwise and whose replay matches `record --exclude`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import error_line, tiny_config, tiny_overrides, write_rows
from typer.testing import CliRunner

from lmclean import config as config_mod
from lmclean.cli.main import app
from lmclean.device import resolve_device
from lmclean.errors import ConfigError
from lmclean.params import flat_params
from lmclean.store import TrajectoryStore
from lmclean.train.model import load_model
from lmclean.train.trainer import _resume_differences, train
from lmclean.unlearn.service import open_trajectory

runner = CliRunner()
FORGET = 103
# replay vs `record --exclude` on CPU: the same kernels run, so the only difference is θ̂ = θ[τ] + (θ' − θ[τ])
# rounded in fp32 (measured 1.2e-11 relative); the bound leaves a wide margin below fp32's 6e-8.
REPLAY_TOL = 1e-8


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_resolve_device_picks_and_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gpu(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:1", "mps"):
        with pytest.raises(ConfigError) as exc:
            resolve_device(spec)
        assert str(exc.value) == f"device {spec} is not available here; available: cpu"
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(ConfigError, match="is not a device; use auto, cpu, cuda, cuda:N or mps"):
            resolve_device(bad)
    # a machine with two CUDA devices (faked): auto and cuda take the current one, cuda:N must exist
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0) == resolve_device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"^device cuda:2 is not available here; available: cpu, cuda:0, cuda:1$"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_config_checks_the_device_key(data_file: Path) -> None:
    assert tiny_config(data_file).train.device == "auto" and tiny_config(data_file).train.autocast == "off"
    with pytest.raises(ConfigError, match=r"config key `train.device` = 'gpu' is not a device"):
        tiny_config(data_file, **{"train.device": "gpu"})
    with pytest.raises(ConfigError, match=r"`train.autocast` = 'fp16' is not allowed; use one of \['off', 'bf16'\]"):
        tiny_config(data_file, **{"train.autocast": "fp16"})


def test_resume_ignores_the_device_and_keys_newer_than_the_store(data_file: Path) -> None:
    cfg = tiny_config(data_file, **{"train.device": "cpu"})
    stored = config_mod.to_dict(tiny_config(data_file))
    for key in ("device", "autocast"):  # a store written before these keys existed
        del stored["train"][key]
    assert _resume_differences(stored, cfg) == []
    stored["train"]["lr"] = 0.5
    assert _resume_differences(stored, cfg) == ["train.lr: 0.5 -> 0.1"]
    assert "train.autocast: 'off' -> 'bf16'" in _resume_differences(stored, tiny_config(data_file, **{"train.autocast": "bf16"}))


def test_record_device_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_rows(tmp_path / "data.jsonl", n=8)
    sets = [a for o in tiny_overrides(data, **{"train.epochs": 1}) for a in ("--set", o)]
    store = tmp_path / "run.zarr"
    r = _invoke("record", "--store", store, *sets, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    meta = TrajectoryStore(store).meta
    assert meta["device"] == "cpu" and meta["autocast"] is None and meta["config"]["train"]["device"] == "cpu"
    assert json.loads(r.stdout)["device"] == "cpu"
    line = error_line(_invoke("record", "--store", tmp_path / "x.zarr", *sets, "--device", "gpu"))
    assert "'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps" in line and "--device" in line
    _no_gpu(monkeypatch)
    line = error_line(_invoke("record", "--store", tmp_path / "y.zarr", *sets, "--device", "cuda"))
    assert line == "error: device cuda is not available here; available: cpu"
    assert not (tmp_path / "y.zarr").exists()  # refused before anything was written
    line = error_line(_invoke("unlearn", store, "--forget", "100", "--device", "mps"))
    assert line == "error: device mps is not available here; available: cpu"
    line = error_line(_invoke("eval", store / "model", "--data", data, "--forget", "100", "--device", "cuda:1"))
    assert line == "error: device cuda:1 is not available here; available: cpu"
    assert "'tpu' is not a device" in error_line(_invoke("eval", store / "model", "--data", data, "--forget", "100", "--device", "tpu"))


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bf16-autocast store and the same run recorded without sample FORGET."""
    tmp = tmp_path_factory.mktemp("bf16")
    cfg = tiny_config(write_rows(tmp / "data.jsonl", n=12),
                      **{"train.autocast": "bf16", "train.device": "cpu", "train.momentum": 0.9})
    train(cfg, tmp / "run.zarr")
    train(cfg, tmp / "ref.zarr", exclude=[FORGET])
    return tmp / "run.zarr", tmp / "ref.zarr"


def test_bf16_autocast_rebuilds_theta_bitwise(bf16_runs: tuple[Path, Path]) -> None:
    store = TrajectoryStore(bf16_runs[0])
    assert store.meta["autocast"] == "bf16" and store.meta["precision"] == "fp32"
    T = store.committed_steps
    assert store.nearest_checkpoint(0) == 0 and T > store.meta["checkpoint_every"]
    *_, (t, rebuilt, _) = store.iter_states(0, T)  # every step replayed from θ[0] on the stored gradients
    final = flat_params(load_model(store.model_dir), store.manifest)
    assert t == T and torch.equal(rebuilt, final) and torch.equal(rebuilt, store.checkpoint(T)[0])
    # the stored gradient is the autocast one: recomputed under bf16 it is equal, in fp32 it is not
    traj = open_trajectory(store, "cpu")
    # the accelerator path of iter_states (θ kept on a device, here the CPU named explicitly) is the
    # plain replay, step for step
    pairs = zip(store.iter_states(2, T, device=torch.device("cpu")), store.iter_states(2, T), strict=True)
    for (t1, a, sa), (t2, b, sb) in pairs:
        assert t1 == t2 and torch.equal(a, b) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = [int(i) for i in traj.batch(0).sample_ids]
    obj = traj.objective(0, ids)
    assert obj.autocast == "bf16"
    theta0 = store.checkpoint(0)[0]
    from lmclean.unlearn.common import flat_grad

    g = store.grad(0)
    assert torch.equal(flat_grad(obj, store.manifest, theta0), g)
    obj.autocast = None
    fp32_gap = float(torch.linalg.vector_norm(flat_grad(obj, store.manifest, theta0) - g) / torch.linalg.vector_norm(g))
    assert fp32_gap > 1e-4, f"an fp32 gradient is only {fp32_gap:.1e} from the bf16-autocast one: autocast did not run"


def test_bf16_replay_matches_record_exclude(bf16_runs: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    store = tmp_path / "run.zarr"
    shutil.copytree(bf16_runs[0], store)
    out = tmp_path / "replayed"
    r = _invoke("unlearn", store, "--forget", FORGET, "--method", "replay", "--device", "cpu", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["device"] == "cpu" and report["autocast"] == "bf16"
    assert report["replay_drift_step"] == report["window"][0]
    assert report["replay_drift"] <= 1e-6, f"recomputed g[t] drifts {report['replay_drift']:.2e} from the stored one on CPU"
    assert json.loads((out / "unlearn_report.json").read_text())["device"] == "cpu"
    manifest = TrajectoryStore(store).manifest
    got = flat_params(load_model(out), manifest)
    want = flat_params(load_model(bf16_runs[1] / "model"), manifest)
    moved = float(torch.linalg.vector_norm(want - TrajectoryStore(store).checkpoint(TrajectoryStore(store).committed_steps)[0]))
    drift = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
    assert moved > 1e-4  # forgetting the sample changes the model: the comparison below can fail
    assert drift <= REPLAY_TOL, f"replay vs record --exclude under bf16 autocast: relative drift {drift:.2e} > {REPLAY_TOL:g}"
