"""LoRA / PEFT adapter stores: curvature over the adapter only, record → unlearn / export / eval
through the CLI, and a base whose weights changed on disk refused.

Tolerances: curvature as tests/test_curvature.py's Llama case (rtol 1e-6, atol 1e-6 × max|reference|:
transformers runs RMSNorm and the eager softmax in float32 even in a float64 model). Replay vs
`record --exclude`: 1e-5 relative (float32 training; the replay output is θ[τ] + (θ' − θ)).
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from conftest import error_line, write_rows
from curvature_cases import Built, random_like
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lmclean import adapters
from lmclean.cli.main import app
from lmclean.curvature import flatten, ggn_vp, hvp
from lmclean.errors import ConfigError, ModelMismatchError
from lmclean.objective import CausalLMObjective
from lmclean.params import ParamManifest
from lmclean.store import TrajectoryStore

runner = CliRunner()
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4}
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _ok(*args: object):
    r = _invoke(*args)
    assert r.exit_code == 0, r.output
    return r


def _record_args(data: Path, store: Path, *extra: object) -> list[object]:
    """examples/tiny.yaml with a tiny model, 16 rows and LoRA adapters (8 steps)."""
    sets = {"data.path": str(data), "data.max_length": 48, "train.batch_size": 4, "train.epochs": 2,
            "train.warmup_steps": 2, "train.lr": 0.2, "record.checkpoint_every": 4,
            "model.config": json.dumps(TINY), "model.lora": json.dumps(LORA)}
    return ["record", "examples/tiny.yaml", "--store", store, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
            *extra]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].double() - b[k].double()).reshape(-1) for k in a])
    ref = torch.cat([b[k].double().reshape(-1) for k in b])
    return float(diff.norm() / ref.norm())


def _peft_load(base: Path, out: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"), out)


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    data = write_rows(root / "data.jsonl", n=16)
    _ok(*_record_args(data, root / "run.zarr"))
    return root / "run.zarr"


@pytest.fixture
def store(lora_store: Path, tmp_path: Path) -> Path:
    shutil.copytree(lora_store.parent, tmp_path / "lora")
    return tmp_path / "lora" / "run.zarr"


# ----------------------------------------------------------------------------- curvature


def _tiny_lora_objective() -> tuple[CausalLMObjective, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=16)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double()
    model = adapters.wrap_lora(base, {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}, seed=0).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B starts at 0, where the adapter's curvature is degenerate
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    lengths = torch.tensor([6, 4, 3])  # (B,)
    ids = torch.randint(1, 260, (3, 6), generator=g)  # (B, L)
    ids[torch.arange(6)[None, :] >= lengths[:, None]] = 0
    obj = CausalLMObjective(model, ids, lengths, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    return obj, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_ggn_and_exact_products_over_the_adapter_match_dense_float64_references() -> None:
    obj, params = _tiny_lora_objective()
    assert len(params) == 8 and all(".lora_A." in k or ".lora_B." in k for k in params)  # the base is not a variable
    b = Built(obj, params)
    assert b.hessian.shape == (512, 512)
    assert not torch.allclose(b.hessian, b.ggn, rtol=1e-3, atol=0)  # a nonlinear case: the two must differ
    for seed in range(2):
        v = random_like(params, seed)
        for got, dense in ((hvp(obj, params, v), b.hessian), (ggn_vp(obj, params, v), b.ggn)):
            want = dense @ flatten(v)
            torch.testing.assert_close(flatten(got), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


# ----------------------------------------------------------------------------- record and inspect


def test_record_keeps_only_the_adapter_and_inspect_reports_it(store: Path) -> None:
    s = TrajectoryStore(store)
    names = s.manifest.names
    assert len(names) == 8 and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert s.meta["model"]["kind"] == "peft" and s.meta["model"]["base"]["path"] == "base"
    assert (store / "base" / "config.json").is_file() and adapters.is_adapter_dir(store / "model")
    data = json.loads(_ok("inspect-log", store, "--json").stdout)
    assert data["recorded_params"] == sum(e.numel for e in s.manifest.entries) == 2 * 2 * (4 * 32 + 32 * 4)
    assert data["model"]["kind"] == "peft"
    # the recorded final adapter is the last checkpoint's θ
    torch.testing.assert_close(flatten({n: _adapter(store / "model")[n.replace(".default", "")] for n in names}),
                               s.checkpoint(s.committed_steps)[0], rtol=0, atol=0)


def test_bad_lora_settings_are_one_line_errors(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "d.jsonl", n=4)
    for key, value, words in [("r", 0, "model.lora.r"), ("dropout", 0.1, "model.lora.dropout"),
                              ("target_modules", "[]", "model.lora.target_modules"), ("rank", 4, "model.lora.rank")]:
        line = error_line(_invoke(*_record_args(data, tmp_path / "s.zarr", "--set", f"model.lora.{key}={value}")))
        assert words in line, line
    line = error_line(_invoke(*_record_args(data, tmp_path / "s.zarr", "--set", "model.lora.target_modules=[nope]")))
    assert "model.lora" in line
    assert not (tmp_path / "s.zarr").exists()
    from lmclean import config as config_mod

    assert config_mod.load(None, ["model.lora.r=2"]).model.lora == {"r": 2}  # one key switches LoRA on
    assert config_mod.load(None).model.lora is None


# ----------------------------------------------------------------------------- unlearn, export, eval


def test_unlearn_methods_write_adapters_that_compose_and_merge(store: Path, tmp_path: Path) -> None:
    root = store.parent
    base = store / "base"
    # replay of the adapter store == training the same config without the sample
    _ok("unlearn", store, "--forget", "101", "--method", "replay", "--out", tmp_path / "replay", "--keep-data")
    _ok(*_record_args(root / "data.jsonl", tmp_path / "excl.zarr", "--exclude", "101"))
    assert _rel(_adapter(tmp_path / "replay"), _adapter(tmp_path / "excl.zarr" / "model")) < 1e-5
    # rollback composes on the replay output (an adapter directory), lmcleaner --merge on that
    _ok("unlearn", store, "--forget", "102", "--method", "rollback", "--out", tmp_path / "rollback")
    _ok("unlearn", store, "--forget", "103", "--method", "lmcleaner", "--hvp", "ggn", "--out", tmp_path / "lm")
    states = [_adapter(tmp_path / d) for d in ("replay", "rollback", "lm")]
    for d in ("replay", "rollback", "lm"):
        model = _peft_load(base, tmp_path / d)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert json.loads((tmp_path / d / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    assert _rel(states[1], states[0]) > 1e-6 and _rel(states[2], states[1]) > 1e-6  # each request changed the adapter
    _ok("unlearn", store, "--forget", "104", "--method", "rollback", "--merge", "--out", tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    expected = _peft_load(base, tmp_path / "merged" / "adapter").merge_and_unload().state_dict()
    assert set(merged) <= set(expected) and len(merged) >= 10
    for k, w in merged.items():
        torch.testing.assert_close(w, expected[k], rtol=0, atol=0)
    from lmclean.train.model import load_model

    load_model(tmp_path / "merged")  # a plain HF model directory
    # the next request composes on the merged output's adapter
    _ok("unlearn", store, "--forget", "105", "--method", "rollback", "--out", tmp_path / "after-merge")
    assert _rel(_adapter(tmp_path / "after-merge"), _adapter(tmp_path / "merged" / "adapter")) > 1e-6


def test_export_and_eval_accept_adapter_stores(store: Path, tmp_path: Path) -> None:
    _ok("export", store, "--out", tmp_path / "last")
    assert _rel(_adapter(tmp_path / "last"), _adapter(store / "model")) == 0
    _ok("export", store, "--step", "3", "--merge", "--out", tmp_path / "s3")
    s = TrajectoryStore(store)
    theta3 = s.theta_at(3)[0]
    model = _peft_load(store / "base", tmp_path / "s3" / "adapter")
    got = flatten({n: p.detach() for n, p in model.named_parameters() if "lora_" in n})  # inference mode: all frozen
    torch.testing.assert_close(got, theta3, rtol=0, atol=0)
    rep = json.loads(_ok("eval", store / "model", f"s3={tmp_path / 's3'}", "--data", store.parent / "data.jsonl",
                         "--forget", "100-103", "--tokenizer", "byte", "--generate", "0", "--json").stdout)
    full, step3 = rep["models"]["model"], rep["models"]["s3"]
    assert 0 < full["forget_loss"] < step3["forget_loss"]  # the adapter dir was evaluated with its adapter on


# ----------------------------------------------------------------------------- base verification


def test_a_store_whose_base_changed_is_refused(store: Path, tmp_path: Path) -> None:
    weights = store / "base" / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "embed_tokens" in k)
    tensors[name][0, 0] += 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    digest = TrajectoryStore(store).meta["model"]["base"]["sha256"][:12]
    for args in (("unlearn", store, "--forget", "101", "--method", "rollback", "--out", tmp_path / "o"),
                 ("export", store, "--out", tmp_path / "e")):
        line = error_line(_invoke(*args))
        assert str(store / "base") in line and digest in line and "restore the base" in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()
    shutil.rmtree(store / "base")
    assert "restore the base" in error_line(_invoke("export", store, "--out", tmp_path / "e"))


def test_describe_full_and_frozen_base_models(tmp_path: Path) -> None:
    from lmclean.train.model import fresh_model, save_model

    model = fresh_model(TINY, 260, 16, 0)
    assert adapters.describe_model(model) == {"kind": "full"}
    save_model(model, None, tmp_path / "m")
    frozen = fresh_model(TINY, 260, 16, 0)
    frozen = type(frozen).from_pretrained(tmp_path / "m", attn_implementation="eager")
    frozen.model.embed_tokens.weight.requires_grad_(False)
    desc = adapters.describe_model(frozen)
    assert desc["kind"] == "frozen-base" and desc["frozen"] == ["model.embed_tokens.weight"]
    assert desc["base"]["path"] == str((tmp_path / "m").resolve())
    json.dumps(desc)  # JSON-safe: it goes into the store's metadata
    rebuilt = adapters.build_model(desc)
    assert [n for n, p in rebuilt.named_parameters() if not p.requires_grad] == ["model.embed_tokens.weight"]
    with pytest.raises(ModelMismatchError, match="restore the base"):
        adapters.build_model(desc | {"base": desc["base"] | {"sha256": "0" * 64}})
    fake_store = types.SimpleNamespace(meta={"model": desc, "model_config": {}}, path=tmp_path)
    start = adapters.load_for_store(fake_store, tmp_path / "m")  # an output directory of a frozen-base store
    assert ParamManifest.from_model(start).names == ParamManifest.from_model(rebuilt).names
    with pytest.raises(ConfigError, match="model.lora"):
        adapters.wrap_lora(fresh_model(TINY, 260, 16, 0), {"target_modules": ["nope"]})


def test_a_crash_before_the_base_is_saved_is_resumed(lora_store: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    store = tmp_path / "run.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMCLEAN_CRASH_AT": "save-model:before-rename"}  # the base save
    code = "import sys; from lmclean.cli.main import app; sys.argv[0] = 'lmclean'; app()"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, _record_args(lora_store.parent / "data.jsonl", store))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 86, proc.stderr
    assert (store / "zarr.json").is_file() and not (store / "base").exists()
    _ok("record", "--resume", "--store", store)
    assert (store / "base" / "config.json").is_file()
    assert _rel(_adapter(store / "model"), _adapter(lora_store / "model")) == 0  # as if never interrupted


def test_a_base_with_its_own_directory_is_used_in_place(tmp_path: Path) -> None:
    from lmclean.train.model import fresh_model, save_model

    save_model(fresh_model(TINY, 260, 48, 3), None, tmp_path / "pretrained")
    data = write_rows(tmp_path / "data.jsonl", n=8)
    store = tmp_path / "ft.zarr"
    _ok(*_record_args(data, store, "--set", f"model.path={tmp_path / 'pretrained'}", "--set", "train.epochs=1"))
    meta = TrajectoryStore(store).meta["model"]
    assert meta["base"]["path"] == str((tmp_path / "pretrained").resolve()) and not (store / "base").exists()
    _ok("unlearn", store, "--forget", "101", "--method", "rollback", "--out", tmp_path / "o")
    _peft_load(tmp_path / "pretrained", tmp_path / "o")
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == meta["base"]["path"]
