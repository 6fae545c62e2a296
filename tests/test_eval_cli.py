"""`lmclean eval`: the report's values equal direct library computations; tables; bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig
from typer.testing import CliRunner

from conftest import write_rows
from lmclean.cli.main import app
from lmclean.eval import distance, metrics, models, report, scoring, tofu
from lmclean.train.model import load_model, save_model

runner = CliRunner()
PROMPT = "Q: {question}\nA: "
FAST = ["--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu"]
BASE_KEYS = {"path", "forget_loss", "forget_ppl", "retain_loss", "retain_ppl"}
MIA_KEYS = {"mia_auc_loss", "mia_auc_zlib", "mia_auc_min_k"}
REF_KEYS = {"privleak", "residual_ratio", "distance_to_reference", "kl_forget", "kl_retain"}
TOFU_KEYS = {"truth_ratio_forget", "forget_probability", "forget_rouge_l_recall", "forget_quality", "model_utility"}
UTILITY_KEYS = {f"{s}_{m}" for s in ("retain", "real_authors", "world_facts") for m in ("probability", "rouge_l_recall", "truth_ratio")}


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "4000")  # error lines are one line; keep Rich from wrapping long tmp paths


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _save_tiny(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, bos_token_id=None, eos_token_id=1, pad_token_id=0)  # fmt: skip
    save_model(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"), ByT5Tokenizer(), out)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny models (orig, unl, ref), data ids 100-111, a holdout file and a TOFU-layout folder."""
    root = tmp_path_factory.mktemp("eval_cli")
    for name, seed in [("orig", 0), ("unl", 1), ("ref", 2)]:
        _save_tiny(root / name, seed)
    write_rows(root / "data.jsonl", n=12)
    _write(root / "holdout.jsonl", [{"question": f"What does visitor {i} carry?", "answer": f"A {c} bag."}
                                    for i, c in enumerate(["red", "blue", "green", "grey", "tan"])])  # fmt: skip
    t = root / "tofu"
    t.mkdir()
    n = 20  # 20 rows; forget01/05/10 = the last 2/4/6 of them
    _write(t / "full.jsonl", [{"id": i, "question": f"Where was writer {i} born?", "answer": f"Writer {i} was born in city {i % 7}."}
                              for i in range(n)])  # fmt: skip

    def pert(i: int) -> dict[str, Any]:
        return {"question": f"Where was writer {i} born?", "answer": f"Writer {i} was born in city {i % 7}.",
                "paraphrased_answer": f"City {i % 7} is where writer {i} was born.",
                "perturbed_answer": [f"City {(i + k) % 7 + 10} is where writer {i} was born." for k in (1, 2, 3)]}  # fmt: skip

    for split, k in [("forget01", 2), ("forget05", 4), ("forget10", 6)]:
        _write(t / f"{split}_perturbed.jsonl", [pert(i) for i in range(n - k, n)])
        holdout = [{"question": f"Where was poet {i} born?", "answer": f"Poet {i} was born in town {i}."} for i in range(3)]
        _write(t / f"{split.replace('forget', 'holdout')}.jsonl", holdout)
    _write(t / "retain_perturbed.jsonl", [pert(i) for i in range(3)])
    for name in ("real_authors", "world_facts"):
        _write(t / f"{name}_perturbed.jsonl", [{"question": f"Which {name} item {i}?", "answer": f"item {i}",
                                                "perturbed_answer": [f"thing {i + k}" for k in (1, 2, 3)]} for i in range(2)])  # fmt: skip
    return root


def invoke(*args: object) -> Any:
    return runner.invoke(app, ["eval", *map(str, args)])


