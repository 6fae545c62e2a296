"""The record config: defaults, YAML + `--set` overrides, errors that name the key, diffs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmclean import config as config_mod
from lmclean.config import LmcleanConfig
from lmclean.errors import ConfigError, InputNotFoundError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_load_and_every_key_has_a_help_text() -> None:
    cfg = config_mod.load(None)
    assert cfg == LmcleanConfig()
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size, cfg.record.precision) == ("sgd", 0.05, 8, "fp32")
    rows = config_mod.help_table()
    keys = [k for k, _, _ in rows]
    assert {"seed", "tokenizer", "model.path", "data.template", "train.lr", "train.betas", "record.checkpoint_every"} <= set(keys)
    assert all(help_text for _, _, help_text in rows), [k for k, _, h in rows if not h]


def test_example_yaml_loads() -> None:
    cfg = config_mod.load(ROOT / "examples" / "tiny.yaml")
    assert cfg.model.config["hidden_size"] == 64
    assert (cfg.train.momentum, cfg.train.warmup_steps, cfg.train.epochs) == (0.9, 10, 8)


def test_set_overrides_are_parsed_as_yaml_and_merge_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.2\n  batch_size: 4\nmodel:\n  config: {model_type: llama, hidden_size: 8}\n")
    cfg = config_mod.load(path, ["train.lr=0.5", "train.epochs=3", "train.betas=[0.8, 0.9]", "record.precision=bf16",
                                 "model.config.hidden_size=16", "data.id_field=null", "train.shuffle=false"])
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 4  # untouched file value
    assert cfg.train.epochs == 3 and cfg.train.betas == [0.8, 0.9] and cfg.record.precision == "bf16"
    assert cfg.model.config == {"model_type": "llama", "hidden_size": 16}
    assert cfg.data.id_field is None and cfg.train.shuffle is False
    assert config_mod.load(path, ["train.lr=1"]).train.lr == 1.0  # ints are accepted for floats


@pytest.mark.parametrize("override,names", [
    ("train.lrr=0.1", ["train.lrr", "'lr'", "'momentum'"]),
    ("modle.path=x", ["modle", "'model'"]),
    ("train.batch_size=abc", ["train.batch_size", "'abc'", "int"]),
    ("train.lr=true", ["train.lr", "float"]),
    ("train.epochs=2.5", ["train.epochs", "int"]),
    ("train.optimizer=adam", ["train.optimizer", "'adam'", "['sgd', 'adamw']"]),
    ("record.precision=fp16", ["record.precision", "['fp32', 'bf16', 'int8']"]),
    ("train.schedule=step", ["train.schedule", "['constant', 'cosine', 'linear']"]),
    ("train.betas=[0.9, x]", ["train.betas[1]", "float"]),
    ("train=5", ["train", "mapping"]),
    ("train.batch_size=0", ["train.batch_size", ">= 1"]),
    ("train.lr=-1", ["train.lr", "> 0"]),
    ("train.betas=[0.9]", ["train.betas", "two"]),
    ("train.lr", ["train.lr", "key.sub=value"]),
])
def test_bad_keys_and_values_name_the_key_and_the_allowed_values(override: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.load(None, [override])
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="nope.yaml does not exist"):
        config_mod.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        config_mod.load(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config_mod.load(scalar)


def test_yaml_errors_give_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ndata:\n  path: x.jsonl\n    max_length: 3\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(bad)
    assert str(info.value) == f"config file {bad} is not valid YAML: line 4, column 15: mapping values are not allowed here"
    tab = tmp_path / "tab.yaml"
    tab.write_text("train:\n\tlr: 0.1\n")
    with pytest.raises(ConfigError, match="tab.yaml is not valid YAML: line 2, column 1: found character"):
        config_mod.load(tab)
    with pytest.raises(ConfigError, match=r"--set 'train.betas=\[0.9': the value is not valid YAML \(line 1, column 5: "):
        config_mod.load(None, ["train.betas=[0.9"])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"seed: 0 # caf\xe9\n")
    with pytest.raises(ConfigError, match=f"config file {latin} is not UTF-8 text"):
        config_mod.load(latin)


def test_round_trip_through_dict_and_diff_output() -> None:
    a = config_mod.load(None, ["train.lr=0.1"])
    assert config_mod.from_dict(config_mod.to_dict(a)) == a
    b = config_mod.load(None, ["train.lr=0.2", "model.config.hidden_size=32", "record.precision=bf16"])
    da, db = config_mod.to_dict(a), config_mod.to_dict(b)
    assert config_mod.diff(da, da) == []
    assert config_mod.diff(da, db) == [
        "model.config.hidden_size: 128 -> 32",  # the override changed one key of the default mapping
        "record.precision: 'fp32' -> 'bf16'",
        "train.lr: 0.1 -> 0.2",
    ]
    assert config_mod.diff({"x": {"y": 1}}, {"x": {"y": 1, "z": 2}}) == ["x.z: None -> 2"]
