"""Training data: templates, row errors with file:line, ids, id specs, batch plans, fingerprints."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmclean.config import DataConfig
from lmclean.errors import DataError, InputNotFoundError
from lmclean.train.data import (batch_plan, collate, fingerprint, load_dataset, load_tokenizer, parse_id_spec,
                                template_fields)

TOK = load_tokenizer("byte")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_template_rendering_and_tokens(data_file: Path) -> None:
    ds = load_dataset(DataConfig(path=str(data_file), max_length=48), TOK)
    assert ds.ids == list(range(100, 124))
    first = ds.by_id[100]
    assert first.text == "Q: Who is person 0?\nA: Person 0 lives in town 0 and likes tea."
    assert first.token_ids == tuple(TOK(first.text)["input_ids"][:48])
    assert len(first.token_ids) == 48  # truncated to max_length
    short = load_dataset(DataConfig(path=str(data_file), template="{answer}", max_length=200), TOK).by_id[101]
    assert bytes(i - 3 for i in short.token_ids[:-1]).decode() == "Person 1 lives in town 7 and likes maps."  # byte ids + EOS
    assert template_fields("Q: {question}\nA: {answer}") == ["question", "answer"]


def test_text_field_and_row_number_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.jsonl", [json.dumps({"text": "abc"}), "", json.dumps({"text": "de"})])
    ds = load_dataset(DataConfig(path=str(path), id_field=None, template=None, text_field="text"), TOK)
    assert ds.ids == [0, 1] and [s.text for s in ds.samples] == ["abc", "de"]


def test_missing_template_field_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [json.dumps({"id": 1, "question": "q", "answer": "a"}), "",
                                         json.dumps({"id": 2, "question": "q"})])
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(path=str(path)), TOK)
    assert f"{path}:3:" in str(info.value) and "['answer']" in str(info.value)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [json.dumps({"id": 1, "question": "q", "answer": "a"}), '{"id": 2, "question": '])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        load_dataset(DataConfig(path=str(path)), TOK)
    arr = _write(tmp_path / "a.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=rf"{arr}:1: each line must be a JSON object"):
        load_dataset(DataConfig(path=str(arr)), TOK)


def test_duplicate_and_bad_ids_are_rejected(tmp_path: Path) -> None:
    row = {"question": "q", "answer": "a"}
    dup = _write(tmp_path / "d.jsonl", [json.dumps({"id": 7, **row}), json.dumps({"id": 8, **row}), json.dumps({"id": 7, **row})])
    with pytest.raises(DataError, match=rf"{dup}:3: duplicate sample id 7 \(first on line 1\)"):
        load_dataset(DataConfig(path=str(dup)), TOK)
    neg = _write(tmp_path / "n.jsonl", [json.dumps({"id": -1, **row})])
    with pytest.raises(DataError, match="non-negative integer"):
        load_dataset(DataConfig(path=str(neg)), TOK)
    noid = _write(tmp_path / "x.jsonl", [json.dumps(row)])
    with pytest.raises(DataError, match=rf"{noid}:1: row has no id field `id`"):
        load_dataset(DataConfig(path=str(noid)), TOK)
    with pytest.raises(InputNotFoundError, match="data.path"):
        load_dataset(DataConfig(path=str(tmp_path / "missing.jsonl")), TOK)


def test_id_spec_parsing(tmp_path: Path) -> None:
    assert parse_id_spec("3,5,60-79") == [3, 5, *range(60, 80)]
    assert parse_id_spec(" 9, 2 ,2, 4-5") == [2, 4, 5, 9]
    ids_file = _write(tmp_path / "ids.txt", ["# forget these", "12", "3-4  # a range", "", "12"])
    assert parse_id_spec(f"@{ids_file}") == [3, 4, 12]
    for bad in ["x", "5-3", "1-", "1,,a", "3.5"]:
        with pytest.raises(DataError, match="ranges like 60-79"):
            parse_id_spec(bad)
    with pytest.raises(DataError, match="no ids"):
        parse_id_spec(",")
    with pytest.raises(InputNotFoundError, match="id file"):
        parse_id_spec(f"@{tmp_path / 'none.txt'}")


def test_non_utf8_row_names_file_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"id": 1, "question": "q", "answer": "a"}).encode() + b'\n{"id": 2, "question": "\xff"}\n')
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(path=str(path)), TOK)
    assert str(info.value) == f"{path}:2: not UTF-8 (byte 0xff at column 24); save the file as UTF-8"


def test_eval_and_tofu_read_jsonl_with_the_same_reader(tmp_path: Path) -> None:
    from lmclean.eval import sets, tofu

    path = tmp_path / "full.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path}:1: not UTF-8"):
        tofu._read_jsonl(path)
    with pytest.raises(DataError, match=rf"^{path}:1: not UTF-8"):
        sets.read_samples(path, "Q: {question}\nA: {answer}", "id", need_ids=False)
    with pytest.raises(InputNotFoundError, match="TOFU file .* does not exist; the TOFU folder must hold all its split files"):
        tofu._read_jsonl(tmp_path / "forget01.jsonl")


def test_ids_beyond_int64_are_refused(tmp_path: Path) -> None:
    huge = _write(tmp_path / "h.jsonl", [json.dumps({"id": 2**70, "question": "q", "answer": "a"})])
    with pytest.raises(DataError, match=rf"{huge}:1: id {2**70} is too large; sample ids are stored as int64"):
        load_dataset(DataConfig(path=str(huge)), TOK)
    assert parse_id_spec(str(2**63 - 1)) == [2**63 - 1]
    for spec in [str(2**70), f"3,0-{2**70}", str(2**63)]:
        with pytest.raises(DataError, match="is too large; sample ids are int64"):
            parse_id_spec(spec)
    with pytest.raises(DataError, match=r"'0-999999999999' names more than 1,000,000 ids; split the request"):
        parse_id_spec("0-999999999999")  # refused at once, not after filling memory
    bad = tmp_path / "ids.txt"
    bad.write_bytes(b"1\n\xff\n")
    with pytest.raises(DataError, match=f"id file {bad} is not UTF-8"):
        parse_id_spec(f"@{bad}")


def test_samples_longer_than_max_length_are_counted(data_file: Path) -> None:
    full = load_dataset(DataConfig(path=str(data_file), max_length=1000), TOK)
    lengths = [len(s.token_ids) for s in full.samples]
    cut = sorted(lengths)[len(lengths) // 2]
    ds = load_dataset(DataConfig(path=str(data_file), max_length=cut), TOK)
    assert full.truncated == 0 and ds.truncated == sum(n > cut for n in lengths) > 0
    assert all(len(s.token_ids) == min(n, cut) for s, n in zip(ds.samples, lengths))


@pytest.mark.parametrize("error", ["safetensors", "oserror"])
def test_save_model_maps_a_full_disk_to_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    from safetensors import SafetensorError
    from transformers import modeling_utils

    from lmclean.errors import ModelWriteError
    from lmclean.train.model import fresh_model, save_model

    def full(*args: object, **kwargs: object) -> None:
        if error == "oserror":
            raise OSError(28, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    model = fresh_model({"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                         "num_attention_heads": 2}, 260, 16, 0)
    with pytest.raises(ModelWriteError) as info:
        save_model(model, TOK, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"could not write the model to {tmp_path / 'out'}: ") and "\n" not in message
    assert ("StorageFull" if error == "safetensors" else "No space left on device") in message
    assert list(tmp_path.iterdir()) == []  # no model, no temp directory


def test_batch_plan_is_deterministic_and_covers_each_epoch() -> None:
    ids = list(range(100, 123))  # 23 samples: the last batch of each epoch is short
    plan = batch_plan(ids, 4, seed=3, epochs=2, steps=None, shuffle=True)
    assert plan == batch_plan(ids, 4, seed=3, epochs=2, steps=None, shuffle=True)
    assert plan != batch_plan(ids, 4, seed=4, epochs=2, steps=None, shuffle=True)
    assert len(plan) == 12 and [len(b) for b in plan[:6]] == [4, 4, 4, 4, 4, 3]
    assert sorted(sum(plan[:6], [])) == ids and sorted(sum(plan[6:], [])) == ids
    assert plan[:6] != plan[6:]  # reshuffled every epoch
    assert batch_plan(ids, 4, seed=3, epochs=None, steps=8, shuffle=True) == plan[:8]
    assert batch_plan(ids, 5, 0, 1, None, shuffle=False)[0] == [100, 101, 102, 103, 104]
    # the plan is fixed by the full data set: `--exclude` filters batches, never reorders them
    excluded = {ids[0], ids[5], ids[6]}
    filtered = [[i for i in b if i not in excluded] for b in plan]
    assert [i for b in filtered for i in b] == [i for b in plan for i in b if i not in excluded]


def test_fingerprint_is_sha256_of_int32_little_endian_ids(data_file: Path) -> None:
    ids = [0, 1, 255, 256, 70000]
    expected = hashlib.sha256(struct.pack("<5i", *ids)).hexdigest()
    assert fingerprint(ids) == expected
    assert fingerprint(tuple(ids)) == fingerprint(np.array(ids, dtype=np.int64))
    sample = load_dataset(DataConfig(path=str(data_file)), TOK).samples[0]
    assert sample.fingerprint == hashlib.sha256(struct.pack(f"<{len(sample.token_ids)}i", *sample.token_ids)).hexdigest()


def test_collate_pads_right_and_records_lengths() -> None:
    ids, lengths = collate([[5, 6, 7], [8]], pad_id=0)
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [8, 0, 0]])) and torch.equal(lengths, torch.tensor([3, 1]))
    ids, lengths = collate([], pad_id=0)
    assert ids.shape == (0, 1) and lengths.shape == (0,)