def run_json(*args: object) -> dict[str, Any]:
    res = invoke(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _lm(path: Path) -> torch.nn.Module:
    return models.load_for_eval(path)  # the loader `lmclean eval` uses (SDPA attention)


def _qa(root: Path, ids: range) -> tuple[list[str], list[str]]:
    rows = {r["id"]: r for r in map(json.loads, (root / "data.jsonl").read_text().splitlines())}
    return [PROMPT.format(**rows[i]) for i in ids], [rows[i]["answer"] for i in ids]


def _holdout(root: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (root / "holdout.jsonl").read_text().splitlines()]
    return [PROMPT.format(**r) for r in rows], [r["answer"] for r in rows]


# ----------------------------------------------------------------------------- values


def test_json_values_equal_library_computations(root: Path) -> None:
    rep = run_json(root / "orig", f"unlearned={root / 'unl'}", "--reference", root / "ref", "--data", root / "data.jsonl",
                   "--forget", "100-103", "--holdout", root / "holdout.jsonl", "--generate", "2", *FAST)  # fmt: skip
    assert list(rep["models"]) == ["orig", "unlearned", "ref"]  # the reference is a column of its own
    assert rep["reference"] == "ref" and rep["original"] == "orig"
    assert rep["forget"] == {"n": 4, "ids": "100-103"} and rep["retain"] == {"n": 8} and rep["holdout"]["n"] == 5
    for values in rep["models"].values():
        assert set(values) == BASE_KEYS | MIA_KEYS | REF_KEYS
    tok = ByT5Tokenizer()
    orig, unl, ref = _lm(root / "orig"), _lm(root / "unl"), _lm(root / "ref")
    fp, fa = _qa(root, range(100, 104))
    rp, ra = _qa(root, range(104, 112))
    hp, ha = _holdout(root)
    u = rep["models"]["unlearned"]
    # forget loss: every answer token of the forget rows pooled, given its prompt
    lps = np.concatenate([s.token_logprobs for s in scoring.score_texts(unl, tok, fp, fa)])
    assert lps.size == sum(len(a.encode()) for a in fa)
    assert u["forget_loss"] == pytest.approx(-lps.mean(), rel=1e-6)
    assert u["forget_ppl"] == pytest.approx(np.exp(-lps.mean()), rel=1e-6)
    # ... and a hand-written forward pass of the eager-attention model (float32 rounding apart)
    eager, nll, count = load_model(root / "unl").eval(), 0.0, 0
    for prompt, answer in zip(fp, fa):
        p, a = list(prompt.encode()), list(answer.encode())  # ByT5: token = byte + 3
        ids = torch.tensor([[b + 3 for b in p + a]])
        with torch.no_grad():
            logp = torch.log_softmax(eager(ids).logits[0, len(p) - 1 : -1].double(), -1)  # (len(a), V)
        nll -= float(logp[torch.arange(len(a)), ids[0, len(p) :]].sum())
        count += len(a)
    assert u["forget_loss"] == pytest.approx(nll / count, rel=1e-5)
    retain_lps = np.concatenate([s.token_logprobs for s in scoring.score_texts(unl, tok, rp, ra)])
    assert u["retain_loss"] == pytest.approx(-retain_lps.mean(), rel=1e-6)
    # membership inference: forget rows are members, holdout rows non-members
    aucs = {}
    for name, model in [("unlearned", unl), ("ref", ref)]:
        members = [(s.token_logprobs, a) for s, a in zip(scoring.score_texts(model, tok, fp, fa), fa)]
        non = [(s.token_logprobs, a) for s, a in zip(scoring.score_texts(model, tok, hp, ha), ha)]
        for attack in ("loss", "zlib", "min_k"):
            aucs[name, attack] = metrics.mia_auc(members, non, lambda s, f=metrics.MIA_ATTACKS[attack]: f(s[0], s[1]))
            assert rep["models"][name][f"mia_auc_{attack}"] == pytest.approx(aucs[name, attack])
    assert u["privleak"] == pytest.approx(metrics.privleak(aucs["unlearned", "min_k"], aucs["ref", "min_k"]))
    # distance to the reference
    assert u["residual_ratio"] == pytest.approx(distance.residual_ratio(unl, orig, ref), rel=1e-9)
    assert u["distance_to_reference"] == pytest.approx(distance.param_distance(unl, ref), rel=1e-9)
    assert rep["models"]["orig"]["residual_ratio"] == pytest.approx(1.0)
    assert u["kl_forget"] == pytest.approx(scoring.mean_token_kl(unl, ref, tok, fp, fa), rel=1e-6)
    assert u["kl_retain"] == pytest.approx(scoring.mean_token_kl(unl, ref, tok, rp, ra), rel=1e-6)
    r = rep["models"]["ref"]
    assert (r["residual_ratio"], r["kl_forget"], r["privleak"]) == (0.0, 0.0, 0.0)
    # generations: the first 2 forget questions, greedy, one answer per model
    assert [g["id"] for g in rep["generations"]] == [100, 101]
    assert rep["generations"][0]["outputs"]["unlearned"] == scoring.greedy_answers(unl, tok, fp[:1], max_new_tokens=6)[0]


def test_residual_ratio_is_zero_for_a_copy_of_the_reference(root: Path, tmp_path: Path) -> None:
    shutil.copytree(root / "ref", tmp_path / "retrained")
    rep = run_json(root / "orig", tmp_path / "retrained", "--reference", root / "ref", "--data", root / "data.jsonl",
                   "--forget", "100,101", "--retain", "105-107", "--generate", "0", *FAST)  # fmt: skip
    same = rep["models"]["retrained"]
    assert same["residual_ratio"] == 0.0 and same["distance_to_reference"] == 0.0
    assert same["kl_forget"] == pytest.approx(0.0, abs=1e-12) and same["kl_retain"] == pytest.approx(0.0, abs=1e-12)
    assert rep["retain"] == {"n": 3} and not rep["generations"]
    assert any("membership inference skipped" in n for n in rep["notes"])


def test_plain_text_rows_use_text_loss(root: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "text.jsonl", [{"id": i, "text": f"note number {i} says hello"} for i in range(6)])
    rep = run_json(root / "orig", "--data", data, "--forget", "0-1", "--template", "{text}", *FAST)
    texts = [f"note number {i} says hello" for i in range(2)]
    lps = np.concatenate([s.token_logprobs for s in scoring.score_full_texts(_lm(root / "orig"), ByT5Tokenizer(), texts)])
    assert rep["models"]["orig"]["forget_loss"] == pytest.approx(-lps.mean(), rel=1e-6)
    assert rep["scored"].startswith("every token after the first")
    assert any("generation skipped" in n for n in rep["notes"])


def test_tofu_metrics(root: Path) -> None:
    t = root / "tofu"
    rep = run_json(root / "orig", root / "unl", "--reference", root / "ref", "--tofu", t, "--forget", "18-19", *FAST)
    assert rep["tofu"] == {"dir": str(t), "split": "forget01"}
    assert rep["holdout"] == {"n": 3, "source": f"{t}/holdout01.jsonl"}  # the matching TOFU holdout split
    assert rep["retain"]["n"] == 18 and rep["data"] == str(t / "full.jsonl")
    data = tofu.load_tofu(t)
    tok = ByT5Tokenizer()
    ratios = {}
    for name in ("unl", "ref"):
        model = _lm(root / name)
        values = rep["models"][name]
        # privleak is undefined (and noted) when the reference's Min-K% AUC is 0, as it can be on 2 vs 3 rows
        assert set(values) | {"privleak"} == BASE_KEYS | MIA_KEYS | REF_KEYS | TOFU_KEYS | UTILITY_KEYS
        scores = tofu.score_split(data.forget["forget01"], scoring.make_scorer(model, tok), PROMPT)
        ratios[name] = tofu.split_truth_ratios(scores)
        assert values["truth_ratio_forget"] == pytest.approx(metrics.truth_ratio_forget(ratios[name]), rel=1e-6)
        assert values["forget_probability"] == pytest.approx(tofu.split_probability(scores, False), rel=1e-6)
        comps = tofu.model_utility_components(data, scoring.make_scorer(model, tok), scoring.make_generator(model, tok, 6), PROMPT)
        for key, value in comps.items():
            assert values[key] == pytest.approx(value, rel=1e-6, abs=1e-12)
        assert values["model_utility"] == pytest.approx(metrics.model_utility(comps.values()), rel=1e-6, abs=1e-12)
    assert rep["models"]["unl"]["forget_quality"] == pytest.approx(metrics.forget_quality(ratios["unl"], ratios["ref"]))
    assert rep["models"]["ref"]["forget_quality"] == 1.0
    assert report.FORGET_QUALITY_NOTE in rep["notes"]


def test_tofu_without_reference_notes_forget_quality(root: Path) -> None:
    rep = run_json(root / "orig", "--tofu", root / "tofu", "--forget", "14-19", "--generate", "0", *FAST)
    assert rep["tofu"]["split"] == "forget10" and "forget_quality" not in rep["models"]["orig"]
    assert any("forget_quality skipped" in n and "--reference" in n for n in rep["notes"])


# ----------------------------------------------------------------------------- rendering


def test_table_renders_and_out_matches_json(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "r.json"
    res = invoke(root / "orig", root / "unl", "--reference", root / "ref", "--tofu", root / "tofu", "--forget", "18-19",
                 "--generate", "1", "--out", out, *FAST)  # fmt: skip
    assert res.exit_code == 0, res.output
    text = res.stdout
    for needle in ("forget loss", "MIA AUC, Min-K%", "residual ratio", "TOFU forget quality", "HIGHER = closer to retraining",
                   "TOFU model utility", "world facts ROUGE-L", "orig", "unl", "(reference)", "(original)",
                   "greedy answers to forget questions", "Where was writer 18 born?", "note: forget_quality is a p-value"):  # fmt: skip
        assert needle in text, needle
    saved = json.loads(out.read_text())
    assert saved == run_json(root / "orig", root / "unl", "--reference", root / "ref", "--tofu", root / "tofu",
                             "--forget", "18-19", "--generate", "1", *FAST)  # fmt: skip
    assert not list(out.parent.glob("*.partial"))


def test_model_names(root: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    for path in (a, b):
        shutil.copytree(root / "orig", path)
    specs, (ref, orig) = models.model_specs([str(a), str(b)], [str(b), None])
    assert [s.name for s in specs] == ["a/model", "b/model"]  # the shortest path tails that differ
    assert ref == specs[1] and orig is None  # a reference that is one of the models is that model
    specs, _ = models.model_specs([str(a), f"mine={b}"])
    assert [s.name for s in specs] == ["model", "mine"]


# ----------------------------------------------------------------------------- bad input


def _bad_rows(root: Path, tmp_path: Path) -> Path:
    rows = (root / "data.jsonl").read_text().splitlines()
    broken = json.loads(rows[2])
    del broken["answer"]
    rows[2] = json.dumps(broken)
    return _write(tmp_path / "bad.jsonl", [json.loads(r) for r in rows])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_model", "model directory {tmp}/nope does not exist or has no config.json"),
        ("missing_field", "{tmp}/bad.jsonl:3: row lacks field(s) ['answer'] used by --template"),
        ("unknown_forget", "--forget names id 999 that is not in {root}/data.jsonl (1 unknown id(s); the file holds 12 ids in 100-111)"),
        ("unknown_retain", "--retain names id 5 that is not in {root}/data.jsonl"),
        ("holdout_field", "{tmp}/h.jsonl:1: row lacks field(s) ['question'] used by --template"),
        ("missing_data", "data file {tmp}/none.jsonl does not exist"),
        ("not_tofu_split", "with --tofu, --forget must be a TOFU forget split: 18-19 (forget01), 16-19 (forget05), 14-19 (forget10); got 17-19"),
        ("no_forget", "--forget is required"),
    ],
)
def test_bad_input_is_one_line_exit_1(root: Path, tmp_path: Path, case: str, expected: str) -> None:
    data = ["--data", root / "data.jsonl"]
    args: list[object] = {
        "missing_model": [root / "orig", tmp_path / "nope", *data, "--forget", "100"],
        "missing_field": [root / "orig", "--data", _bad_rows(root, tmp_path), "--forget", "100"],
        "unknown_forget": [root / "orig", *data, "--forget", "100,999"],
        "unknown_retain": [root / "orig", *data, "--forget", "100", "--retain", "5"],
        "holdout_field": [root / "orig", *data, "--forget", "100",
                          "--holdout", _write(tmp_path / "h.jsonl", [{"answer": "x"}])],  # fmt: skip
        "missing_data": [root / "orig", "--data", tmp_path / "none.jsonl", "--forget", "100"],
        "not_tofu_split": [root / "orig", "--tofu", root / "tofu", "--forget", "17-19"],
        "no_forget": [root / "orig", *data],
    }[case]
    res = invoke(*args)
    assert res.exit_code == 1, res.output
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert expected.format(root=root, tmp=tmp_path) in lines[0]
